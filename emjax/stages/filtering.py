"""filter: the mixed training set of the mitigation comparison and the samples each arm keeps
(emjax.mitigate: the mix, its held-out rows and each arm's choice, choose_arms).

Writes `<run_dir>/filter/arms.json` (per arm: kept rows, removed rows, precision and recall of
removing inducing samples, the scoring record) and `mix.json` (each row's dataset and index, and
whether it is inducing and held out).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from emjax import artifacts, distributed, geometry_claim, judge, mitigate
from emjax.data import study
from emjax.pipeline import Stage
from emjax.stages.common import load_stage_sae, make_judge, sae_layers

_log = logging.getLogger(__name__)


def run(ctx, out: Path) -> dict:
    cfg, m = ctx.config, ctx.config.mitigate
    inducing, control = mitigate.inducing_pair(cfg)
    layer = mitigate.analysis_layer(m.layer, sae_layers(ctx))
    features = {name: ctx.output("features", name) for name in (inducing, control)}
    mix = mitigate.mix_from_features(features, inducing, control, layer, per_part=m.per_part, seed=cfg.seed)
    heldout = mitigate.heldout_rows(len(mix.rows), m.heldout_fraction, cfg.seed)
    toxic = geometry_claim.Selected.read(ctx.output("geometry")).toxic(layer)

    def judge_scores(rows) -> np.ndarray:
        samples = {name: study.read_dataset(name, cfg.datasets[name], seed=cfg.seed) for name in (inducing, control)}
        return judge.harm_scores(make_judge(ctx), [samples[r.dataset][r.index].messages for r in rows])

    decoder = np.asarray(load_stage_sae(ctx, layer).W_dec[...])
    arms = mitigate.choose_arms(m, mix, heldout, toxic=toxic, decoder=decoder, judge_scores=judge_scores)
    if distributed.is_main_process():
        artifacts.write_json(out / "arms.json", arms)
        artifacts.write_json(out / "mix.json", mitigate.mix_records(mix, heldout))
    pool = len(mix.rows) - len(heldout)
    for arm, a in arms.items():
        _log.info("filter %s: keeps %d of %d, precision %s", arm, len(a["kept"]), pool, a["selection"]["precision"])
    return {
        "layer": layer,
        "rows": len(mix.rows),
        "pool": pool,
        "heldout": len(heldout),
        "toxic_features": len(toxic),
        "arms": {arm: {"kept": len(a["kept"]), **a["selection"]} for arm, a in arms.items()},
    }


STAGE = Stage(
    "filter", run,
    sections=("seed", "datasets", "mitigate", "judge", "model.dtype"),
    inputs=("tokenize", "build", "sae", "features", "geometry"),
    external=lambda cfg, variant: judge.input_files(cfg.judge) if cfg.mitigate.judge_filter else {},
)  # fmt: skip
