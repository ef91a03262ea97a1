"""Plots and a markdown summary of run directories.

    python -m fastcl.lab.report RUN_DIR [RUN_DIR ...] [--out DIR]

writes into DIR (default: <first run>/report):

- loss.png         training loss vs step
- lr.png           learning rate vs step
- knn.png          kNN top-1 vs epoch (epoch 0 = the network at random initialisation); skipped when no run has kNN
- diagnostics.png  false-negative diagnostics vs step, one panel per family of keys present in any run
                   (fn_share, fn_masked_precision/recall/f1, pseudo_label_precision_l*, partner_precision,
                   target_same_class_mass, ifnd_rate); skipped when no run logs any
- timing.png       stacked bar per run of the mean seconds per step of each t_* stage plus the untimed rest of the
                   wall time per step (global batch / img/s), median img/s annotated; left in seconds (or ms), right
                   as % of the step; skipped when no run logs stage timings
- report.md        side-by-side tables of the runs (summary, time per stage, diagnostics means), links to the PNGs

`--out FILE.png` keeps the old behaviour: only the loss + kNN figure (`plot_curves`, also used by fastcl.lab.demo).

Smoothing: noisy per-step series (loss, diagnostics) are drawn raw and faint, with a bias-corrected exponential
moving average on top. The EMA span is span = clip(n // 25, 1, 50) logged points for a series of n points
(alpha = 2 / (span + 1)), so a series of < 50 points is not smoothed and a 10k-point one is averaged over ~50
points. The span used is printed in the plot title. Learning rate and kNN are plotted unsmoothed.

metrics.jsonl is read robustly: unparsable lines (e.g. the partial last line of a run still writing) are skipped
with a warning; when a run was resumed, a record for a step logged again replaces the earlier one; a step-0 kNN
record after other records marks a fresh run restarted in the same directory, and the earlier records are dropped.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import warnings
from dataclasses import dataclass, field

# Stage-timing keys in pipeline order; other t_* keys found in the metrics follow, sorted.
STAGES = ["t_data", "t_h2d", "t_ema", "t_forward", "t_gather", "t_assign", "t_backward", "t_forward_backward",
          "t_optimizer", "t_mining"]
STAGE_NAMES = {"t_data": "data wait", "t_h2d": "host→device copy", "t_ema": "EMA teacher update",
               "t_forward": "forward", "t_gather": "all-gather", "t_assign": "target assignment",
               "t_backward": "backward", "t_forward_backward": "forward + backward", "t_optimizer": "optimizer step",
               "t_mining": "negative mining"}
# Fixed stage colors (stable across reports; no grey, which marks the untimed rest); other stages get tab20 colors.
STAGE_COLORS = {"t_data": "tab:blue", "t_h2d": "tab:cyan", "t_ema": "tab:olive", "t_forward": "tab:red",
                "t_gather": "tab:purple", "t_assign": "tab:brown", "t_backward": "tab:pink",
                "t_forward_backward": "tab:orange", "t_optimizer": "tab:green", "t_mining": "gold"}
# Diagnostics panels: (title, y label, keys or a key prefix). A panel is drawn only if some run has its keys.
DIAG_PANELS = [
    ("False-negative share of valid negatives", "share of negatives with the anchor's class (0–1)", ["fn_share"]),
    ("Masked false negatives vs true same-class negatives", "score (0–1)",
     ["fn_masked_precision", "fn_masked_recall", "fn_masked_f1"]),
    ("IFND pseudo-label precision per clustering level", "same-class share of accepted pairs (0–1)",
     "pseudo_label_precision_l"),
    ("SePP partner precision", "share of mined partners with the same class (0–1)", ["partner_precision"]),
    ("Target mass on same-class non-positive columns", "target probability mass (0–1)",
     ["target_same_class_mass"]),
    ("IFND accepted pseudo-label rate (per epoch)", "rate (0–1)", ["ifnd_rate"]),
]
DIAG_LABELS = {"fn_masked_precision": "precision", "fn_masked_recall": "recall", "fn_masked_f1": "F1"}
LINESTYLES = ["-", "--", ":", "-."]
PLOTS = {"loss": "loss.png", "lr": "lr.png", "knn": "knn.png", "diagnostics": "diagnostics.png",
         "timing": "timing.png"}


# ----------------------------------------------------------------------------------------------------- reading


def read_metrics(run_dir: str) -> list[dict]:
    """All records of <run_dir>/metrics.jsonl, in file order. Unparsable lines are skipped with a warning."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: is {run_dir} a fastcl run directory?")
    records = []
    with open(path) as f:
        lines = f.readlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            last = i == len(lines) and not line.endswith("\n")
            warnings.warn(f"{path}:{i}: skipping unparsable line ({e.msg})"
                          + (" - a partial last line: is the run still writing?" if last else ""), stacklevel=2)
            continue
        if not isinstance(rec, dict):
            warnings.warn(f"{path}:{i}: skipping a line that is not a JSON object", stacklevel=2)
            continue
        records.append(rec)
    return records


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def series(records: list[dict], key: str, x: str = "step") -> tuple[list, list]:
    """(xs, ys) of the records holding a finite number under `key` (and a value under `x`)."""
    pts = [(r[x], r[key]) for r in records if _finite(r.get(key)) and r.get(x) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _clean(records: list[dict]) -> list[dict]:
    """Drop records before a fresh restart in the same dir, then keep the last record per (kind, step)."""
    start = 0
    for i, r in enumerate(records):
        if i > 0 and r.get("step") == 0 and r.get("epoch") == 0 and "knn_top1" in r:
            start = i
    by_key: dict = {}
    for r in records[start:]:
        if not isinstance(r.get("step"), (int, float)):
            continue
        kind = "train" if "loss" in r else "knn" if "knn_top1" in r else "other"
        by_key[(kind, r["step"])] = r  # a resumed run logs the steps after its checkpoint again: last one wins
    return sorted(by_key.values(), key=lambda r: (r["step"], "loss" in r))


def _load_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        import yaml

        with open(path) as f:
            d = yaml.safe_load(f)
        return d if isinstance(d, dict) else {}
    except Exception as e:  # a broken config must not stop the report
        warnings.warn(f"{path}: cannot read ({e}); method/arch/batch left blank", stacklevel=2)
        return {}


def _load_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            d = json.load(f)
        return d if isinstance(d, dict) else {}
    except (OSError, json.JSONDecodeError) as e:
        warnings.warn(f"{path}: cannot read ({e}); ignored", stacklevel=2)
        return {}


@dataclass
class Run:
    path: str
    records: list[dict]
    config: dict = field(default_factory=dict)
    result: dict = field(default_factory=dict)
    label: str = ""

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.path))

    def cfg(self, section: str, key: str, default=None):
        v = (self.config.get(section) or {}).get(key, default)
        return default if v is None else v

    @property
    def method(self) -> str:
        return str(self.cfg("method", "name", "?"))

    @property
    def train(self) -> list[dict]:
        return [r for r in self.records if "loss" in r]

    @property
    def knn(self) -> list[dict]:
        return [r for r in self.records if _finite(r.get("knn_top1"))]

    @property
    def finished(self) -> bool:
        return "steps" in self.result


def load_run(run_dir: str) -> Run:
    run = Run(run_dir, _clean(read_metrics(run_dir)), _load_yaml(os.path.join(run_dir, "config.yaml")),
              _load_json(os.path.join(run_dir, "result.json")))
    run.label = f"{run.method} · {run.name}"
    return run


def load_runs(run_dirs: list[str]) -> list[Run]:
    runs = [load_run(d) for d in run_dirs]
    labels = [r.label for r in runs]
    for r in runs:  # same method and dir name (e.g. a/seed0, b/seed0): name them by parent/dir
        if labels.count(r.label) > 1:
            parent = os.path.basename(os.path.dirname(os.path.abspath(r.path)))
            r.label = f"{r.method} · {parent}/{r.name}"
    return runs


# ------------------------------------------------------------------------------------------------- summaries


def ema(ys: list[float], span: int) -> list[float]:
    """Bias-corrected exponential moving average, alpha = 2 / (span + 1); span 1 returns ys unchanged."""
    a, s, w, out = 2.0 / (span + 1), 0.0, 0.0, []
    for y in ys:
        s, w = (1 - a) * s + a * y, (1 - a) * w + a
        out.append(s / w)
    return out


def auto_span(n: int) -> int:
    return max(1, min(50, n // 25))


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def stage_keys(runs: list[Run]) -> list[str]:
    found = {k for run in runs for r in run.train for k in r if k.startswith("t_") and _finite(r[k])}
    return [k for k in STAGES if k in found] + sorted(found - set(STAGES))


def diag_keys(runs: list[Run], spec) -> list[str]:
    found = {k for run in runs for r in run.records for k in r if _finite(r.get(k))}
    if isinstance(spec, str):  # a prefix: pseudo_label_precision_l0, _l1, ... in level order
        ks = [k for k in found if k.startswith(spec) and k[len(spec):].isdigit()]
        return sorted(ks, key=lambda k: int(k[len(spec):]))
    return [k for k in spec if k in found]


def stage_times(run: Run, keys: list[str]) -> dict:
    """Mean seconds per step of each stage. The first logged step (start-up, warm-up) is left out when the run
    logged >= 3 steps with timings."""
    out = {}
    for k in keys:
        ys = series(run.train, k)[1]
        if len(ys) >= 3:
            ys = ys[1:]
        if ys:
            out[k] = _mean(ys)
    return out


def summarize(run: Run, stages: list[str] | None = None) -> dict:
    """The numbers of the report.md row of `run` (None where the run has no data)."""
    train, knn = run.train, run.knn
    losses = series(train, "loss")[1]
    ips = series(train, "img_per_s")[1]
    steps = run.result.get("steps") if run.finished else (train[-1]["step"] if train else 0)
    final_loss = run.result.get("final_loss") if _finite(run.result.get("final_loss")) else (
        losses[-1] if losses else None)
    knn_init = next((r["knn_top1"] for r in knn if r.get("epoch") == 0), None)
    if knn_init is None and _finite(run.result.get("knn_init")):
        knn_init = run.result["knn_init"]
    knn_final = knn[-1]["knn_top1"] if knn else (run.result.get("knn_top1") if _finite(run.result.get("knn_top1"))
                                                 else None)
    times = stage_times(run, stages if stages is not None else stage_keys([run]))
    total = sum(times.values())
    batch = run.cfg("optim", "batch_size")
    med_ips = statistics.median(ips) if ips else None
    # wall seconds per step, averaged like the stage times (first logged window left out when >= 3): each record's
    # img/s covers the log_every steps since the previous record, so global batch / img/s is its mean step time
    step_s = [batch / v for v in ips if v > 0] if isinstance(batch, (int, float)) else []
    wall = _mean(step_s[1:] if len(step_s) >= 3 else step_s)

    def mean_of(key):
        return _mean(series(run.records, key)[1])

    return {
        "run": run.label, "path": run.path, "method": run.method, "arch": str(run.cfg("model", "arch", "?")),
        "batch": batch, "epochs": run.cfg("trainer", "epochs"), "max_steps": run.cfg("trainer", "max_steps", 0),
        "steps": steps, "finished": run.finished, "final_loss": final_loss,
        "knn_init": knn_init, "knn_final": knn_final,
        "knn_delta": knn_final - knn_init if knn_init is not None and knn_final is not None else None,
        "rank_init": next((r["feature_rank"] for r in knn if r.get("epoch") == 0 and "feature_rank" in r), None),
        "rank_final": next((r["feature_rank"] for r in reversed(knn) if "feature_rank" in r), None),
        "median_img_per_s": med_ips,
        "wall_s_per_step": wall,
        "fn_share": mean_of("fn_share"), "fn_masked_precision": mean_of("fn_masked_precision"),
        "fn_masked_recall": mean_of("fn_masked_recall"),
        "diagnostics": {k: mean_of(k) for spec in DIAG_PANELS for k in diag_keys([run], spec[2])},
        "stage_s": times, "stage_total_s": total,
        "stage_share": {k: v / total for k, v in times.items()} if total > 0 else {},
    }


# ---------------------------------------------------------------------------------------------------- plotting


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(n: int) -> list:
    plt = _plt()
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    _plt().close(fig)
    return path


def _draw_smoothed(ax, xs, ys, color, label, style="-") -> int:
    """Faint raw points + EMA line (markers when the series is short). Returns the EMA span used."""
    span = auto_span(len(ys))
    few = len(ys) <= 30
    if span > 1:
        ax.plot(xs, ys, color=color, alpha=0.25, lw=0.8)
        ax.plot(xs, ema(ys, span), color=color, lw=1.8, ls=style, label=label)
    else:
        ax.plot(xs, ys, color=color, lw=1.6, ls=style, marker="o" if few else None, ms=3.5, label=label)
    return span


def _span_note(spans: list[int]) -> str:
    spans = [s for s in spans if s > 1]
    if not spans:
        return ""
    lo, hi = min(spans), max(spans)
    return f"\nfaint: raw; bold: EMA over {lo if lo == hi else f'{lo}–{hi}'} logged points"


def _empty_note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4", wrap=True)


def plot_loss(runs: list[Run], out_png: str) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 5))
    spans = []
    for run, c in zip(runs, _colors(len(runs))):
        xs, ys = series(run.train, "loss")
        if ys:
            spans.append(_draw_smoothed(ax, xs, ys, c, run.label))
    ax.set(title="Training loss" + _span_note(spans), xlabel="optimizer step",
           ylabel="loss (method objective, unitless)")
    ax.grid(alpha=0.3)
    if spans:
        ax.legend(fontsize=9, loc="best")
    else:
        _empty_note(ax, "no training records yet")
    return _save(fig, out_png)


def plot_lr(runs: list[Run], out_png: str) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    n = 0
    for run, c in zip(runs, _colors(len(runs))):
        xs, ys = series(run.train, "lr")
        if ys:
            n += 1
            ax.plot(xs, ys, color=c, lw=1.6, marker="o" if len(ys) <= 30 else None, ms=3.5, label=run.label)
    ax.set(title="Learning rate schedule", xlabel="optimizer step", ylabel="learning rate (per step)")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.grid(alpha=0.3)
    if n:
        ax.legend(fontsize=9, loc="best")
    else:
        _empty_note(ax, "no training records yet")
    return _save(fig, out_png)


def _epoch_axis(ax, runs: list[Run]) -> None:
    """Integer epoch ticks, at least epochs 0..1 shown (a run with only the random-init point stays readable)."""
    hi = max([r.get("epoch", 0) for run in runs for r in run.knn] + [1])
    ax.set_xlim(-0.05 * hi - 0.1, hi * 1.08 + 0.1)
    ax.xaxis.get_major_locator().set_params(integer=True)


def plot_knn(runs: list[Run], out_png: str) -> str | None:
    """kNN top-1 vs epoch; None (no file) when no run has kNN records."""
    if not any(run.knn for run in runs):
        return None
    plt = _plt()
    panels = [("knn_top1", "kNN top-1 on the held-out split (epoch 0 = random initialisation)",
               "top-1 accuracy (%)")]
    if any("feature_rank" in r for run in runs for r in run.knn):
        panels.append(("feature_rank", "effective rank of the held-out features (RankMe; falls on collapse)",
                       "effective rank"))
    fig, axes = plt.subplots(1, len(panels), figsize=(9 * len(panels), 5), squeeze=False)
    for ax, (key, title, ylabel) in zip(axes.flat, panels):
        for run, c in zip(runs, _colors(len(runs))):
            xs, ys = series(run.knn, key, x="epoch")
            if not ys:
                continue
            ax.plot(xs, ys, color=c, lw=1.6, marker="o", ms=5, label=run.label)
            ax.annotate(f"{ys[-1]:.1f}", (xs[-1], ys[-1]), textcoords="offset points", xytext=(6, 0),
                        va="center", fontsize=8, color=c)
        ax.set(title=title, xlabel="epoch", ylabel=ylabel)
        _epoch_axis(ax, runs)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9, loc="best")
    return _save(fig, out_png)


def plot_diagnostics(runs: list[Run], out_png: str) -> str | None:
    """One panel per diagnostics family present in any run; color = run, line style = metric. None if none."""
    panels = [(t, yl, ks) for t, yl, spec in DIAG_PANELS if (ks := diag_keys(runs, spec))]
    if not panels:
        return None
    plt = _plt()
    from matplotlib.lines import Line2D

    ncols = 1 if len(panels) == 1 else 2
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(7.5 * ncols, 4.3 * nrows), squeeze=False)
    colors = _colors(len(runs))
    used_runs = set()
    for ax, (title, ylabel, keys) in zip(axes.flat, panels):
        spans = []
        for i, (run, c) in enumerate(zip(runs, colors)):
            for k, style in zip(keys, LINESTYLES * 8):
                xs, ys = series(run.records, k)
                if ys:
                    used_runs.add(i)
                    spans.append(_draw_smoothed(ax, xs, ys, c, None, style))
        lo, hi = ax.get_ylim()  # all diagnostics are shares in [0, 1]: no padding far outside that
        ax.set_ylim(max(lo, -0.02), min(hi, 1.02))
        ax.set_title(title + _span_note(spans), fontsize=11)
        ax.set(xlabel="optimizer step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        if len(keys) > 1:  # which line style is which metric
            handles = [Line2D([], [], color="0.25", ls=s, lw=1.6) for s in LINESTYLES * 8][:len(keys)]
            names = [DIAG_LABELS.get(k, "level " + k.rsplit("_l", 1)[-1] if "_l" in k else k) for k in keys]
            ax.legend(handles, names, fontsize=8, loc="best")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    run_handles = [Line2D([], [], color=colors[i], lw=2.5) for i in sorted(used_runs)]
    fig.suptitle("False-negative diagnostics (color = run, line style = metric)", fontsize=13)
    fig.tight_layout(rect=(0, (0.15 + 0.22 * math.ceil(len(used_runs) / 3)) / fig.get_figheight(), 1, 1))
    fig.legend(run_handles, [runs[i].label for i in sorted(used_runs)], loc="lower center",
               ncol=min(3, len(run_handles)), fontsize=9, frameon=False)
    return _save(fig, out_png)


def plot_timing(runs: list[Run], out_png: str) -> str | None:
    """Stacked bar per run of the mean time per step of each t_* stage, plus the untimed rest of the wall time per
    step (from img/s); median img/s annotated. Left: absolute time; right: the same bars as % of the step, so
    runs of very different speeds stay readable. None when no run logs stage timings."""
    keys = stage_keys(runs)
    if not keys:
        return None
    plt = _plt()
    from matplotlib.patches import Patch

    sums = [summarize(r, keys) for r in runs]
    walls = [max(s["stage_total_s"], s["wall_s_per_step"] or 0.0) for s in sums]
    scale, unit = (1e3, "ms") if max(walls) < 1.0 else (1.0, "s")  # ms axis for sub-second steps
    extra = [k for k in keys if k not in STAGE_COLORS]
    stage_colors = {**STAGE_COLORS, **{k: plt.get_cmap("tab20")((2 * i + 1) % 20) for i, k in enumerate(extra)}}
    untimed_style = dict(facecolor="0.9", hatch="//", edgecolor="0.6", lw=0.5)
    fig, (ax, ax_pct) = plt.subplots(1, 2, figsize=(14, 2.2 + 0.8 * len(runs)), sharey=True,
                                     gridspec_kw={"width_ratios": [3, 2]})
    ys = list(range(len(runs)))[::-1]  # first run on top
    any_untimed = False
    for y, s, wall in zip(ys, sums, walls):
        segs = [(s["stage_s"].get(k, 0.0), dict(color=stage_colors[k], edgecolor="white", lw=0.5)) for k in keys]
        untimed = wall - s["stage_total_s"]
        if untimed > 0.01 * wall:
            segs.append((untimed, untimed_style))
            any_untimed = True
        left = left_pct = 0.0
        for v, style in segs:
            ax.barh(y, v * scale, left=left, height=0.6, **style)
            ax_pct.barh(y, 100 * v / wall, left=left_pct, height=0.6, **style)
            left, left_pct = left + v * scale, left_pct + 100 * v / wall
        note = f"Σ stages {s['stage_total_s'] * scale:.3g} {unit}"
        if s["wall_s_per_step"]:
            note += f"\nwall {s['wall_s_per_step'] * scale:.3g} {unit}/step"
        if s["median_img_per_s"]:
            note += f"\n{s['median_img_per_s']:,.0f} img/s (median)"
        ax.annotate(note, (left, y), xytext=(5, 0), textcoords="offset points", va="center", fontsize=8.5)
    ax.set_yticks(ys, [r.label for r in runs])
    ax.set_xlim(0, max(walls) * scale * 1.4 or 1)
    ax.set(title="Mean time per step by stage", xlabel=f"time per step ({unit})")
    ax_pct.set(title="Share of the step", xlabel="share of wall time per step (%)", xlim=(0, 100))
    for a in (ax, ax_pct):
        a.grid(axis="x", alpha=0.3)
        a.set_ylim(-0.6, len(runs) - 0.4)
    handles = [Patch(color=stage_colors[k], label=STAGE_NAMES.get(k, k)) for k in keys]
    if any_untimed:
        handles.append(Patch(label="untimed (wall time from img/s − Σ stages)", **untimed_style))
    fig.suptitle("Training step time by stage (means over logged steps, first logged step left out as warm-up)",
                 fontsize=12)
    rows = math.ceil(len(handles) / 4)
    fig.tight_layout(rect=(0, (0.15 + 0.22 * rows) / fig.get_figheight(), 1, 1))
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=9, frameon=False)
    return _save(fig, out_png)


def plot_curves(run_dirs: list[str], out_png: str) -> str:
    """Loss vs step and kNN top-1 vs epoch side by side, one line per run (used by `fastcl.lab.demo`). Returns the
    PNG path."""
    plt = _plt()
    runs = load_runs(run_dirs)
    fig, (ax_loss, ax_knn) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors, spans = _colors(len(runs)), []
    for run, c in zip(runs, colors):
        xs, ys = series(run.train, "loss")
        if ys:
            spans.append(_draw_smoothed(ax_loss, xs, ys, c, run.label))
        xs, ys = series(run.knn, "knn_top1", x="epoch")
        if ys:
            ax_knn.plot(xs, ys, color=c, marker="o", lw=1.6, label=run.label)
    ax_loss.set(title="Training loss" + _span_note(spans), xlabel="optimizer step",
                ylabel="loss (method objective, unitless)")
    ax_knn.set(title="kNN top-1 on the held-out split", xlabel="epoch (0 = random init)",
               ylabel="top-1 accuracy (%)")
    _epoch_axis(ax_knn, runs)
    for ax in (ax_loss, ax_knn):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=9)
        else:
            _empty_note(ax, "no records")
    fig.tight_layout()
    return _save(fig, out_png)


# ---------------------------------------------------------------------------------------------------- markdown


def _f(v, fmt: str, empty: str = "–") -> str:
    return empty if v is None else format(v, fmt)


def _md_row(cells) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def _table(header: list[str], rows: list[list]) -> list[str]:
    return [_md_row(header), "|" + "|".join("---" for _ in header) + "|"] + [_md_row(r) for r in rows]


def _knn_cell(s: dict) -> str:
    if s["knn_final"] is None:
        return "–"
    if s["knn_init"] is None:
        return f"{s['knn_final']:.2f}"
    return f"{s['knn_init']:.2f} → {s['knn_final']:.2f} ({s['knn_delta']:+.2f})"


def _rank_cell(s: dict) -> str:
    if s["rank_final"] is None:
        return "–"
    return f"{s['rank_init']:.1f} → {s['rank_final']:.1f}" if s["rank_init"] is not None else f"{s['rank_final']:.1f}"


def _length_cell(s: dict) -> str:
    ep = f"{s['epochs']} ep / " if s["epochs"] is not None else ""
    cap = f" (max_steps {s['max_steps']})" if s["max_steps"] else ""
    return f"{ep}{s['steps']} steps{cap}" + ("" if s["finished"] else " (running)")


def write_markdown(runs: list[Run], pngs: dict, out_md: str) -> str:
    stages = stage_keys(runs)
    sums = [summarize(r, stages) for r in runs]
    out_dir = os.path.dirname(os.path.abspath(out_md))
    lines = ["# fastcl run report", ""]
    lines += [f"- `{r.label}`: `{os.path.abspath(r.path)}`" for r in runs] + [""]
    lines += ["## Summary", ""]
    lines += _table(
        ["run", "method", "arch", "batch", "epochs / steps", "final loss", "kNN top-1 % init → final (Δ)",
         "median img/s", "mean FN share", "mean masked-FN precision", "mean masked-FN recall",
         "time shares (% of Σ stages)", "feature rank init → final"],
        [[s["run"], s["method"], s["arch"], _f(s["batch"], "d") if isinstance(s["batch"], int) else "–",
          _length_cell(s), _f(s["final_loss"], ".4f"), _knn_cell(s), _f(s["median_img_per_s"], ".1f"),
          _f(s["fn_share"], ".3f"), _f(s["fn_masked_precision"], ".3f"), _f(s["fn_masked_recall"], ".3f"),
          ", ".join(f"{k[2:]} {100 * v:.0f}%" for k, v in s["stage_share"].items()) or "–", _rank_cell(s)]
         for s in sums])
    lines += ["", "Means are over all logged steps; img/s is the median over logging windows. "
              "FN share: share of valid negative candidates with the anchor's true class. "
              "Masked-FN precision/recall: detected false negatives vs true same-class negatives. "
              "Feature rank: effective rank (RankMe) of the held-out backbone features at each kNN evaluation; "
              "a collapsing run loses rank."]
    if stages:
        lines += ["", "## Time per step by stage", "",
                  "Mean seconds per step of each stage (first logged step excluded as warm-up) and its share "
                  "of Σ stages; wall = mean over the same steps of global batch / img/s (the whole step, untimed work "
                  "included).", ""]
        lines += _table(
            ["run"] + [STAGE_NAMES.get(k, k) + f" (`{k}`)" for k in stages] + ["Σ stages", "wall / step"],
            [[s["run"]] + [f"{s['stage_s'][k]:.4g} s ({100 * s['stage_share'].get(k, 0):.0f}%)"
                           if k in s["stage_s"] else "–" for k in stages]
             + [f"{s['stage_total_s']:.4g} s", _f(s["wall_s_per_step"], ".4g") + (" s" if s["wall_s_per_step"]
                                                                                   else "")] for s in sums])
    dkeys = [k for t, yl, spec in DIAG_PANELS for k in diag_keys(runs, spec)]
    if dkeys:
        lines += ["", "## Diagnostics (mean over logged steps)", ""]
        lines += _table(["run"] + [f"`{k}`" for k in dkeys],
                        [[s["run"]] + [_f(s["diagnostics"].get(k), ".3f") for k in dkeys] for s in sums])
    if not any(r.knn for r in runs):
        lines += ["", "No run has kNN evaluations (trainer.knn_every=0?): no kNN plot."]
    lines += ["", "## Plots", ""]
    titles = {"loss": "Training loss vs step", "lr": "Learning rate vs step", "knn": "kNN top-1 vs epoch",
              "diagnostics": "False-negative diagnostics vs step", "timing": "Time per step by stage"}
    for key, png in pngs.items():
        if png:
            rel = os.path.relpath(os.path.abspath(png), out_dir)
            lines += [f"### {titles[key]}", "", f"[{rel}]({rel})", "", f"![{titles[key]}]({rel})", ""]
    with open(out_md, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    return out_md


def report(run_dirs: list[str], out_dir: str | None = None) -> dict:
    """Write the PNGs and report.md of `run_dirs` into `out_dir` (default <first run>/report). Returns
    {"loss": png, "lr": png, "knn": png or None, "diagnostics": png or None, "timing": png or None,
    "report": md path}."""
    if not run_dirs:
        raise ValueError("no run directories given")
    runs = load_runs(run_dirs)
    out_dir = out_dir or os.path.join(run_dirs[0], "report")
    os.makedirs(out_dir, exist_ok=True)
    p = {k: os.path.join(out_dir, v) for k, v in PLOTS.items()}
    pngs = {"loss": plot_loss(runs, p["loss"]), "lr": plot_lr(runs, p["lr"]), "knn": plot_knn(runs, p["knn"]),
            "diagnostics": plot_diagnostics(runs, p["diagnostics"]), "timing": plot_timing(runs, p["timing"])}
    for k, png in pngs.items():  # a plot skipped now must not leave a stale file from an earlier report
        if png is None and os.path.isfile(p[k]):
            os.remove(p[k])
    return {**pngs, "report": write_markdown(runs, pngs, os.path.join(out_dir, "report.md"))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastcl.lab.report",
                                 description="plots and a markdown summary comparing fastcl run directories")
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR")
    ap.add_argument("--out", default=None,
                    help="output folder (default: <first run>/report); a path ending in .png writes only the "
                         "loss + kNN figure there, as before")
    a = ap.parse_args(argv)
    warnings.formatwarning = lambda msg, cat, *args, **kw: f"warning: {msg}\n"  # CLI: no source-line noise
    try:
        if a.out and a.out.lower().endswith(".png"):
            print(plot_curves(a.runs, a.out))
            return 0
        out = report(a.runs, a.out)
    except FileNotFoundError as e:
        ap.exit(2, f"error: {e}\n")
    for k, v in out.items():
        if v:
            print(f"{k:12s} {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
