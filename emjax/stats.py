"""Small statistics the study's tests share: permutation p-values, Holm's adjustment, overlap tests.

    p = permutation_p(null, observed)              # {"p_greater", "p_two_sided", ...} of a null sample
    adjusted = holm([0.01, 0.04, 0.03])             # family-wise error control, in the input order
    verdict(p_holm, effect, ci)                     # the report's wording of a claim's test
    overlap_test(16, 100, 100, 4608)                # hypergeometric: 16 of 100 chosen are among 100 marked
    fisher_2x2(16, 100, 3, 100)                     # two sets' overlaps with the marked set compared
    mean_interval(values)                           # mean with its t interval; paired_difference(a, b) too
    two_sample(a, b)                                # Student's two-sample t: difference, interval, p
    minimum_detectable_difference(sigma, 3)         # two-sided, 80% power, alpha 0.05, 3 per arm

Undefined values are None, never NaN (the study's JSON is strict).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import optimize, special
from scipy import stats as distributions


def tolerance(x: float) -> float:
    """Equal up to float rounding: a permuted sum of the same values can differ in its last bits."""
    return 1e-9 * max(1.0, abs(x))


def permutation_p(null, observed: float | None, *, center: float = 0.0) -> dict:
    """p-values of `observed` against a permutation (or resampling) null, the observed value counted:
    p_greater = (1 + #{null >= observed}) / (1 + n), p_two_sided = (1 + #{|null - center| >= |observed -
    center|}) / (1 + n); undefined (NaN) null draws are left out and counted. center is 0 for a
    difference whose null is centred on no effect; a null of a level (a random set's proximity) passes its
    own mean."""
    null = np.asarray(null, np.float64).ravel()
    finite = null[np.isfinite(null)]
    out = {
        "null_mean": float(finite.mean()) if len(finite) else None,
        "null_sd": float(finite.std(ddof=1)) if len(finite) > 1 else None,
        "permutations": int(len(null)),
        "undefined_permutations": int(len(null) - len(finite)),
    }
    if observed is None or not np.isfinite(observed) or not len(finite):
        return out | {"p_greater": None, "p_two_sided": None}
    n = len(finite)
    greater = np.sum(finite >= observed - tolerance(observed))
    distance = abs(observed - center)
    extreme = np.sum(np.abs(finite - center) >= distance - tolerance(distance))
    return out | {"p_greater": float((1 + greater) / (1 + n)), "p_two_sided": float((1 + extreme) / (1 + n))}


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of a family of p-values (None: not tested, stays None, not counted).

    The i-th smallest of m p-values becomes max over j <= i of min(1, (m - j + 1) p_(j))."""
    p = [(i, float(v)) for i, v in enumerate(p_values) if v is not None]
    m = len(p)
    out: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (i, v) in enumerate(sorted(p, key=lambda iv: iv[1])):
        running = max(running, min(1.0, (m - rank) * v))
        out[i] = running
    return out


def _log_hypergeom_pmf(x: np.ndarray, population: int, marked: int, drawn: int) -> np.ndarray:
    """log P(X = x) for X ~ hypergeometric: `drawn` items without replacement, `marked` of `population` marked."""

    def log_choose(n, k):
        return special.gammaln(n + 1) - special.gammaln(k + 1) - special.gammaln(n - k + 1)

    return log_choose(marked, x) + log_choose(population - marked, drawn - x) - log_choose(population, drawn)


def _hypergeom_tails(x: int, population: int, marked: int, drawn: int) -> tuple[float, float, float]:
    """(P(X >= x), P(X <= x), two-sided: the total probability of outcomes no likelier than x)."""
    lo, hi = max(0, drawn - (population - marked)), min(drawn, marked)
    support = np.arange(lo, hi + 1)
    pmf = np.exp(_log_hypergeom_pmf(support, population, marked, drawn))
    observed = pmf[x - lo]
    # Outcomes as likely as the observed one up to rounding count as extreme (scipy's fisher_exact does the same).
    two_sided = pmf[pmf <= observed * (1 + 1e-7)].sum()
    greater, less = pmf[support >= x].sum(), pmf[support <= x].sum()
    return float(min(1.0, greater)), float(min(1.0, less)), float(min(1.0, two_sided))


def overlap_test(overlap: int, chosen: int, marked: int, population: int) -> dict:
    """Is a set of `chosen` features, `overlap` of which are among `marked` (of `population` eligible),
    richer in marked features than a random set of its size? The hypergeometric test (features drawn
    independently of the marks: a reference, since correlated features are not independent draws)."""
    for name, value in (("chosen", chosen), ("marked", marked)):
        if not 0 <= value <= population:
            raise ValueError(f"overlap_test: {name}={value} must be in 0..population={population}")
    if not 0 <= overlap <= min(chosen, marked):
        raise ValueError(f"overlap_test: overlap={overlap} must be in 0..min(chosen, marked)={min(chosen, marked)}")
    greater, less, two_sided = _hypergeom_tails(overlap, population, marked, chosen)
    return {
        "overlap": int(overlap),
        "chosen": int(chosen),
        "expected": chosen * marked / population if population else None,
        "p_greater": greater,
        "p_less": less,
        "p_two_sided": two_sided,
    }


def fisher_2x2(overlap_a: int, size_a: int, overlap_b: int, size_b: int) -> dict:
    """Fisher's exact test of two sets' shares of marked features (overlap_a of size_a against overlap_b
    of size_b): odds ratio (None when undefined), one-sided p of a's share being larger, two-sided p."""
    marked = overlap_a + overlap_b
    greater, _, two_sided = _hypergeom_tails(overlap_a, size_a + size_b, marked, size_a)
    a, b, c, d = overlap_a, size_a - overlap_a, overlap_b, size_b - overlap_b
    odds = (a * d) / (b * c) if b * c else None
    return {"odds_ratio": odds, "p_greater": greater, "p_two_sided": two_sided}


def finite_or_none(x) -> float | None:
    """A float, or None when undefined (JSON has no NaN)."""
    return float(x) if x is not None and math.isfinite(x) else None


ALPHA = 0.05


def verdict(p_holm: float | None, effect: float | None, ci=None, *, alpha: float = ALPHA) -> dict:
    """A claim's test in the report's words: supported only when its Holm-adjusted two-sided p is at most
    `alpha` with the effect in the claimed (positive) direction; otherwise "not supported at this power",
    with the effect's interval; an effect significant the other way is said so."""
    interval = "" if not ci else f", 95% CI [{ci[0]:.3g}, {ci[1]:.3g}]"
    if p_holm is None or effect is None:
        return {"supported": False, "text": "not tested (undefined)"}
    if p_holm <= alpha and effect > 0:
        return {"supported": True, "text": f"supported (effect {effect:.3g}{interval}, Holm p {p_holm:.3g})"}
    if p_holm <= alpha:
        return {"supported": False,
                "text": f"not supported: significant in the opposite direction (effect {effect:.3g}{interval}, "
                        f"Holm p {p_holm:.3g})"}  # fmt: skip
    return {"supported": False,
            "text": f"not supported at this power (effect {effect:.3g}{interval}, Holm p {p_holm:.3g})"}  # fmt: skip


# ---------------------------------------------------------------------------- means, differences, power


def mean_interval(values, *, level: float = 0.95) -> dict:
    """The mean of `values` with its t interval (mean +- t_{df} sd / sqrt(n)), the two-sided p of a zero
    mean, n and sd; the interval and p are None with fewer than two values (or when every value is equal)."""
    x = np.asarray([v for v in values if v is not None], np.float64)
    out = {"mean": float(x.mean()) if len(x) else None, "ci": None, "p_two_sided": None, "n": int(len(x)),
           "sd": float(x.std(ddof=1)) if len(x) > 1 else None}  # fmt: skip
    if len(x) < 2 or not out["sd"]:
        return out
    se = out["sd"] / math.sqrt(len(x))
    half = distributions.t.ppf(0.5 + level / 2, len(x) - 1) * se
    p = 2 * distributions.t.sf(abs(out["mean"]) / se, len(x) - 1)
    return out | {"ci": [out["mean"] - half, out["mean"] + half], "p_two_sided": float(p)}


def paired_difference(a, b, *, level: float = 0.95) -> dict:
    """mean(a - b) over paired values with its t interval and the paired t-test's two-sided p."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired values must be two 1-D arrays of one length, got {a.shape} and {b.shape}")
    return mean_interval(a - b, level=level)


def two_sample(a, b, *, level: float = 0.95) -> dict:
    """Student's two-sample t (pooled variance) of mean(a) - mean(b): the difference, its interval, the
    two-sided p and the degrees of freedom; interval and p None without two values a side or any spread."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    out = {"difference": float(a.mean() - b.mean()) if len(a) and len(b) else None, "ci": None,
           "p_two_sided": None, "df": len(a) + len(b) - 2, "n": [int(len(a)), int(len(b))]}  # fmt: skip
    if len(a) < 2 or len(b) < 2:
        return out
    pooled = ((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / out["df"]
    se = math.sqrt(pooled * (1 / len(a) + 1 / len(b)))
    if not se:
        return out
    half = distributions.t.ppf(0.5 + level / 2, out["df"]) * se
    p = 2 * distributions.t.sf(abs(out["difference"]) / se, out["df"])
    return out | {"ci": [out["difference"] - half, out["difference"] + half], "p_two_sided": float(p)}


def minimum_detectable_difference(sigma: float | None, n: int, *, alpha: float = ALPHA, power: float = 0.8):
    """The smallest difference between two means that Student's two-sided two-sample t-test with `n`
    values per arm detects with probability `power` at `alpha`, values having SD `sigma`: the noncentral
    t's power, 1 - F(t_crit; df, ncp) + F(-t_crit; df, ncp) with df = 2n - 2 and ncp = delta / (sigma
    sqrt(2 / n)), solved for delta. None when sigma is undefined or n < 2."""
    if sigma is None or not math.isfinite(sigma) or n < 2:
        return None
    df = 2 * n - 2
    critical = distributions.t.ppf(1 - alpha / 2, df)

    def shortfall(ncp: float) -> float:
        return distributions.nct.sf(critical, df, ncp) + distributions.nct.cdf(-critical, df, ncp) - power

    high = 1.0
    while shortfall(high) < 0:  # power rises with ncp; the noncentral t is NaN far out, so bracket from below
        high *= 2
    ncp = optimize.brentq(shortfall, 0.0, high, xtol=1e-12)
    return float(ncp * sigma * math.sqrt(2 / n))
