"""Seed statistics of a study: mean ± std per method and the paired difference to a reference (pure functions)."""
from __future__ import annotations

import math


def mean_std(values: list[float]) -> dict:
    """{"mean", "std" (sample, ddof 1; nan for one value), "n"} of a list of numbers."""
    n = len(values)
    if n == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    m = sum(values) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return {"mean": m, "std": sd, "n": n}


def paired_difference(method: dict[int, float], reference: dict[int, float], level: float = 0.95) -> dict:
    """Paired difference method − reference over the seeds both have (a pair shares data order and init).

    method, reference: {seed: value} -> {"mean", "std", "n", "ci_low", "ci_high", "seeds", "in_noise"}: the
    Student-t confidence interval of the mean difference (n - 1 degrees of freedom); `in_noise` is True when the
    interval contains 0 (the difference is not distinguishable from seed noise), None when n < 2 (no interval).
    """
    from scipy import stats

    seeds = sorted(set(method) & set(reference))
    d = [method[s] - reference[s] for s in seeds]
    out = {**mean_std(d), "seeds": seeds, "ci_low": float("nan"), "ci_high": float("nan"), "in_noise": None}
    if len(d) >= 2:
        half = float(stats.t.ppf(0.5 + level / 2, len(d) - 1)) * out["std"] / math.sqrt(len(d))
        out.update(ci_low=out["mean"] - half, ci_high=out["mean"] + half,
                   in_noise=bool(out["mean"] - half <= 0 <= out["mean"] + half))
    return out
