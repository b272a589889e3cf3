"""The study's stages, one thin module each: config + earlier artifacts -> a library call.

`STAGES` lists them; the pipeline orders them by their declared inputs.
"""

from emjax.stages import (
    build,
    derivation,
    evaluate,
    extract,
    features,
    filter,
    geometry,
    mitigate,
    report,
    sae,
    summarize,
    tokenize,
    toy,
    train,
)

STAGES = (
    tokenize.STAGE,
    build.STAGE,
    extract.STAGE,
    summarize.STAGE,
    sae.STAGE,
    features.STAGE,
    geometry.STAGE,
    filter.STAGE,
    train.STAGE,
    derivation.STAGE,
    evaluate.STAGE,
    mitigate.STAGE,
    report.STAGE,
    toy.STAGE,
)
