"""The study's stages, one thin module each: config + earlier artifacts -> a library call.

`STAGES` lists them; the pipeline orders them by their declared inputs. `STUDY`, every stage but the toy model's
(an experiment of its own: configs/toy.py), is the config's default `stages`.
"""

from emjax.stages import (
    build,
    derivation,
    evaluate,
    extract,
    features,
    filtering,
    geometry,
    mitigate,
    report,
    sae,
    summarize,
    tokenize,
    toy,
    train,
)

STAGES = tuple(
    module.STAGE
    for module in (tokenize, build, extract, summarize, sae, features, geometry, filtering, train, derivation,
                   evaluate, mitigate, report, toy)  # fmt: skip
)
STUDY = tuple(stage.name for stage in STAGES if stage.name != "toy")
