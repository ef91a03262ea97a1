"""t-SNE map of a run's backbone features, coloured by class: `python -m fastcl.eval.tsne`.

    python -m fastcl.eval.tsne --checkpoint RUN --data VAL_FOLDER [--which teacher] [--max-images 2000]
                               [--perplexity 30] [--seed 0] [--out tsne.png]

Features come from the shared feature cache of the evaluation commands (eval transform, no augmentation), are
L2-normalised, reduced to at most 50 dimensions by PCA (the usual t-SNE preprocessing, for speed and to drop
noise), then embedded in 2-D by scikit-learn's (Barnes-Hut) t-SNE. Writes the PNG, an `.npz`
next to it (coordinates [N, 2], sample ids = rows of the folder in scan order, labels, class names) and prints a
JSON summary line. Labels only colour the plot: they never reach the embedding.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
import torch.nn.functional as F


def embed_2d(feats: torch.Tensor, perplexity: float = 30.0, seed: int = 0, pca_dim: int = 50) -> np.ndarray:
    """t-SNE coordinates of features. [N, D] -> [N, 2] float32 (deterministic for a seed)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    n = feats.shape[0]
    if not 1 <= perplexity < n:
        raise ValueError(f"--perplexity must be in [1, number of images = {n}), got {perplexity}")
    x = F.normalize(feats.float(), dim=1).numpy()
    k = min(pca_dim, x.shape[1], n)
    if k < x.shape[1]:
        x = PCA(n_components=k, random_state=seed).fit_transform(x)
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed)
    return tsne.fit_transform(x).astype(np.float32)


def pick(n: int, max_images: int, seed: int) -> torch.Tensor:
    """Row ids of the images to map: all when n <= max_images, else a seeded random subset (sorted)."""
    if max_images <= 0 or n <= max_images:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_images].sort().values


def plot(xy: np.ndarray, labels: np.ndarray, classes: list[str], title: str, out_png: str) -> str:
    """Scatter of the 2-D map, one colour per class, legend with the class names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 7.5))
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    size = max(2.0, min(14.0, 8000.0 / max(1, len(xy))))
    for c, name in enumerate(classes):
        m = labels == c
        if m.any():
            ax.scatter(xy[m, 0], xy[m, 1], s=size, color=cmap(c % cmap.N), label=name, alpha=0.8, linewidths=0)
    if (labels < 0).any():  # a flat folder has no classes
        ax.scatter(xy[labels < 0, 0], xy[labels < 0, 1], s=size, color="0.4", alpha=0.8, linewidths=0)
    ax.set(title=title, xticks=[], yticks=[])
    if len(classes):
        ax.legend(fontsize=8, markerscale=max(1.0, 20 / size), loc="center left", bbox_to_anchor=(1.0, 0.5),
                  frameon=False)
    fig.tight_layout()
    fig.savefig(out_png, dpi=130)
    plt.close(fig)
    return out_png


def main(argv=None) -> int:
    from fastcl.eval.linear import add_checkpoint_args, cached_features, checkpoint_context

    ap = argparse.ArgumentParser(prog="python -m fastcl.eval.tsne", description=__doc__.split("\n")[0])
    add_checkpoint_args(ap)
    ap.add_argument("--data", required=True, help="image folder to map (class sub-folders colour the points)")
    ap.add_argument("--max-images", type=int, default=2000, help="random subset size (0 = all images)")
    ap.add_argument("--perplexity", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=None, help="feature cache folder (default <run>/eval/features; '' = none)")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="decode threads")
    ap.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    ap.add_argument("--out", default=None, help="PNG path (default <run>/eval/tsne_<which>.png)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.max_images < 0:
        ap.error(f"--max-images must be >= 0, got {args.max_images}")
    ck, run_dir, _ = checkpoint_context(args.checkpoint)
    fs, hit = cached_features(args.checkpoint, args.data, which=args.which, cache_dir=args.cache,
                              workers=args.workers, device=torch.device(args.device) if args.device else None,
                              progress=not args.no_progress)
    rows = pick(fs.feats.shape[0], args.max_images, args.seed)
    xy = embed_2d(fs.feats[rows], args.perplexity, args.seed)
    labels = fs.labels[rows].numpy()
    out = args.out or os.path.join(run_dir, "eval", f"tsne_{args.which}.png")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    title = f"t-SNE of {os.path.basename(run_dir)} ({args.which}), {len(rows)} images of {os.path.basename(fs.root)}"
    plot(xy, labels, list(fs.classes), title, out)
    npz = os.path.splitext(out)[0] + ".npz"
    np.savez(npz, xy=xy, ids=rows.numpy(), labels=labels, classes=np.array(fs.classes))
    print(json.dumps({"command": "tsne", "checkpoint": ck, "which": args.which, "data": fs.root,
                      "images": len(rows), "perplexity": args.perplexity, "seed": args.seed, "cache_hit": hit,
                      "png": os.path.abspath(out), "npz": os.path.abspath(npz)}))
    return 0


if __name__ == "__main__":
    from fastcl.eval.linear import run_cli

    raise SystemExit(run_cli(main))
