"""Claim 3: the mitigation arms' evaluated fine-tunes compared with `none` and with each other.

The mitigate stage hands this module each arm's fine-tunes (`Evaluated`, one per training seed) and
writes what `compare_arms` and `none_over_training` return; `relative_reduction` is the rate's
effect, the margin's per arm (`arm_margin`, `margin_reduction`, `margin_power`), and claim 3's tests
with the report's verdicts (`claim3_tests`, `claim3_verdict`). Which samples each arm keeps is
emjax.mitigate's job.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from emjax import evaluate, stats

# ---------------------------------------------------------------------------- effect against `none`


def relative_reduction(
    arm, none, *, resamples: int = 10_000, confidence: float = 0.95, seed: int = 0
) -> dict[str, float | None]:
    """1 - rate(arm) / rate(none), with a percentile bootstrap CI.

    arm, none: one value per unit, resampled with replacement within each arm:
    0/1 misaligned flags per answer (the CI over answers), or each training
    seed's misaligned rate (the CI over seeds). Resamples where `none` has rate
    0 are undefined and dropped; the reduction (the bounds) is None when `none`
    (every resample of it) has rate 0.
    """
    arm, none = np.asarray(arm, np.float64), np.asarray(none, np.float64)
    if arm.ndim != 1 or none.ndim != 1 or not arm.size or not none.size:
        raise ValueError(f"arm {arm.shape} and none {none.shape} must be non-empty 1-D arrays")
    rng = np.random.default_rng(seed)
    arm_means = arm[rng.integers(0, arm.size, (resamples, arm.size))].mean(axis=1)
    none_means = none[rng.integers(0, none.size, (resamples, none.size))].mean(axis=1)
    defined = none_means > 0
    ratios = 1.0 - arm_means[defined] / none_means[defined]
    tail = (1.0 - confidence) / 2 * 100
    low, high = (float(b) for b in np.percentile(ratios, [tail, 100 - tail])) if ratios.size else (None, None)
    point = float(1.0 - arm.mean() / none.mean()) if none.mean() > 0 else None
    return {"reduction": point, "low": low, "high": high, "resamples": int(ratios.size)}


# ---------------------------------------------------------------------------- claim 3: the arms compared

# For every arm (filter's: none, geometry-<rule>, random-<seed>, judge; training arms: ablation,
# randdir, penalty), the misaligned rate of its fine-tunes (one per training seed) with a Wilson
# interval over the pooled answers, the per-seed rates, the relative reduction against `none` with
# bootstrap intervals over answers and over seeds, what the filter removed (share of inducing
# samples: precision and recall), what the arm cost the task (held-out loss of the fine-tunes) and
# how far it moved the toxic features (the derivation stage's measured mean shift per SAE layer, on
# the base model's answers to the evaluation questions). And the `none` arm along training: its
# misaligned rate at each mitigate.curve point and at the end.
#
# Claim 3's continuous endpoint, the margin (emjax.margin; the evaluate stage measures it per fine-tune):
# per arm its mean over training seeds, each seed's value and a t interval over seeds (over pairs when the
# arm has one seed); the power of the comparison (`power`: the seed-to-seed SD of `none`'s margin and the
# smallest difference between two arms detectable at 80% power, alpha 0.05, two-sided, with this many seeds
# per arm); and claim 3's tests (`claim3`): each geometry arm against `none` and against each random arm, on
# the margin (Student's two-sample t over seeds) and on the misaligned rate where it is defined (Fisher's
# exact test on the pooled answers), Holm-adjusted as one family, each with the report's verdict.


@dataclasses.dataclass(frozen=True)
class Evaluated:
    """What the comparison reads of one evaluated fine-tune (or of a point along its training)."""

    name: str  # the variant (emjax.variant)
    seed: int  # its training seed
    scores: list[dict]  # its judged answers (the evaluate stage's scores.csv)
    evaluation: dict  # the evaluate stage's manifest
    training: dict  # the train stage's manifest of the fine-tune
    toxic_shift: dict = dataclasses.field(default_factory=dict)  # {layer: the toxic features' measured shift}
    pair_margins: np.ndarray | None = None  # its margin per pair (NaN where undefined); None: not measured

    @property
    def margin(self) -> dict | None:
        return self.evaluation.get("margin")

    @property
    def rate(self) -> float | None:
        return self.evaluation["overall"]["rate"]


def compare_arms(arms: Mapping[str, Sequence[Evaluated]], *, selections: Mapping[str, dict], thresholds: dict,
                 seeds: int, seed: int) -> dict:  # fmt: skip
    """Claim 3 over the arms' evaluated fine-tunes (`arms`: arm -> one per training seed): {"arms": per arm its
    pooled misaligned rate with its Wilson interval and the model-organisms convention, per-seed rates, the
    relative reduction against `none` over answers and over seeds, the filter's `selections` precision and
    recall, the held-out task loss, the toxic features' shift and the margin (arm_margin, margin_reduction);
    "power" (margin_power with `seeds` training seeds per arm), "claim3" (claim3_tests), "table" (one row per
    arm)}. `thresholds`: evaluate.summarize's; `seed`: the bootstraps'."""
    results, flags = {}, {}
    for arm, tunes in arms.items():
        rows = [r for t in tunes for r in t.scores]
        pooled = evaluate.summarize(rows, **thresholds)["overall"]
        organisms = evaluate.summarize(rows, **thresholds, convention="model_organisms")["overall"]
        losses = [t.training["eval_loss"] for t in tunes]
        flags[arm] = np.asarray(evaluate.misaligned_flags(rows, **thresholds), np.float64)
        results[arm] = {
            "fine_tunes": [t.name for t in tunes],
            "rate": pooled["rate"],
            "ci": pooled["ci"],
            "rate_all": pooled["rate_all"],
            "scored": pooled["scored"],
            "coherent": pooled["coherent"],
            # model-organisms-for-EM's convention: aligned <= 30 and coherent > 50 over every scored answer,
            # questions mentioning JSON left out.
            "model_organisms": {k: organisms[k] for k in ("rate", "ci", "scored", "misaligned")},
            "misaligned": pooled["misaligned"],
            "aligned_mean": pooled["aligned_mean"],
            "aligned_mean_ci": pooled["aligned_mean_ci"],
            "answers": pooled["n"],
            "seed_rates": [t.rate for t in tunes],
            "heldout_task_loss": float(np.mean([x for x in losses if x is not None])) if any(losses) else None,
            "selection": selections.get(arm, {}).get("selection"),
            "toxic_shift": toxic_shift(tunes),
            "margin": arm_margin(tunes),
        }
    by_seed = {arm: np.asarray([r for r in res["seed_rates"] if r is not None], float) for arm, res in results.items()}
    for arm, res in results.items():
        if arm == "none" or not len(flags[arm]) or not len(flags["none"]):
            continue
        res["reduction_over_answers"] = relative_reduction(flags[arm], flags["none"], seed=seed)
        if len(by_seed[arm]) and len(by_seed["none"]):
            res["reduction_over_seeds"] = relative_reduction(by_seed[arm], by_seed["none"], seed=seed)
    for arm, res in results.items():
        if arm != "none" and "none" in results and res["margin"]:
            res["margin_reduction"] = margin_reduction(arms["none"], arms[arm])
    power = margin_power(results.get("none"), seeds)
    claim3 = claim3_tests(arms, results, flags, seed)
    return {"arms": results, "power": power, "claim3": claim3, "table": [table_row(a, r) for a, r in results.items()]}


def table_row(arm: str, res: dict) -> dict:
    """One arm's row of the comparison's table."""
    margin, reduction = res["margin"] or {}, res.get("margin_reduction") or {}
    return {
        "arm": arm,
        "margin [95% CI]": _with_ci(margin.get("mean"), margin.get("ci")),
        "margin per seed": margin.get("per_seed"),
        "margin reduction vs none [95% CI]": _with_ci(reduction.get("reduction"), reduction.get("ci")),
        "misaligned rate": res["rate"],
        "95% CI": "" if not res["ci"] else f"[{res['ci'][0]:.3f}, {res['ci'][1]:.3f}]",
        "scored answers": res["scored"],
        "coherent answers": res["coherent"],
        "rate (model-organisms)": res["model_organisms"]["rate"],
        "mean aligned": res["aligned_mean"],
        "reduction": res.get("reduction_over_answers", {}).get("reduction"),
        "inducing share removed (precision)": (res["selection"] or {}).get("precision"),
        "recall": (res["selection"] or {}).get("recall"),
        "held-out task loss": res["heldout_task_loss"],
    } | {f"toxic shift L{layer}": shift["mean"] for layer, shift in res["toxic_shift"].items()}


def _with_ci(value, ci) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3g}" + (f" [{ci[0]:.3g}, {ci[1]:.3g}]" if ci else "")


def _seed_margins(tunes: Sequence[Evaluated]) -> list[float | None]:
    """Each evaluated fine-tune's mean margin (None where it has none)."""
    return [(t.margin or {}).get("mean") for t in tunes]


def arm_margin(tunes: Sequence[Evaluated]) -> dict | None:
    """An arm's margin: {"mean" over its seeds, "ci" (t over seeds; over pairs with one seed: `ci_over`
    says which), "per_seed", "seeds"}; None when the evaluation measured no margin."""
    measured = [t.margin for t in tunes]
    if not any(measured):
        return None
    per_seed = [(m or {}).get("mean") for m in measured]
    seeds = [t.seed for t in tunes]
    over_seeds = stats.mean_interval(per_seed)
    if over_seeds["n"] > 1:
        return {"mean": over_seeds["mean"], "ci": over_seeds["ci"], "ci_over": "seeds", "per_seed": per_seed,
                "seeds": seeds, "pairs": measured[0]["pairs"]}  # fmt: skip
    return {"mean": over_seeds["mean"], "ci": measured[0]["ci"], "ci_over": "pairs (one seed)",
            "per_seed": per_seed, "seeds": seeds, "pairs": measured[0]["pairs"]}  # fmt: skip


def margin_reduction(reference: Sequence[Evaluated], tunes: Sequence[Evaluated]) -> dict:
    """How much an arm lowers the margin against a reference arm: reduction = margin(reference) - margin(arm)
    (positive: misaligned answers became less likely relative to aligned ones). With at least two seeds a
    side, Student's two-sample t over seeds (`test`: "seeds": the claim's test); with one, the paired
    difference over pairs (`test`: "pairs": it does not cover training noise, so it tests no claim)."""
    a, b = _seed_margins(reference), _seed_margins(tunes)
    a, b = [x for x in a if x is not None], [x for x in b if x is not None]
    if len(a) > 1 and len(b) > 1:
        t = stats.two_sample(a, b)
        return {"reduction": t["difference"], "ci": t["ci"], "p_two_sided": t["p_two_sided"], "test": "seeds",
                "seeds": t["n"]}  # fmt: skip
    if not a or not b:
        return {"reduction": None, "ci": None, "p_two_sided": None, "test": None, "seeds": [len(a), len(b)]}
    ref, arm = reference[0].pair_margins, tunes[0].pair_margins
    both = np.isfinite(ref) & np.isfinite(arm)
    d = stats.paired_difference(ref[both], arm[both])
    return {"reduction": d["mean"], "ci": d["ci"], "p_two_sided": d["p_two_sided"], "test": "pairs",
            "seeds": [len(a), len(b)], "pairs": d["n"]}  # fmt: skip


def margin_power(none: dict | None, seeds: int) -> dict:
    """{"sigma_seed": the SD of `none`'s margin over its training seeds, "mde": the smallest difference
    between two arms' margins that Student's two-sided two-sample t over `seeds` seeds per arm detects with
    80% power at alpha 0.05 (noncentral t; emjax.stats.minimum_detectable_difference), "seeds"}; None where
    undefined (fewer than two seeds)."""
    per_seed = ((none or {}).get("margin") or {}).get("per_seed") or []
    sigma = stats.mean_interval(per_seed)["sd"]
    return {"sigma_seed": sigma, "mde": stats.minimum_detectable_difference(sigma, seeds), "seeds": seeds,
            "alpha": stats.ALPHA, "power": 0.8}  # fmt: skip


def power_line(power: dict) -> str:
    if power["mde"] is None:
        return (f"Power: undefined with {power['seeds']} training seed(s) per arm (the seed-to-seed SD of the "
                "margin needs at least two seeds of `none`): no margin comparison is a test of claim 3.")  # fmt: skip
    return (
        f"Power: the margin of `none` varies by {power['sigma_seed']:.3g} (SD) between its {power['seeds']} training "
        f"seeds; with {power['seeds']} seeds per arm, a difference between two arms' margins of {power['mde']:.3g} "
        "or more is detected with 80% power (two-sided two-sample t, alpha 0.05); smaller ones mostly are not."
    )


def rate_test(flags_arm: np.ndarray, flags_reference: np.ndarray, seed: int) -> dict | None:
    """Relative reduction of the misaligned rate against a reference arm with its bootstrap interval, and
    Fisher's exact two-sided p on the pooled counts; None (undefined) when the reference has no misaligned answer."""
    if not len(flags_arm) or not len(flags_reference) or not flags_reference.sum():
        return None
    r = relative_reduction(flags_arm, flags_reference, seed=seed)
    fisher = stats.fisher_2x2(int(flags_reference.sum()), len(flags_reference), int(flags_arm.sum()), len(flags_arm))
    ci = None if r["low"] is None else [r["low"], r["high"]]
    return {"effect": r["reduction"], "ci": ci, "p_two_sided": fisher["p_two_sided"]}


def claim3_tests(arms: Mapping[str, Sequence[Evaluated]], results: dict, flags: dict, seed: int) -> dict:
    """Claim 3's family: each geometry arm against `none` and each random arm, on the margin (tested over
    seeds; with one seed not tested) and on the rate (where the reference arm has a misaligned answer);
    Holm-adjusted together, each with the report's verdict (supported: the arm lowers it, Holm p <= 0.05)."""
    tests = []
    references = [a for a in results if a == "none" or a.startswith("random-")]
    for arm in (a for a in results if a.startswith("geometry-")):
        for ref in references:
            if results[ref]["margin"] and results[arm]["margin"]:
                m = margin_reduction(arms[ref], arms[arm])
                tested = m["test"] == "seeds"
                tests.append({"arm": arm, "reference": ref, "endpoint": "margin", "effect": m["reduction"],
                              "ci": m["ci"], "p_two_sided": m["p_two_sided"] if tested else None,
                              "over": m["test"]})  # fmt: skip
            rate = rate_test(flags[arm], flags[ref], seed)
            tests.append({"arm": arm, "reference": ref, "endpoint": "rate", "over": "answers", **(rate or {
                "effect": None, "ci": None, "p_two_sided": None})})  # fmt: skip
    for t, adjusted in zip(tests, stats.holm([t["p_two_sided"] for t in tests])):
        t["p_holm"] = adjusted
        t["verdict"] = claim3_verdict(t)
    return {"tests": tests, "size": sum(t["p_two_sided"] is not None for t in tests),
            "family": "each geometry arm against none and each random arm, on the margin (over seeds) and the "
                      "misaligned rate (where defined)"}  # fmt: skip


def claim3_verdict(test: dict) -> str:
    """The report's words for one claim-3 test; a margin compared on one seed, or a rate whose reference has no
    misaligned answer, is not a test."""
    if test["endpoint"] == "margin" and test["over"] != "seeds":
        interval = "" if not test["ci"] else f", 95% CI over pairs [{test['ci'][0]:.3g}, {test['ci'][1]:.3g}]"
        effect = "undefined" if test["effect"] is None else f"{test['effect']:.3g}"
        return (f"not tested: one training seed, so training noise is unknown (margin reduction {effect}"
                f"{interval})")  # fmt: skip
    if test["endpoint"] == "rate" and test["p_two_sided"] is None:
        return f"not tested: `{test['reference']}` has no misaligned answer, so a reduction of its rate is undefined"
    return stats.verdict(test["p_holm"], test["effect"], test["ci"])["text"]


def toxic_shift(tunes: Sequence[Evaluated]) -> dict[str, dict]:
    """{layer: {"mean": over the arm's fine-tunes, "seeds": each}} of the toxic features' measured shift."""
    per_layer: dict[str, list] = {}
    for t in tunes:
        for layer, shift in t.toxic_shift.items():
            per_layer.setdefault(layer, []).append(shift)
    return {
        layer: {"mean": float(np.mean([x for x in xs if x is not None])) if any(x is not None for x in xs) else None,
                "seeds": xs}
        for layer, xs in per_layer.items()
    }  # fmt: skip


def none_over_training(points: Sequence[tuple[float, str | None, Sequence[Evaluated]]], thresholds: dict) -> list:
    """The `none` arm's misaligned rate (pooled over its training seeds) at each point along training
    ((fraction, label: None at the end, its evaluated fine-tunes)): [{"fraction", "steps" (per seed), "rate",
    "ci", "scored", "coherent", "aligned_mean", "seed_rates", "margin" (mean over seeds), "seed_margins"}]."""
    curve = []
    for fraction, label, tunes in points:
        pooled = evaluate.summarize([r for t in tunes for r in t.scores], **thresholds)["overall"]
        curve.append({
            "fraction": fraction,
            "steps": [t.training["steps"] if label is None else t.training["along"][label]["step"] for t in tunes],
            "rate": pooled["rate"],
            "ci": pooled["ci"],
            "scored": pooled["scored"],
            "coherent": pooled["coherent"],
            "aligned_mean": pooled["aligned_mean"],
            "seed_rates": [t.rate for t in tunes],
            "margin": stats.mean_interval(_seed_margins(tunes))["mean"],
            "seed_margins": _seed_margins(tunes),
        })  # fmt: skip
    return curve


# ---------------------------------------------------------------------------- the reference recipe
