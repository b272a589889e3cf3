"""Claim 1 on a study's own features: per layer and inducing/control pair, the feature sets selected from the
features stage's pooled codes and every test of their proximity to the toxic features (the geometry stage).

Selects the inducing and control features of each inducing dataset against its `pair` (features.method, top
features.top_n each side) and the toxic features (harmful vs harmless sets, or correlation with a toxicity
score), dense features excluded. The claim's test is the selection permutation test (sample labels permuted,
features selected again each time: emjax.geometry.selection_tests) on decoder and encoder directions, every
aggregation, with and without the features that are themselves toxic, and cross-fitted when
geometry.split="half"; its effect's interval resamples the samples (features re-selected). Beside it, reported as
such: the feature-relabelling test conditional on the selection, frequency-matched random sets, the overlap of
the selected sets with the toxic set (hypergeometric, Fisher, permutation) and bootstrap intervals over features.
Every two-sided p of the run forms one family, Holm-adjusted (report.json "family"); the claim's verdict per layer
and pair reads the decoder test of geometry.aggregate. A dictionary whose nearest-neighbour cosines look like
random directions' is named in a warning.

    result = analyse(cfg, features_dirs, saes, model, tokenizer, mesh=mesh)
    write(result, out, cfg.geometry)    # selected.json, report.json, table.md, the figures, the neighbours
    Selected.read(out).toxic(layer)     # the one reader of selected.json
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from emjax import artifacts, features, geometry, plots, stats
from emjax import config as config_lib
from emjax.data import study, style_matched
from emjax.feature_stats import SampleCodes, load_samples, load_stats

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
    """The rows of several datasets' codes (rows of fewer values padded with value 0 at id 0)."""
    width = max(c.values.shape[1] for c in codes)
    pad = lambda x: np.pad(x, ((0, 0), (0, width - x.shape[1])))  # noqa: E731
    return SampleCodes(
        np.concatenate([pad(c.values) for c in codes]), np.concatenate([pad(c.indices) for c in codes]), codes[0].d_sae
    )


def toxic_scores(cfg, dirs: Mapping[str, Path], layer: int, roles: dict) -> tuple[np.ndarray, str]:
    """Per-feature toxicity scores: harmful vs harmless contrast, or correlation with a toxicity score."""
    if cfg.features.toxic_method == "score":
        scored = [n for n in roles if (dirs[n] / "scores.npy").is_file()]
        if not scored:
            raise config_lib.ConfigError("features.toxic_method=score needs a dataset with format=scored")
        codes = concat_codes([load_samples(dirs[n], layer)[0] for n in scored])
        scores = np.concatenate([np.load(dirs[n] / "scores.npy") for n in scored])
        return features.score_correlation(codes, scores), f"correlation with toxicity scores of {scored}"
    harmful = [n for n, r in roles.items() if r == "harmful"]
    harmless = [n for n, r in roles.items() if r == "harmless"]
    if not harmful or not harmless:
        raise config_lib.ConfigError(
            "the toxic features need datasets with role=harmful and role=harmless "
            "(or features.toxic_method=score with a scored dataset)"
        )
    pos = concat_codes([load_samples(dirs[n], layer)[0] for n in harmful])
    neg = concat_codes([load_samples(dirs[n], layer)[0] for n in harmless])
    method = METHODS.get(cfg.features.toxic_method, cfg.features.toxic_method)
    stats = {n: load_stats(dirs[n], layer) for n in harmful + harmless}
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


def assistant_texts(cfg, name: str, features_dir: Path) -> list[str]:
    """The assistant text of each sample the features stage kept, in its row order."""
    samples = study.read_dataset(name, cfg.datasets[name], seed=cfg.seed)
    kept = np.load(features_dir / "kept.npy")
    return [" ".join(m["content"] for m in samples[i].messages if m["role"] == "assistant") for i in kept]


class Selected:
    """geometry's selected.json: per layer, the toxic features and each pair's inducing and control features."""

    def __init__(self, layers: Mapping[str, dict]):
        self.layers = layers

    @classmethod
    def read(cls, geometry_dir: Path) -> Selected:
        return cls(json.loads((Path(geometry_dir) / "selected.json").read_text()))

    def toxic(self, layer: int) -> np.ndarray:
        return np.asarray([f["feature"] for f in self.layers[str(layer)]["toxic"]], np.int64)

    def feature_sets(self, dataset: str, role: str) -> tuple[dict, dict]:
        """({layer: the dataset's own selected features}, {layer: toxic features}). An inducing dataset's own
        set is its inducing features; a control's (`role`), the control features of the pair it belongs to."""
        target, toxic = {}, {}
        for layer, sets in self.layers.items():
            toxic[int(layer)] = [f["feature"] for f in sets["toxic"]]
            for inducing, sides in sets.items():
                if inducing == "toxic":
                    continue
                if inducing == dataset and role == "inducing":
                    target[int(layer)] = [f["feature"] for f in sides["inducing"]]
                elif role == "control" and sides["control_dataset"] == dataset:
                    target[int(layer)] = [f["feature"] for f in sides["control"]]
        return target, toxic


def check_toxic_sets(cfg) -> dict:
    """The style-matched toxic sets: their split's counts, after checking that they leave out the answers of
    models fine-tuned on a dataset under test."""
    tested = {inducing for inducing, _ in pairs(cfg)}
    out = {}
    for name, d in sorted(cfg.datasets.items()):
        if d.format == "style_matched":
            try:
                style_matched.check_leave_out(name, d, tested, seed=cfg.seed)
            except ValueError as e:
                raise config_lib.ConfigError(str(e)) from None
            out[name] = style_matched.split_of(d, seed=cfg.seed).summary
    return out


def halves(dirs: Mapping[str, Path], inducing: str, control: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Cross-fitting halves by original sample index, one draw for both sides: row i of a pair's two datasets
    (the same question, for paired data) falls in the same half."""
    kept = {n: np.load(dirs[n] / "kept.npy") for n in (inducing, control)}
    top = max(int(k.max()) for k in kept.values()) + 1
    half = np.random.default_rng(seed).permutation(top) % 2
    return half[kept[inducing]], half[kept[control]]


def family_entries(layer: int, dataset: str, entry: dict) -> list[dict]:
    """Every two-sided p of one layer and pair, named: the family Holm adjusts (with where each sits)."""
    found = []

    def add(test, direction, aggregation, p, effect, path):
        found.append({"layer": layer, "dataset": dataset, "test": test, "direction": direction,
                      "aggregation": aggregation, "effect": effect, "p_two_sided": p, "path": path})  # fmt: skip

    for direction in ("decoder", "encoder"):
        d = entry[direction]
        for how in geometry.AGGREGATIONS:
            for shared in ("with_shared", "without_shared"):
                r = d["selection"][shared][how]
                add(f"selection permutation ({shared.replace('_', ' ')} features)", direction, how,
                    r["p_two_sided"], r["effect"], [direction, "selection", shared, how])  # fmt: skip
            if "crossfit" in d:
                r = d["crossfit"][how]
                add("selection permutation, cross-fitted halves", direction, how, r["p_two_sided"], r["effect"],
                    [direction, "crossfit", how])  # fmt: skip
            r = d["conditional"]["aggregations"][how]
            add("feature relabelling (conditional on the selection)", direction, how, r["p_two_sided"], r["effect"],
                [direction, "conditional", "aggregations", how])  # fmt: skip
            for side in ("inducing", "control"):
                r = d[side]["null"][how]
                add(f"{side} set against frequency-matched random sets", direction, how, r["p_two_sided"],
                    r["observed"] - r["null_mean"], [direction, side, "null", how])  # fmt: skip
    o = entry["overlap"]
    add("overlap share, inducing minus control (permutation)", None, None, o["permutation"]["p_two_sided"],
        o["share_difference"], ["overlap", "permutation"])  # fmt: skip
    for side in ("inducing", "control"):
        if "hypergeometric" in o:
            h = o["hypergeometric"][side]
            add(f"overlap of the {side} set with the toxic set (hypergeometric)", None, None, h["p_two_sided"],
                h["overlap"] - h["expected"], ["overlap", "hypergeometric", side])  # fmt: skip
    if "fisher" in o:
        add("overlap, inducing against control (Fisher)", None, None, o["fisher"]["p_two_sided"],
            o["inducing"] - o["control"], ["overlap", "fisher"])  # fmt: skip
    return found


def pair_entry(cfg, dirs, inducing, control, codes, chosen, directions, toxic_ids, density, mesh) -> dict:
    """Every statistic of one layer and pair (see the module docstring)."""
    g = cfg.geometry
    common = dict(top_n=cfg.features.top_n, k=g.k, max_density=cfg.features.max_density, density=density)
    primary = geometry.selection_tests(codes[inducing], codes[control], directions, toxic_ids,
                                       permutations=g.selection_permutations, seed=cfg.seed, mesh=mesh,
                                       **common)  # fmt: skip
    crossfit = None
    if g.split == "half":
        crossfit = geometry.selection_tests(codes[inducing], codes[control], directions, toxic_ids,
                                            permutations=g.selection_permutations, seed=cfg.seed, mesh=mesh,
                                            halves=halves(dirs, inducing, control, cfg.seed), **common)  # fmt: skip
    intervals = geometry.selection_bootstrap(codes[inducing], codes[control], directions, toxic_ids,
                                             resamples=g.bootstrap, seed=cfg.seed, **common)  # fmt: skip
    sets = {"inducing": chosen["positive"], "control": chosen["negative"]}
    entry = {"control": control, "excluded_dense": chosen["excluded_dense"], "overlap": primary["overlap"]}
    for which, m in directions.items():
        unit = geometry.unit_rows(m)
        result = {"selection": primary["directions"][which] | {"ci95": intervals[which]}}
        if crossfit is not None:
            result["crossfit"] = crossfit["directions"][which]["with_shared"] | {
                "selected": crossfit["selected"], "overlap": crossfit["overlap"]
            }
        for side, ids in sets.items():
            prox = geometry.feature_proximity(m, ids, toxic_ids, k=g.k, mesh=mesh, unit=unit)
            nulls = {}
            for how in geometry.AGGREGATIONS:
                null = geometry.frequency_matched_null(m, ids, toxic_ids, density, k=g.k, how=how, draws=g.null_draws,
                                                       seed=cfg.seed, mesh=mesh)  # fmt: skip
                nulls[how] = {k: v for k, v in null.items() if k != "draws"}
            result[side] = prox.summary() | {
                "value": prox.aggregate(g.aggregate),
                "ci95": list(geometry.bootstrap_ci(prox.top_k_mean[prox.alive], resamples=g.bootstrap, seed=cfg.seed)),
                "null": nulls,
            }
        result["conditional"] = geometry.permutation_test(
            m, sets["inducing"], sets["control"], toxic_ids, k=g.k, permutations=g.permutations, seed=cfg.seed,
            mesh=mesh,
        )  # fmt: skip
        entry[which] = result
    return entry


def dictionary_check(cosine: np.ndarray, alive: np.ndarray, layer: int, d_model: int, warn: float) -> dict:
    """The dictionary's nearest-neighbour cosines against random directions of the same width; a warning
    when they look random (such a dictionary cannot carry geometry)."""
    check = geometry.dictionary_structure(cosine[alive, 0], d_model, warn_share=warn)
    if check["like_random"]:
        _log.warning(
            "geometry: layer %d's SAE looks like random directions in d=%d: mean nearest-neighbour cosine %.3f "
            "(random: %.3f), %.1f%% of features above the random 99th percentile %.3f (under %.0f%%); its "
            "proximities are not evidence of structure (train it on more tokens, or use a released SAE)",
            layer, d_model, check["mean_nearest_cosine"], check["random_mean"],
            100 * check["share_above_random_q99"], check["random_q99"], 100 * warn,
        )  # fmt: skip
    return check


def adjust_family(report: dict) -> list[dict]:
    """Holm over every two-sided p of the run; each p_holm also written where its test sits in `report`."""
    family = [
        e
        for layer, lr in report["layers"].items()
        for name, entry in lr.items()
        if isinstance(entry, dict) and "decoder" in entry
        for e in family_entries(int(layer), name, entry)
    ]
    for e, adjusted in zip(family, stats.holm([e["p_two_sided"] for e in family])):
        e["p_holm"] = adjusted
        node = report["layers"][str(e["layer"])][e["dataset"]]
        for key in e["path"]:
            node = node[key]
        node["p_holm"] = adjusted
    return family


def analyse(cfg, dirs: Mapping[str, Path], saes: Mapping[int, object], model, tokenizer, *, mesh=None) -> dict:
    """Claim 1 on the features stage's outputs (`dirs`: each dataset's directory) with each layer's SAE:
    {"selected" (selected.json), "report" (report.json), "table" (claim_table), "neighbours" ({layer: (ids,
    cosines)} of each feature's nearest features), "histograms" ({layer: {set: max cosines}}), "proximity"
    ({dataset: per-layer rows of plots.plot_layer_proximity})}."""
    g = cfg.geometry
    roles = {name: d.role for name, d in cfg.datasets.items()}
    domains = {name: d.domain for name, d in cfg.datasets.items()}
    toxic_sets = check_toxic_sets(cfg)
    method = METHODS.get(cfg.features.method, cfg.features.method)
    report, selected, plot_rows = {"layers": {}, "toxic_sets": toxic_sets, "dictionaries": {}}, {}, {}
    neighbour_sets, histograms = {}, {}
    texts = {name: assistant_texts(cfg, name, dirs[name]) for name in roles}
    for layer, sae in saes.items():
        examples = top_samples({n: load_samples(dirs[n], layer)[0] for n in roles}, texts)
        directions = {w: geometry.sae_directions(sae, w) for w in ("decoder", "encoder")}
        decoder = directions["decoder"]
        stats_ = {n: load_stats(dirs[n], layer) for n in roles}
        density = features.combined_density(*stats_.values())
        tox_scores, tox_how = toxic_scores(cfg, dirs, layer, roles)
        toxic = features.top_features(
            tox_scores, cfg.features.top_n, density=density, max_density=cfg.features.max_density
        )
        toxic_ids = toxic["positive"]
        if len(toxic_ids) <= g.k:
            raise config_lib.ConfigError(
                f"layer {layer}: only {len(toxic_ids)} toxic features selected; need > geometry.k"
            )
        cosine, nearest = geometry.neighbours(decoder, k=min(g.neighbours, sae.d_sae - 1), mesh=mesh)
        neighbour_sets[layer] = (nearest, cosine)
        alive = geometry.unit_rows(decoder)[1]
        report["dictionaries"][str(layer)] = dictionary_check(cosine, alive, layer, decoder.shape[1], g.structure_warn)
        layer_report = {
            "toxic": {"how": tox_how, "count": int(len(toxic_ids)), "excluded_dense": toxic["excluded_dense"],
                      # what a feature's closest of the toxic features would be among random directions
                      "random_max_cosine": geometry.random_max_cosine(decoder.shape[1], len(toxic_ids))},
        }  # fmt: skip
        selected[str(layer)] = {
            "toxic": describe(model, tokenizer, decoder, toxic_ids, tox_scores, stats_, cfg.features.logit_lens,
                              examples)  # fmt: skip
        }
        hist = histograms.setdefault(layer, {})
        for inducing, control in pairs(cfg):
            codes = {n: load_samples(dirs[n], layer)[0] for n in (inducing, control)}
            scores = features.contrast(
                method, codes[inducing], codes[control], pos_stats=stats_[inducing], neg_stats=stats_[control]
            )
            chosen = features.top_features(
                scores, cfg.features.top_n, density=density, max_density=cfg.features.max_density
            )
            entry = {"domain": domains[inducing]} | pair_entry(cfg, dirs, inducing, control, codes, chosen,
                                                                directions, toxic_ids, density, mesh)  # fmt: skip
            layer_report[inducing] = entry
            for side, ids in (("inducing", chosen["positive"]), ("control", chosen["negative"])):
                prox = geometry.feature_proximity(decoder, ids, toxic_ids, k=g.k, mesh=mesh)
                hist[f"{inducing}: {side}"] = prox.max[prox.alive]
            selected[str(layer)][inducing] = {"control_dataset": control} | {
                side: describe(model, tokenizer, decoder, ids, scores if side == "inducing" else -scores, stats_,
                               cfg.features.logit_lens, examples)
                for side, ids in (("inducing", chosen["positive"]), ("control", chosen["negative"]))
            }  # fmt: skip
            d = entry["decoder"]
            null = d["inducing"]["null"][g.aggregate]
            plot_rows.setdefault(inducing, []).append({
                "layer": layer,
                "inducing": (d["inducing"]["value"], *d["inducing"]["ci95"]),
                "control": (d["control"]["value"], *d["control"]["ci95"]),
                "null": (null["null_mean"], *null["null_ci95"]),
            })  # fmt: skip
        report["layers"][str(layer)] = layer_report
    family = adjust_family(report)
    report["family"] = {
        "method": "holm",
        "alpha": stats.ALPHA,
        "size": len(family),
        "what": "every two-sided p of this run: per layer and pair, decoder and encoder directions x each aggregation "
                "x (selection permutation with and without shared features, cross-fitted when geometry.split=half, "
                "feature relabelling, inducing and control sets against frequency-matched random sets), and the "
                "overlap tests",
        # with P permutations no p is below 1/(P+1): the smallest Holm-adjusted p this family can reach
        "smallest_holm_p": min(1.0, len(family) / (g.selection_permutations + 1)),
        "tests": [{k: v for k, v in e.items() if k != "path"} for e in family],
    }  # fmt: skip
    table = claim_table(report, g.aggregate)
    if report["family"]["smallest_holm_p"] > stats.ALPHA:
        _log.warning(
            "geometry: %d tests in the family and %d permutations: no Holm-adjusted p can fall below %.3f, so "
            "the claim cannot be supported; raise geometry.selection_permutations above %d",
            len(family), g.selection_permutations, report["family"]["smallest_holm_p"], int(len(family) / stats.ALPHA),
        )  # fmt: skip
    _log.info("geometry (decoder, %s, selection permutation test):\n%s", g.aggregate, plots.markdown_table(table))
    return {"selected": selected, "report": report, "table": table, "neighbours": neighbour_sets,
            "histograms": histograms, "proximity": plot_rows}


def write(result: dict, out: Path, g) -> None:
    """analyse's result into `out` (see the module docstring); `g`: the geometry config."""
    artifacts.write_json(out / "selected.json", result["selected"])
    artifacts.write_json(out / "report.json", result["report"])
    artifacts.write_text(out / "table.md", plots.markdown_table(result["table"]) + "\n")
    for layer, (nearest, cosine) in result["neighbours"].items():
        artifacts.write_safetensors(out / f"neighbours_layer{layer}.safetensors", {"ids": nearest, "cosine": cosine})
    for layer, hist in result["histograms"].items():
        if hist:
            plots.plot_max_cosine_histograms(
                hist, out / f"max_cosine_layer{layer}.png", title=f"layer {layer}: max cosine to a toxic feature"
            )
    for inducing, rows in result["proximity"].items():
        plots.plot_layer_proximity(
            rows, out / f"proximity_{inducing}.png", title=f"{inducing}: proximity to toxic features",
            ylabel=f"{g.aggregate} cosine (k={g.k})",
        )  # fmt: skip


def claim_table(report: dict, aggregate: str) -> list[dict]:
    """Claim 1 per layer and pair: the selection permutation test on decoder directions (geometry.aggregate),
    its effect with the interval over resampled samples, two-sided and Holm-adjusted p, the verdict."""
    rows = []
    for layer, lr in report["layers"].items():
        for name, entry in lr.items():
            if not (isinstance(entry, dict) and "decoder" in entry):
                continue
            sel = entry["decoder"]["selection"]
            test, ci = sel["with_shared"][aggregate], sel["ci95"][aggregate]
            o = entry["overlap"]
            rows.append({
                "layer": int(layer), "dataset": name, "domain": entry["domain"],
                "inducing": sel["mean_inducing"], "control": sel["mean_control"], "effect": test["effect"], "ci95": ci,
                "p": test["p_two_sided"], "p_holm": test["p_holm"],
                "null (inducing)": entry["decoder"]["inducing"]["null"][aggregate]["null_mean"],
                "toxic in inducing": o["inducing"], "toxic in control": o["control"],
                "n_inducing": sel["live_inducing"], "n_control": sel["live_control"],
                "verdict": stats.verdict(test["p_holm"], test["effect"], ci)["text"],
            })  # fmt: skip
    return sorted(rows, key=lambda r: (r["layer"], r["dataset"]))


