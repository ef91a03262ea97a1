"""Plots and summaries of run directories: `python -m fastcl.report RUN_DIR [RUN_DIR ...] [--out DIR]`."""
from __future__ import annotations

import argparse
import json
import os


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: is {run_dir} a fastcl run directory?")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def series(records: list[dict], key: str, x: str = "step") -> tuple[list, list]:
    pts = [(r[x], r[key]) for r in records if key in r and r[key] is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_curves(run_dirs: list[str], out_png: str) -> str:
    """Loss vs step and kNN top-1 vs epoch, one line per run. Returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_knn) = plt.subplots(1, 2, figsize=(11, 4))
    for rd in run_dirs:
        rec, name = read_metrics(rd), os.path.basename(os.path.normpath(rd))
        ax_loss.plot(*series(rec, "loss"), label=name)
        ax_knn.plot(*series(rec, "knn_top1", x="epoch"), marker="o", label=name)
    ax_loss.set(title="training loss", xlabel="step", ylabel="soft cross-entropy")
    ax_knn.set(title="kNN top-1 on the held-out split", xlabel="epoch (0 = random init)", ylabel="top-1 (%)")
    for ax in (ax_loss, ax_knn):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="plot fastcl runs")
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--out", default=None, help="PNG path (default: <first run>/curves.png)")
    a = ap.parse_args(argv)
    print(plot_curves(a.runs, a.out or os.path.join(a.runs[0], "curves.png")))


if __name__ == "__main__":
    main()
