"""The study's outputs: summary.json, summary.md (tables) and PNGs (matplotlib, Agg)."""
from __future__ import annotations

import json
import math
import os

from fastcl.lab.study.runs import fn_variant, last_epoch_mean, partner_precision_curve, sepp_variant
from fastcl.lab.study.stats import mean_std, paired_difference

KS = ("200", "20")
CURVE_THRESHOLDS = [round(-0.2 + 0.1 * i, 2) for i in range(12)]  # -0.2 .. 0.9 (centred cosines)


def _save(fig, path: str) -> str:
    """Lay out, write (110 dpi) and close a figure; returns its path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(x: float, sign: bool = False) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else (f"{x:+.2f}" if sign else f"{x:.2f}")


def summarize(results: list[dict], reference: str = "mocov2") -> dict:
    """results: [{variant, seed, knn: {"200", "20"}, ...}] -> per variant mean ± std per k, per-seed values and the
    paired difference to `reference` per k."""
    by = {}
    for r in results:
        by.setdefault(r["variant"], {})[r["seed"]] = r
    ref = by.get(reference, {})
    out = {}
    for v, seeds in by.items():
        entry = {"method": next(iter(seeds.values()))["method"], "seeds": sorted(seeds)}
        for k in KS:
            vals = {s: seeds[s]["knn"][k] for s in sorted(seeds)}
            entry[f"knn{k}"] = {**mean_std(list(vals.values())), "per_seed": vals}
            if v != reference:
                entry[f"diff{k}"] = paired_difference(vals, {s: ref[s]["knn"][k] for s in ref})
        out[v] = entry
    return out


def markdown(a, methods: dict, fn: dict | None, sepp: dict | None) -> str:
    lines = [f"# Study: {a.protocol}, seeds {a.seeds}, {a.epochs} epochs"
             + (f" after a shared {a.warm_epochs}-epoch MoCo-v2 base" if a.warm_epochs else ""), "",
             f"Config `{a.config}`, overrides `{' '.join(a.overrides) or '-'}`. kNN top-1 (%) on the test split, "
             f"mean ± std over seeds; Δ = paired difference to MoCo-v2 (same seed) with its 95 % Student-t CI.", "",
             "| method | kNN k=200 | kNN k=20 | Δ k=200 [95 % CI] | Δ k=20 [95 % CI] | reading (k=200) |",
             "|---|---|---|---|---|---|"]
    for v, e in methods.items():
        cells = [f"{_fmt(e[f'knn{k}']['mean'])} ± {_fmt(e[f'knn{k}']['std'])}" for k in KS]
        diffs, reading = [], "reference"
        for k in KS:
            d = e.get(f"diff{k}")
            diffs.append("—" if d is None else f"{_fmt(d['mean'], True)} [{_fmt(d['ci_low'], True)}, "
                                                f"{_fmt(d['ci_high'], True)}]")
        d = e.get("diff200")
        if d is not None:
            reading = ("fewer than 2 paired seeds: no interval" if d["in_noise"] is None else
                       "inside the noise (CI contains 0)" if d["in_noise"] else
                       ("better than MoCo-v2" if d["mean"] > 0 else "worse than MoCo-v2") + " (CI excludes 0)")
        lines.append(f"| {v} | {cells[0]} | {cells[1]} | {diffs[0]} | {diffs[1]} | {reading} |")
    if fn:
        lines += ["", f"## False-negative precision sweep (degraded oracle, degrade={a.degrade})", "",
                  "| detection precision p | kNN k=200 | Δ vs MoCo-v2 [95 % CI] |", "|---|---|---|"]
        for p in fn["points"]:
            d = p["diff200"]
            lines.append(f"| {p['precision']:g} | {_fmt(p['mean'])} ± {_fmt(p['std'])} | "
                         f"{_fmt(d['mean'], True)} [{_fmt(d['ci_low'], True)}, {_fmt(d['ci_high'], True)}] |")
        ifnd = fn.get("ifnd")
        if ifnd:
            lines.append(f"\nIFND's measured detection precision (fn_masked_precision, last epoch, mean over seeds): "
                         f"{_fmt(ifnd['precision'])}, its kNN k=200 {_fmt(ifnd['knn200'])}.")
    if sepp:
        lines += ["", "## SePP: partner precision against the similarity threshold", "",
                  "| threshold | partner precision | images with a partner |", "|---|---|---|"]
        for c in sepp["curve"]:
            lines.append(f"| {c['threshold']:g} | {_fmt(c['partner_precision'])} | {_fmt(c['images_with_partner'])} |")
        for t in sepp["runs"]:
            lines.append(f"\nSePP at threshold {t['threshold']:g}: kNN k=200 {_fmt(t['mean'])} ± {_fmt(t['std'])}")
    return "\n".join(lines) + "\n"


def _plots(out: str, methods: dict, fn: dict | None, sepp: dict | None) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    names = list(methods)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.bar(names, [methods[v]["knn200"]["mean"] for v in names],
            yerr=[0 if math.isnan(methods[v]["knn200"]["std"]) else methods[v]["knn200"]["std"] for v in names],
            capsize=4, color="tab:blue")
    ax1.set_ylabel("kNN top-1 k=200 (%)")
    ax1.set_title("mean ± std over seeds")
    diffs = [v for v in names if "diff200" in methods[v]]
    for i, v in enumerate(diffs):
        d = methods[v]["diff200"]
        lo, hi = d["ci_low"], d["ci_high"]
        ax2.errorbar(i, d["mean"], yerr=None if math.isnan(lo) else [[d["mean"] - lo], [hi - d["mean"]]], fmt="o",
                     capsize=4)
    ax2.axhline(0, color="gray", lw=1)
    ax2.set_xticks(range(len(diffs)), diffs)
    ax2.set_ylabel("Δ vs MoCo-v2 (points)")
    ax2.set_title("paired difference, 95 % CI")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", rotation=45)
    paths.append(_save(fig, os.path.join(out, "knn.png")))
    if fn:
        fig, ax = plt.subplots(figsize=(6, 4))
        pts = fn["points"]
        ax.errorbar([p["precision"] for p in pts], [p["mean"] for p in pts],
                    yerr=[0 if math.isnan(p["std"]) else p["std"] for p in pts], fmt="o-", capsize=4,
                    label="degraded oracle")
        if fn.get("mocov2") is not None:
            ax.axhline(fn["mocov2"], color="gray", ls="--", label="MoCo-v2")
        ifnd = fn.get("ifnd")
        if ifnd and not math.isnan(ifnd["precision"]):
            ax.plot([ifnd["precision"]], [ifnd["knn200"]], "r*", ms=14, label="IFND (measured precision)")
        ax.set_xlabel("false-negative detection precision p")
        ax.set_ylabel("kNN top-1 k=200 (%)")
        ax.legend()
        paths.append(_save(fig, os.path.join(out, "fn_precision.png")))
    if sepp:
        fig, ax = plt.subplots(figsize=(6, 4))
        c = sepp["curve"]
        ax.plot([x["threshold"] for x in c], [x["partner_precision"] for x in c], "o-", label="partner precision")
        ax.plot([x["threshold"] for x in c], [x["images_with_partner"] for x in c], "s--",
                label="images with a partner")
        ax.set_xlabel("similarity threshold (centred cosine)")
        ax.set_ylabel("share")
        ax2 = ax.twinx()
        ax2.errorbar([t["threshold"] for t in sepp["runs"]], [t["mean"] for t in sepp["runs"]],
                     yerr=[0 if math.isnan(t["std"]) else t["std"] for t in sepp["runs"]], fmt="r*", ms=12,
                     capsize=4, label="SePP kNN k=200")
        ax2.set_ylabel("SePP kNN top-1 k=200 (%)")
        ax.legend(loc="lower left")
        ax2.legend(loc="lower right")
        paths.append(_save(fig, os.path.join(out, "sepp_threshold.png")))
    return paths


def write(a, results: list[dict], tables: dict, out: str) -> str:
    """Write summary.json, summary.md and the PNGs into `out`; returns the summary.json path."""
    methods = summarize(results)
    fn = sepp = None
    if "fn-precision" in a.sweep:
        pts = []
        for p in sorted(set(a.precisions), reverse=True):
            v = fn_variant(p, a.degrade)
            e = methods[v]
            pts.append({"precision": p, "variant": v, "mean": e["knn200"]["mean"], "std": e["knn200"]["std"],
                        "diff200": e["diff200"]})
        runs = [r for r in results if r["variant"] == "ifnd"]
        prec = [last_epoch_mean(r["run_dir"], "fn_masked_precision") for r in runs]
        prec = [x for x in prec if not math.isnan(x)]
        fn = {"degrade": a.degrade, "points": pts,
              "mocov2": methods.get("mocov2", {}).get("knn200", {}).get("mean"),
              "ifnd": {"precision": sum(prec) / len(prec) if prec else float("nan"),
                       "per_seed_precision": prec, "knn200": methods["ifnd"]["knn200"]["mean"]} if runs else None}
    if "sepp-threshold" in a.sweep:
        curves = [partner_precision_curve(t, CURVE_THRESHOLDS) for _, t in sorted(tables.items())]
        curve = []
        for i, th in enumerate(CURVE_THRESHOLDS):
            pp = [c[i]["partner_precision"] for c in curves if not math.isnan(c[i]["partner_precision"])]
            curve.append({"threshold": th, "partner_precision": sum(pp) / len(pp) if pp else float("nan"),
                          "images_with_partner": sum(c[i]["images_with_partner"] for c in curves) / len(curves)})
        sepp = {"curve": curve, "tables": {str(s): t["path"] for s, t in tables.items()},
                "runs": [{"threshold": t, **{k: methods[sepp_variant(t)]["knn200"][k]
                                              for k in ("mean", "std")}} for t in a.sepp_thresholds]}
    summary = {"protocol": a.protocol, "config": a.config, "overrides": list(a.overrides), "seeds": a.seeds,
               "epochs": a.epochs, "warm_epochs": a.warm_epochs, "methods": methods, "fn_precision": fn,
               "sepp_threshold": sepp, "runs": results}
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "summary.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(markdown(a, methods, fn, sepp))
    summary["plots"] = _plots(out, methods, fn, sepp)
    return path
