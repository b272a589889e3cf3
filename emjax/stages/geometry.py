"""geometry: the paper's first claim, per layer and per inducing/control pair.

Selects, from the features stage's pooled codes, the inducing and control features of each
inducing dataset against its `pair` (features.method, top features.top_n each side) and the
toxic features (harmful vs harmless sets, or correlation with a toxicity score), dense
features excluded; then measures how close each set lies to the toxic set (decoder cosine,
and encoder directions as a variant), against frequency-matched random sets, with a
one-sided permutation test of inducing vs control and bootstrap intervals over features.

Writes `<run_dir>/geometry/`: selected.json (every selected feature with its statistics and
logit-lens tokens), report.json, table.md, proximity_layers.png, max_cosine_layer{L}.png and
neighbours_layer{L}.safetensors (each feature's nearest features in its dictionary).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from emjax import artifacts, distributed, features, geometry, models
from emjax import config as config_lib
from emjax.data import study
from emjax.feature_stats import SampleCodes, load_samples, load_stats
from emjax.pipeline import Stage
from emjax.stages.common import built_checkpoint
from emjax.stages.features import sae_layers
from emjax.stages.sae import load_stage_sae

_log = logging.getLogger(__name__)

METHODS = {"label_correlation": "correlation"}  # config names -> emjax.features.contrast names


def pairs(cfg) -> list[tuple[str, str]]:
    """(inducing, control) dataset names."""
    out = []
    for name, d in sorted(cfg.datasets.items()):
        if d.role == "inducing" and d.pair:
            if d.pair not in cfg.datasets:
                raise config_lib.ConfigError(f"datasets.{name}.pair={d.pair!r} names no dataset")
            out.append((name, d.pair))
    return out


def concat_codes(codes: list[SampleCodes]) -> SampleCodes:
    return SampleCodes(
        np.concatenate([c.values for c in codes]), np.concatenate([c.indices for c in codes]), codes[0].d_sae
    )


def toxic_scores(cfg, ctx, layer: int, roles: dict) -> tuple[np.ndarray, str]:
    """Per-feature toxicity scores: harmful vs harmless contrast, or correlation with a toxicity score."""
    out = ctx.output
    if cfg.features.toxic_method == "score":
        scored = [n for n in roles if (out("features", n) / "scores.npy").is_file()]
        if not scored:
            raise config_lib.ConfigError("features.toxic_method=score needs a dataset with format=scored")
        codes = concat_codes([load_samples(out("features", n), layer)[0] for n in scored])
        scores = np.concatenate([np.load(out("features", n) / "scores.npy") for n in scored])
        return features.score_correlation(codes, scores), f"correlation with toxicity scores of {scored}"
    harmful = [n for n, r in roles.items() if r == "harmful"]
    harmless = [n for n, r in roles.items() if r == "harmless"]
    if not harmful or not harmless:
        raise config_lib.ConfigError(
            "the toxic features need datasets with role=harmful and role=harmless "
            "(or features.toxic_method=score with a scored dataset)"
        )
    pos = concat_codes([load_samples(out("features", n), layer)[0] for n in harmful])
    neg = concat_codes([load_samples(out("features", n), layer)[0] for n in harmless])
    method = METHODS.get(cfg.features.toxic_method, cfg.features.toxic_method)
    stats = {n: load_stats(out("features", n), layer) for n in harmful + harmless}
    pos_stats = _merged_stats([stats[n] for n in harmful]) if method == "frequency_difference" else None
    neg_stats = _merged_stats([stats[n] for n in harmless]) if method == "frequency_difference" else None
    scores = features.contrast(method, pos, neg, pos_stats=pos_stats, neg_stats=neg_stats)
    return scores, f"{method}: {harmful} vs {harmless}"


def _merged_stats(stats):
    if len(stats) != 1:
        raise config_lib.ConfigError("frequency_difference over several datasets per side is not supported")
    return stats[0]


def describe(model, tok, decoder, ids, scores, stats, top: int, examples) -> list[dict]:
    """Each feature's statistics, logit-lens tokens and the samples where it is most active."""
    records = features.feature_records(ids, scores, stats)
    if len(ids):
        lens = features.logit_lens(model, decoder[np.asarray(ids)], top=top, tokenizer=tok)
        for i, record in enumerate(records):
            record["logit_lens"] = {"top": list(lens["top_tokens"][i]), "bottom": list(lens["bottom_tokens"][i])}
            record["top_samples"] = examples(record["feature"])
    return records


def top_samples(pooled: dict, texts: dict, n: int = 3, chars: int = 200):
    """feature -> its `n` highest mean-pooled activations over every dataset's samples, with the
    assistant text (cut to `chars`) and the dataset it came from."""

    def examples(feature: int) -> list[dict]:
        found = []
        for name, codes in pooled.items():
            activation = np.where(codes.indices == feature, codes.values, 0.0).sum(1)
            for row in np.argsort(-activation, kind="stable")[:n]:
                if activation[row] > 0:
                    found.append(
                        {"dataset": name, "activation": float(activation[row]), "text": texts[name][row][:chars]}
                    )
        return sorted(found, key=lambda e: -e["activation"])[:n]

    return examples


def assistant_texts(ctx, name: str) -> list[str]:
    """The assistant text of each sample the features stage kept, in its row order."""
    samples = study.read_dataset(name, ctx.config.datasets[name], seed=ctx.config.seed)
    kept = np.load(ctx.output("features", name) / "kept.npy")
    return [" ".join(m["content"] for m in samples[i].messages if m["role"] == "assistant") for i in kept]


def feature_sets(ctx, variant: str) -> tuple[dict, dict]:
    """({layer: the dataset's own selected features}, {layer: toxic features}) from geometry's selection.

    An inducing dataset's target set is its inducing features; a control's, the control features
    of the pair it belongs to."""
    selected = json.loads((ctx.output("geometry") / "selected.json").read_text())
    role = ctx.config.datasets[variant].role
    target, toxic = {}, {}
    for layer, sets in selected.items():
        toxic[int(layer)] = [f["feature"] for f in sets["toxic"]]
        for inducing, sides in sets.items():
            if inducing == "toxic":
                continue
            if inducing == variant and role == "inducing":
                target[int(layer)] = [f["feature"] for f in sides["inducing"]]
            elif role == "control" and sides["control_dataset"] == variant:
                target[int(layer)] = [f["feature"] for f in sides["control"]]
    return target, toxic


def run(ctx, out: Path) -> dict:
    cfg = ctx.config
    g = cfg.geometry
    roles = {name: d.role for name, d in cfg.datasets.items()}
    domains = {name: d.domain for name, d in cfg.datasets.items()}
    model = models.load(built_checkpoint(ctx), dtype=cfg.model.dtype, mesh=ctx.mesh, rules=ctx.rules)
    tok = models.load_tokenizer(ctx.output("tokenize") / "tokenizer")
    method = METHODS.get(cfg.features.method, cfg.features.method)
    report, selected, table, plot_rows = {"layers": {}}, {}, [], {}
    texts = {name: assistant_texts(ctx, name) for name in roles}
    for layer in sae_layers(ctx):
        sae = load_stage_sae(ctx, layer)
        examples = top_samples({n: load_samples(ctx.output("features", n), layer)[0] for n in roles}, texts)
        decoder = geometry.sae_directions(sae, "decoder")
        encoder = geometry.sae_directions(sae, "encoder")
        stats = {n: load_stats(ctx.output("features", n), layer) for n in roles}
        density = features.combined_density(*stats.values())
        tox_scores, tox_how = toxic_scores(cfg, ctx, layer, roles)
        toxic = features.top_features(
            tox_scores, cfg.features.top_n, density=density, max_density=cfg.features.max_density
        )
        toxic_ids = toxic["positive"]
        if len(toxic_ids) <= g.k:
            raise config_lib.ConfigError(
                f"layer {layer}: only {len(toxic_ids)} toxic features selected; need > geometry.k"
            )
        layer_report = {
            "toxic": {"how": tox_how, "count": int(len(toxic_ids)), "excluded_dense": toxic["excluded_dense"]}
        }
        selected[str(layer)] = {
            "toxic": describe(model, tok, decoder, toxic_ids, tox_scores, stats, cfg.features.logit_lens, examples)
        }
        hist = {}
        for inducing, control in pairs(cfg):
            codes = {n: load_samples(ctx.output("features", n), layer)[0] for n in (inducing, control)}
            scores = features.contrast(
                method, codes[inducing], codes[control], pos_stats=stats[inducing], neg_stats=stats[control]
            )
            chosen = features.top_features(
                scores, cfg.features.top_n, density=density, max_density=cfg.features.max_density
            )
            sets = {"inducing": chosen["positive"], "control": chosen["negative"]}
            entry = {"domain": domains[inducing], "control": control, "excluded_dense": chosen["excluded_dense"]}
            for which, directions in (("decoder", decoder), ("encoder", encoder)):
                unit = geometry.unit_rows(directions)
                result = {}
                for side, ids in sets.items():
                    prox = geometry.feature_proximity(directions, ids, toxic_ids, k=g.k, mesh=ctx.mesh, unit=unit)
                    values = prox.top_k_mean[prox.alive]
                    null = geometry.frequency_matched_null(
                        directions, ids, toxic_ids, density, k=g.k, how=g.aggregate, draws=g.null_draws,
                        seed=cfg.seed, mesh=ctx.mesh,
                    )  # fmt: skip
                    result[side] = prox.summary() | {
                        "value": prox.aggregate(g.aggregate),
                        "ci95": list(geometry.bootstrap_ci(values, resamples=g.bootstrap, seed=cfg.seed)),
                        "null": {k: v for k, v in null.items() if k != "draws"},
                    }
                    if which == "decoder":
                        hist[f"{inducing}: {side}"] = prox.max[prox.alive]
                result["test"] = geometry.permutation_test(
                    directions, sets["inducing"], sets["control"], toxic_ids, k=g.k, permutations=g.permutations,
                    seed=cfg.seed, mesh=ctx.mesh,
                )  # fmt: skip
                entry[which] = result
            layer_report[inducing] = entry
            selected[str(layer)][inducing] = {"control_dataset": control} | {
                side: describe(model, tok, decoder, ids, scores if side == "inducing" else -scores, stats,
                               cfg.features.logit_lens, examples)
                for side, ids in sets.items()
            }  # fmt: skip
            d = entry["decoder"]
            table.append({
                "layer": layer, "dataset": inducing, "domain": domains[inducing],
                "inducing": d["inducing"]["value"], "control": d["control"]["value"],
                "null (inducing)": d["inducing"]["null"]["null_mean"], "effect": d["test"]["effect"],
                "p": d["test"]["p_value"], "n_inducing": d["test"]["n_a"], "n_control": d["test"]["n_b"],
            })  # fmt: skip
            plot_rows.setdefault(inducing, []).append({
                "layer": layer,
                "inducing": (d["inducing"]["value"], *d["inducing"]["ci95"]),
                "control": (d["control"]["value"], *d["control"]["ci95"]),
                "null": (d["inducing"]["null"]["null_mean"], *d["inducing"]["null"]["null_ci95"]),
            })  # fmt: skip
        cosine, nearest = geometry.neighbours(decoder, k=min(g.neighbours, sae.d_sae - 1), mesh=ctx.mesh)
        if distributed.is_main_process():
            artifacts.write_safetensors(
                out / f"neighbours_layer{layer}.safetensors", {"ids": nearest, "cosine": cosine}
            )
            if hist:
                geometry.plot_max_cosine_histograms(
                    hist, out / f"max_cosine_layer{layer}.png", title=f"layer {layer}: max cosine to a toxic feature"
                )
        report["layers"][str(layer)] = layer_report
    if distributed.is_main_process():
        artifacts.write_json(out / "selected.json", selected)
        artifacts.write_json(out / "report.json", report)
        artifacts.write_text(out / "table.md", geometry.markdown_table(table) + "\n")
        for inducing, rows in plot_rows.items():
            geometry.plot_layer_proximity(
                rows, out / f"proximity_{inducing}.png", title=f"{inducing}: proximity to toxic features",
                ylabel=f"{g.aggregate} cosine (k={g.k})",
            )  # fmt: skip
    _log.info("geometry (decoder, %s):\n%s", g.aggregate, geometry.markdown_table(table))
    return {"pairs": [list(p) for p in pairs(cfg)], "table": table, "report": "report.json"}


STAGE = Stage(
    "geometry", run,
    sections=("seed", "model.dtype", "datasets", "features.method", "features.toxic_method", "features.top_n",
              "features.max_density", "features.logit_lens", "geometry"),
    inputs=("tokenize", "build", "sae", "features"),
)  # fmt: skip
