"""The payoff map of the ladder protocol: per rung (a MoCo-v2 base of known kNN) and method, the paired
difference to MoCo-v2 after the same E1 epochs, beside the rung's label-assignment diagnostics; the break-even
false-negative precision at one rung. Writes <ladder>/map.json, map.md and map.png.

Multiple comparisons: a map of M methods over R rungs makes M·R comparisons with MoCo-v2, so some 95 % intervals
exclude 0 by chance (about one in twenty when no method changes anything). Every cell therefore also carries the
Bonferroni interval (level 1 − 0.05 / (M·R)); the reading names a rung only when its interval excludes 0 and says
whether the Bonferroni interval does too.
"""
from __future__ import annotations

import json
import math
import os

from fastcl.lab.study.runs import last_epoch_mean
from fastcl.lab.study.stats import paired_difference

REFERENCE = "mocov2"


def _mean(xs) -> float:
    xs = [x for x in xs if not (x is None or math.isnan(x))]
    return sum(xs) / len(xs) if xs else float("nan")


def rung_diagnostics(results: list[dict], partner_precision: float | None) -> dict:
    """Label-assignment quality at one rung (true labels, read for the report only), means over seeds:
    IFND's detection precision / recall (fn_masked_*), the share of same-class candidates among MoCo-v2's
    negatives (fn_share: the queue plus the batch's keys) and SePP's partner precision (its mined table at the
    threshold it trains with, passed in)."""
    def runs(v):
        return [r["run_dir"] for r in results if r["variant"] == v]
    return {"ifnd_precision": _mean(last_epoch_mean(d, "fn_masked_precision") for d in runs("ifnd")),
            "ifnd_recall": _mean(last_epoch_mean(d, "fn_masked_recall") for d in runs("ifnd")),
            "queue_same_class": _mean(last_epoch_mean(d, "fn_share") for d in runs(REFERENCE)),
            "sepp_partner_precision": float("nan") if partner_precision is None else partner_precision}


def _by_variant(results: list[dict], k: str, pair) -> dict[str, dict]:
    """variant -> {pair(run): kNN top-1 at k}; `pair` keys a run by what it shares with its MoCo-v2 partner."""
    by: dict[str, dict] = {}
    for r in results:
        by.setdefault(r["variant"], {})[pair(r)] = r["knn"][k]
    return by


def corrected(method: dict, reference: dict, level_b: float) -> dict:
    """The 95 % paired difference (stats.paired_difference) with the Bonferroni interval at level_b beside it."""
    b = paired_difference(method, reference, level_b)
    return {**paired_difference(method, reference, 0.95),
            "bonferroni": {"ci_low": b["ci_low"], "ci_high": b["ci_high"]}}


def differences(results: list[dict], k: str, level_b: float | None = None) -> dict[str, dict]:
    """variant -> paired difference to MoCo-v2 of kNN top-1 at k (one rung's results, pairs = seeds) at 95 %, with
    its Bonferroni interval at level_b when given."""
    by = _by_variant(results, k, lambda r: r["seed"])
    ref = by.get(REFERENCE, {})
    return {v: paired_difference(vals, ref, 0.95) if level_b is None else corrected(vals, ref, level_b)
            for v, vals in by.items() if v != REFERENCE}


def pooled(results: list[dict], methods: list[str], k: str = "200") -> dict[str, dict]:
    """variant -> its paired difference to MoCo-v2 pooled over every rung: the pairs are (rung, seed), so R rungs
    of S seeds give R·S pairs and R·S − 1 degrees of freedom. It answers "does the method change kNN on average
    over this ladder", which no single rung's 3 seeds can settle once corrected; the spread between rungs counts
    as noise, so a gain that exists at some rungs only is diluted, not invented. Each carries its Bonferroni
    interval over the len(methods) pooled comparisons. A summary added beside the per-rung reading, not in place
    of it.

    The R·S pairs count as independent, yet a seed fixes the continuation's augmentations and order at every
    rung. `by_seed` is the check that needs no such assumption: each seed's difference averaged over the rungs
    first, so S pairs and S − 1 degrees of freedom (with 3 seeds an erratic interval: three close means give a
    narrow one by luck), with its own Bonferroni interval."""
    by = _by_variant(results, k, lambda r: (r["rung"], r["seed"]))
    ref = by.get(REFERENCE, {})
    level_b = 1 - 0.05 / max(1, len(methods))

    def seed_means(vals: dict) -> dict[int, float]:
        per: dict[int, list[float]] = {}
        for (_, seed), x in vals.items():
            per.setdefault(seed, []).append(x)
        return {seed: sum(xs) / len(xs) for seed, xs in per.items()}

    # by_seed averages MoCo-v2 over the same rungs as the method at each seed
    return {v: {**corrected(by[v], ref, level_b),
                "by_seed": corrected(seed_means(by[v]), seed_means({p: x for p, x in ref.items() if p in by[v]}),
                                     level_b)}
            for v in methods if v in by}


def break_even(points: list[dict]) -> dict:
    """points: [{"precision", "diff"}] of the degraded-oracle sweep at one rung -> the break-even reading.

    `interpolated`: the precision where the mean paired difference crosses 0 going down from p = 1 (linear
    between neighbouring sweep points), None when the oracle itself (p = 1) does not gain or the curve never
    crosses; `lowest_paying`: the lowest p whose 95 % interval lies above 0 with every higher p's, None if p = 1's
    does not."""
    pts = sorted(points, key=lambda p: -p["precision"])
    out = {"interpolated": None, "lowest_paying": None}
    if not pts or pts[0]["precision"] != 1 or not pts[0]["diff"]["mean"] > 0:
        return out
    for hi, lo in zip(pts, pts[1:]):
        a, b = hi["diff"]["mean"], lo["diff"]["mean"]
        if b <= 0 < a:
            out["interpolated"] = lo["precision"] + (hi["precision"] - lo["precision"]) * (-b) / (a - b)
            break
    for p in pts:
        if not p["diff"]["ci_low"] > 0:
            break
        out["lowest_paying"] = p["precision"]
    return out


def sweep_rung(rungs: list[int], oracle_diff: dict[int, dict]) -> int:
    """The rung of the break-even sweep: the lowest whose oracle interval lies above 0, else the top rung."""
    paying = [r for r in sorted(rungs) if oracle_diff.get(r, {}).get("ci_low", float("nan")) > 0]
    return paying[0] if paying else max(rungs)


def build(rungs: list[dict], results: list[dict], partner_precision: dict[int, float | None],
          sweep: dict | None, methods: list[str]) -> dict:
    """The map: rungs ([{epoch, knn, linear_top1}] from rungs.json), results (every continuation's
    {variant, method, seed, rung, knn, run_dir}), SePP partner precision per rung, the sweep ({"rung", "points"}
    of {precision, variant}) or None; `methods`: the map's lines (variants other than MoCo-v2)."""
    done = [r for r in rungs if any(x["rung"] == r["epoch"] for x in results)]
    m = max(1, len(methods) * len(done))
    level_b = 1 - 0.05 / m
    rows = []
    for rung in done:
        res = [x for x in results if x["rung"] == rung["epoch"]]
        d = differences(res, "200", level_b)
        ref = [x["knn"]["200"] for x in res if x["variant"] == REFERENCE]
        rows.append({"epoch": rung["epoch"], "rung_knn": rung["knn"]["200"], "rung_linear": rung.get("linear_top1"),
                     "mocov2_knn": _mean(ref), "seeds": sorted({x["seed"] for x in res}),
                     "diff": {v: d[v] for v in methods if v in d},
                     "diagnostics": rung_diagnostics(res, partner_precision.get(rung["epoch"]))})
    readings = {}
    for v in methods:
        first = next((row for row in rows if v in row["diff"] and row["diff"][v]["in_noise"] is False), None)
        if first is None:
            readings[v] = {"rung": None, "text": f"no rung's 95 % interval excludes 0 ({len(rows)} rungs)"}
            continue
        d = first["diff"][v]
        b = d["bonferroni"]
        survives = b["ci_low"] > 0 or b["ci_high"] < 0
        readings[v] = {"rung": first["epoch"], "sign": "gain" if d["mean"] > 0 else "loss", "survives": survives,
                       "text": f"{'gains' if d['mean'] > 0 else 'loses'} {d['mean']:+.2f} [{d['ci_low']:+.2f}, "
                               f"{d['ci_high']:+.2f}] from rung e{first['epoch']} (kNN {first['rung_knn']:.1f}); "
                               + ("survives" if survives else "does not survive")
                               + f" the Bonferroni correction over {m} comparisons"}
    out = {"comparisons": m, "bonferroni_level": level_b, "methods": methods, "rows": rows, "readings": readings,
           "pooled": pooled(results, methods), "break_even": None}
    if sweep:
        res = [x for x in results if x["rung"] == sweep["rung"]]
        d95 = differences(res, "200")
        pts = [{"precision": p["precision"], "variant": p["variant"], "diff": d95[p["variant"]]}
               for p in sweep["points"] if p["variant"] in d95]
        row = next((r for r in rows if r["epoch"] == sweep["rung"]), None)
        out["break_even"] = {"rung": sweep["rung"], "points": pts, **break_even(pts),
                             "ifnd_precision": row["diagnostics"]["ifnd_precision"] if row else float("nan"),
                             "ifnd_diff": d95.get("ifnd")}
    return out


def _ci(d: dict | None, bonf: bool = True) -> str:
    if d is None:
        return "—"
    if math.isnan(d["ci_low"]):
        return f"{d['mean']:+.2f}"
    b = d.get("bonferroni")
    star = "**" if bonf and b and (b["ci_low"] > 0 or b["ci_high"] < 0) else ("*" if not d["in_noise"] else "")
    return f"{d['mean']:+.2f} [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]{star}"


def _f(x, fmt=".2f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def markdown(mp: dict, epochs: int) -> str:
    meths = mp["methods"]
    lines = [f"# Payoff map: every method {epochs} epoch(s) from every rung, paired to MoCo-v2", "",
             "Δ = kNN top-1 (k = 200, full test split) minus MoCo-v2's after the same continuation, same seed; mean "
             "[95 % Student-t interval]. `*`: the 95 % interval excludes 0; `**`: the Bonferroni interval over "
             f"{mp['comparisons']} comparisons (level {mp['bonferroni_level']:.4f}) excludes 0 too.", "",
             "| rung | rung kNN | rung linear | MoCo-v2 after | " + " | ".join(f"Δ {v}" for v in meths)
             + " | IFND precision / recall | SePP partner precision | same-class negatives |",
             "|---" * (4 + len(meths) + 3) + "|"]
    for r in mp["rows"]:
        g = r["diagnostics"]
        lines.append(f"| e{r['epoch']} | {_f(r['rung_knn'])} | {_f(r['rung_linear'])} | {_f(r['mocov2_knn'])} | "
                     + " | ".join(_ci(r["diff"].get(v)) for v in meths)
                     + f" | {_f(g['ifnd_precision'], '.3f')} / {_f(g['ifnd_recall'], '.3f')} | "
                       f"{_f(g['sepp_partner_precision'], '.3f')} | {_f(g['queue_same_class'], '.3f')} |")
    lines += ["", "Reading per method (lowest rung whose 95 % interval excludes 0):", ""]
    lines += [f"- **{v}**: {mp['readings'][v]['text']}" for v in meths]
    pool = mp.get("pooled") or {}
    if pool:
        lines += ["", f"Pooled over the {len(mp['rows'])} rungs (pairs = rung × seed; `**`: the Bonferroni interval "
                      f"over the {len(meths)} pooled comparisons excludes 0 too):", ""]
        lines += [f"- **{v}**: {_ci(pool[v])} ({pool[v]['n']} pairs); seeds as the unit (each seed's Δ averaged "
                  f"over the rungs first): {_ci(pool[v]['by_seed'])}" for v in meths if v in pool]
    be = mp.get("break_even")
    if be:
        lines += ["", f"## Break-even false-negative precision at rung e{be['rung']}", "",
                  "| detection precision p | Δ vs MoCo-v2 [95 % CI] |", "|---|---|"]
        lines += [f"| {p['precision']:g} | {_ci(p['diff'], False)} |" for p in be["points"]]
        lines += ["", f"IFND's measured precision at this rung: {_f(be['ifnd_precision'], '.3f')}, its Δ "
                      f"{_ci(be['ifnd_diff'], False)}."]
        if be["interpolated"] is None:
            lines.append("No break-even precision: the oracle (p = 1) does not gain here, or the curve never "
                         "crosses 0." if not be["points"] or not be["points"][0]["diff"]["mean"] > 0 else
                         "The mean gain stays above 0 down to the lowest precision swept.")
        else:
            lines.append(f"Break-even precision (mean Δ crosses 0, linear between sweep points): "
                         f"{be['interpolated']:.2f}; lowest p whose interval (and every higher p's) lies above 0: "
                         f"{_f(be['lowest_paying'], 'g')}.")
    return "\n".join(lines) + "\n"


FAR = 5.0  # points: a Δ beyond this is drawn at the plot's edge with its value written (our choice)


def y_range(mp: dict) -> tuple[float, float]:
    """The plot's Δ axis: 0 and every 95 % interval whose mean lies within ±FAR, with a margin, so that one method
    that loses 20 points (DCL on the queue) does not flatten every other line into the zero line."""
    vals = [0.0]
    for r in mp["rows"]:
        for d in r["diff"].values():
            if abs(d["mean"]) <= FAR:
                vals += [x for x in (d["mean"], d["ci_low"], d["ci_high"]) if not math.isnan(x)]
    lo, hi = min(vals), max(vals)
    pad = 0.1 * (hi - lo) + 0.1
    return lo - pad, hi + pad


def inside(e: dict, rng: tuple[float, float]) -> bool:
    """Whether a cell's mean lies on the plot's Δ axis (rng from y_range)."""
    return rng[0] <= e["mean"] <= rng[1]


def off_axis(mp: dict, rng: tuple[float, float] | None = None) -> list[str]:
    """One line per method with a Δ outside the axis (rng, default y_range): its rungs' values and intervals, for
    the note under the plot."""
    lo, hi = rng or y_range(mp)
    far: dict[str, list[str]] = {}
    for v in mp["methods"]:
        for r in mp["rows"]:
            e = r["diff"].get(v)
            if e is not None and not inside(e, (lo, hi)):
                far.setdefault(f"{v} ({'▲' if e['mean'] > hi else '▼'})", []).append(
                    f"rung {r['rung_knn']:.1f}: {e['mean']:+.1f} [{e['ci_low']:+.1f}, {e['ci_high']:+.1f}]")
    return [f"off the axis, {k}: " + "; ".join(vs) for k, vs in far.items()]


def plot(mp: dict, path: str) -> str:
    """Gain (paired Δ with its 95 % interval) against the rung's kNN, one line per method; a Δ off the axis
    (y_range) is a triangle at the edge, and its value and interval are listed under the plot (labels beside the
    triangles collide when rungs lie close together)."""
    import textwrap

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    lo, hi = y_range(mp)
    n = len(mp["methods"])
    for i, v in enumerate(mp["methods"]):
        rows = [r for r in mp["rows"] if v in r["diff"]]
        x = [r["rung_knn"] + 0.15 * (i - (n - 1) / 2) for r in rows]  # dodge overlapping bars
        d = [r["diff"][v] for r in rows]
        on = [inside(e, (lo, hi)) for e in d]
        y = [e["mean"] if ok else float("nan") for e, ok in zip(d, on)]  # nan: a gap in the line
        err = [[0 if math.isnan(e["ci_low"]) or not ok else e["mean"] - e["ci_low"] for e, ok in zip(d, on)],
               [0 if math.isnan(e["ci_high"]) or not ok else e["ci_high"] - e["mean"] for e, ok in zip(d, on)]]
        line = ax.errorbar(x, y, yerr=err, fmt="o-", capsize=3, label=v)
        for xi, e, ok in zip(x, d, on):
            if not ok:
                up = e["mean"] > hi
                edge = hi - 0.04 * (hi - lo) if up else lo + 0.04 * (hi - lo)  # just inside the axes
                ax.plot([xi], [edge], marker="^" if up else "v", color=line[0].get_color(), ms=9)
    ax.set_ylim(lo, hi)
    ax.axhline(0, color="gray", lw=1)
    ax.set_xlabel("rung: MoCo-v2 base kNN top-1 (%)")
    ax.set_ylabel("Δ kNN vs MoCo-v2 (points, 95 % CI)")
    ax.set_title("where label-assignment fixes pay")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    note = [ln for far in off_axis(mp, (lo, hi)) for ln in textwrap.wrap(far, 120, subsequent_indent="    ")]
    if note:
        fig.text(0.01, 0.01, "\n".join(note), fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, 0.035 * len(note), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(mp: dict, epochs: int, root: str) -> str:
    """map.json, map.md and map.png under `root`; returns the map.json path."""
    path = os.path.join(root, "map.json")
    with open(path, "w") as f:
        json.dump({"epochs": epochs, **mp}, f, indent=1)
    with open(os.path.join(root, "map.md"), "w") as f:
        f.write(markdown(mp, epochs))
    if mp["rows"]:
        plot(mp, os.path.join(root, "map.png"))
    return path
