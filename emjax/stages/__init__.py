"""The study's stages, one thin module each: config + earlier artifacts -> a library call.

`STAGES` lists them; the pipeline orders them by their declared inputs. The config's default `stages`
(config.STUDY_STAGES) are all of them but the toy model's.
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
