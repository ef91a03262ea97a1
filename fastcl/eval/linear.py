"""Offline linear evaluation of a frozen backbone on precomputed features.

    python -m fastcl.eval.linear --checkpoint RUN --data TRAIN_FOLDER --val VAL_FOLDER [--protocol moco]

This is the fast "precomputed features" variant of the linear protocols: every image goes through the
backbone ONCE with the eval transform (resize + center crop, no augmentation), the pooled features [N, D]
are cached on disk, and the classifier trains on those tensors. The papers' protocols instead re-augment
(RandomResizedCrop + flip) every epoch and run the backbone each step; numbers from this variant are
typically a little lower and are not interchangeable with them (docs/EVAL.md).

Feature cache: one file per (checkpoint directory, its files' newest mtime, which encoder, data folder and
its mtime, eval transform); a later run with the same key loads it instead of running the backbone. The
kNN (fastcl.eval.knn) and semi-supervised (fastcl.eval.semisup, linear mode) commands share it.

Sound by default on every backbone: the presets' learning rates assume one feature scale (MoCo's lr 30:
ImageNet ResNet-50 pooled features), and on a small CIFAR backbone `moco` diverged (start CE 2,890 on 10
classes). So (1) the features are STANDARDISED with the train split's per-dimension mean and std (`--standardize`,
on by default; the val split uses the train statistics) and (2) the lr is chosen by a small SWEEP on a held-out
10 % of the training split (`--lr-grid`: the preset's lr times 1, 0.1, 0.01, 0.001, continued downwards while
the smallest lr wins; the best held-out top-1 wins, then the probe is retrained on the whole training split), as
solo-learn and the papers' appendices (SimCLR B.5, BYOL C) pick linear-probe learning rates. An explicit --lr turns the sweep off. Every probe measures its loss at
initialisation and WARNS when an epoch's mean loss rises above it (`diverged` in the result).

Labels are read here: evaluation is the one place that may.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import warnings
from dataclasses import asdict, dataclass, replace
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CACHE_VERSION = 1  # bump when the cached content changes meaning


# ------------------------------------------------------------------------------------------ protocols

@dataclass(frozen=True)
class Protocol:
    """Optimiser and schedule of one linear-evaluation recipe (METHODS.md §2.4 / §5.4)."""

    name: str
    optimizer: str  # sgd | adam
    lr: float  # at batch_size (already scaled when lr_per_256 is set)
    batch_size: int
    epochs: int
    schedule: str  # step (x0.1 at each milestone epoch) | cosine (per epoch, to 0) | constant
    milestones: tuple[int, ...] = ()
    momentum: float = 0.9
    wd: float = 0.0
    bn: bool = False  # BatchNorm1d(affine=False) on the features before the linear layer
    lr_per_256: float = 0.0  # >0: lr = lr_per_256 * batch_size / 256 (linear scaling rule)


PROTOCOLS = {
    # MoCo v1/v2 main_lincls (SCE CIFAR-10 uses it too): a huge lr because the features are not normalised.
    "moco": Protocol("moco", "sgd", 30.0, 256, 100, "step", (60, 80)),
    # MoCo-v3 main_lincls (SCE ImageNet): lr 0.1 per 256 images, batch 1024 -> 0.4, cosine.
    "mocov3": Protocol("mocov3", "sgd", 0.4, 1024, 90, "cosine", lr_per_256=0.1),
    # SANE CIFAR-10: Adam lr 0.01, no weight decay, 200 epochs; batch and schedule are not stated [U].
    "adam": Protocol("adam", "adam", 0.01, 256, 200, "constant", momentum=0.0),
}


def resolve_protocol(name: str, epochs: int | None = None, batch_size: int | None = None, lr: float | None = None,
                     wd: float | None = None, bn: bool | None = None) -> Protocol:
    """A preset with the given overrides applied. Under a batch-scaled preset (mocov3) a new batch size rescales
    the lr unless lr is given explicitly."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown linear protocol {name!r}; choose one of {sorted(PROTOCOLS)}")
    p = PROTOCOLS[name]
    if batch_size is not None:
        p = replace(p, batch_size=int(batch_size))
        if p.lr_per_256 > 0:
            p = replace(p, lr=p.lr_per_256 * p.batch_size / 256)
    if epochs is not None:
        # milestones stay at the same fraction of training (60/80 of 100 -> 60 % / 80 %)
        base = PROTOCOLS[name]
        ms = tuple(max(1, round(m * int(epochs) / base.epochs)) for m in base.milestones)
        p = replace(p, epochs=int(epochs), milestones=ms)
    if lr is not None:
        p = replace(p, lr=float(lr))
    if wd is not None:
        p = replace(p, wd=float(wd))
    if bn is not None:
        p = replace(p, bn=bool(bn))
    if p.epochs < 1 or p.batch_size < 1 or p.lr <= 0:
        raise ValueError(f"protocol {name}: epochs, batch size and lr must be positive, got {p}")
    return p


def lr_at(p: Protocol, epoch: int) -> float:
    """Learning rate of epoch `epoch` (0-based)."""
    if p.schedule == "step":
        return p.lr * 0.1 ** sum(epoch >= m for m in p.milestones)
    if p.schedule == "cosine":
        return p.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / p.epochs))
    return p.lr


# ------------------------------------------------------------------------------------------ features + cache

@dataclass
class FeatureSet:
    """Pooled backbone features of one image folder, in `scan_folder` order (row = sample id)."""

    feats: Tensor  # [N, D] float32, NOT normalised (kNN normalises, the linear probe uses them raw)
    labels: Tensor  # [N] int64, -1 for a flat folder
    classes: list[str]  # class folder names; label = position
    rel_paths: list[str]  # paths relative to the folder root, "/"-separated
    root: str


def checkpoint_context(checkpoint: str):
    """(checkpoint dir, run dir, resolved run config) of a run or checkpoint directory, without loading weights."""
    from fastcl.checkpoint import open_run

    run = open_run(checkpoint)
    return run.path, run.run_dir, run.cfg


def eval_aug(cfg, eval_size: int | None = None) -> SimpleNamespace:
    """The eval transform parameters `eval_data` reads (the run's, with an optional eval_size override)."""
    a = cfg.data.aug
    return SimpleNamespace(eval_size=int(eval_size or a.eval_size), eval_resize_ratio=float(a.eval_resize_ratio),
                           mean=tuple(float(v) for v in a.mean), std=tuple(float(v) for v in a.std))


def _newest_mtime_ns(folder: str) -> int:
    return max([os.stat(folder).st_mtime_ns] + [os.stat(os.path.join(folder, n)).st_mtime_ns
                                               for n in os.listdir(folder)])


def cache_key(ck: str, which: str, data_path: str, aug, classes: list[str] | None = None) -> str:
    """Hex digest naming a feature file: a rewritten checkpoint (new mtime), another folder, encoder or eval
    transform gives another key, so a stale file is never read."""
    root = os.path.abspath(data_path)
    parts = {"v": CACHE_VERSION, "ckpt": ck, "ckpt_mtime_ns": _newest_mtime_ns(ck), "which": which,
             "data": root, "data_mtime_ns": os.stat(root).st_mtime_ns, "eval_size": aug.eval_size,
             "ratio": aug.eval_resize_ratio, "mean": list(aug.mean), "std": list(aug.std)}
    if classes is not None:  # a class subset (data.classes / --classes) is another feature set
        parts["classes"] = sorted(classes)
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def extract_folder(backbone: nn.Module, root: str, aug, batch_size: int = 256, workers: int = 4,
                   device: torch.device | None = None, progress: bool = True,
                   classes: list[str] | None = None) -> FeatureSet:
    """Run `backbone` (eval mode, BN running statistics) over every image of `root` with the eval transform."""
    from tqdm import tqdm

    from fastcl.pipelines.eval_data import eval_batches
    from fastcl.pipelines.folder import scan_folder

    index = scan_folder(root, classes=classes)
    device = device or next(backbone.parameters()).device
    backbone = backbone.to(device).eval()
    feats: Tensor | None = None
    it = eval_batches(root, aug, batch_size, workers=workers, classes=classes)
    for x, _, ids in tqdm(it, total=-(-len(index) // batch_size), disable=not progress,
                          desc=f"features {os.path.basename(os.path.normpath(root))}", file=sys.stderr):
        f = backbone(x.to(device, non_blocking=True)).float().cpu()
        if feats is None:
            feats = torch.empty(len(index), f.shape[1])
        feats[ids] = f
    abs_root = os.path.abspath(root)
    rel = [os.path.relpath(p, abs_root).replace(os.sep, "/") for p in index.paths]
    return FeatureSet(feats, torch.tensor(index.labels, dtype=torch.int64), list(index.classes), rel, abs_root)


def cached_features(checkpoint: str, data_path: str, which: str = "student", cache_dir: str | None = None,
                    eval_size: int | None = None, batch_size: int = 256, workers: int = 4,
                    device: torch.device | None = None, progress: bool = True,
                    classes: list[str] | None = None) -> tuple[FeatureSet, bool]:
    """Features of `data_path` under the checkpoint's backbone, from the cache when present.

    cache_dir: None -> <run_dir>/eval/features; "" -> no cache. classes: a class subset (None: every class
    folder). Returns (features, cache_hit).
    """
    from fastcl.checkpoint import load_encoder

    if which not in ("student", "teacher"):
        raise ValueError(f"--which must be student or teacher, got {which!r}")
    if not os.path.isdir(data_path):
        raise FileNotFoundError(f"image folder not found: {data_path}")
    ck, run_dir, cfg = checkpoint_context(checkpoint)
    aug = eval_aug(cfg, eval_size)
    path = None
    if cache_dir != "":
        cache_dir = cache_dir or os.path.join(run_dir, "eval", "features")
        name = os.path.basename(os.path.normpath(data_path)) or "data"
        path = os.path.join(cache_dir, f"{name}-{which}-{cache_key(ck, which, data_path, aug, classes)[:20]}.pt")
        if os.path.isfile(path):
            d = torch.load(path, map_location="cpu", weights_only=True)
            return FeatureSet(d["feats"], d["labels"], d["classes"], d["rel_paths"], d["root"]), True
    enc, _ = load_encoder(ck, which)
    fs = extract_folder(enc.backbone, data_path, aug, batch_size, workers, device or default_device(), progress,
                        classes)
    if path is not None:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        torch.save({"feats": fs.feats, "labels": fs.labels, "classes": fs.classes, "rel_paths": fs.rel_paths,
                    "root": fs.root}, tmp)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old state or the whole file
    return fs, False


def remap_labels(train_classes: list[str], val_classes: list[str], val_labels: Tensor, train_root: str,
                 val_root: str) -> Tensor:
    """Val labels [M] renumbered into the train class numbering. Classes are matched BY NAME, so a val folder
    may hold a subset of the train classes; a flat folder (no labels) or an unknown class raises."""
    for classes, root in ((train_classes, train_root), (val_classes, val_root)):
        if not classes:
            raise ValueError(f"{root} is a flat folder (no class sub-folders): evaluation needs labels")
    pos = {c: i for i, c in enumerate(train_classes)}
    missing = [c for c in val_classes if c not in pos]
    if missing:
        raise ValueError(f"class {missing[0]!r} of {val_root} is not a class of {train_root} "
                         f"({len(missing)} unknown classes)")
    return torch.tensor([pos[c] for c in val_classes], dtype=torch.int64)[val_labels]


def aligned_labels(train: FeatureSet, val: FeatureSet) -> tuple[Tensor, Tensor, list[str]]:
    """(train labels [N], val labels [M] in the train class numbering, class names)."""
    y_val = remap_labels(train.classes, val.classes, val.labels, train.root, val.root)
    return train.labels, y_val, list(train.classes)


# ------------------------------------------------------------------------------------------ classifier

def topk_accuracy(logits: Tensor, labels: Tensor, ks=(1, 5)) -> dict[str, float]:
    """{"top1": %, "top5": %} of logits [N, C] against labels [N]; k is capped at C."""
    kmax = min(max(ks), logits.shape[1])
    hit = logits.topk(kmax, dim=1).indices.eq(labels[:, None])  # [N, kmax]
    n = max(1, labels.shape[0])
    return {f"top{k}": int(hit[:, :min(k, kmax)].any(1).sum()) * 100.0 / n for k in ks}


class LinearHead(nn.Sequential):
    """[B, D] -> [B, C]: optional BatchNorm1d(affine=False) (folds into the linear layer at test time), then
    nn.Linear initialised N(0, 0.01) with zero bias (MoCo's main_lincls init)."""

    def __init__(self, dim: int, num_classes: int, bn: bool = False):
        layers = [nn.BatchNorm1d(dim, affine=False)] if bn else []
        fc = nn.Linear(dim, num_classes)
        nn.init.normal_(fc.weight, std=0.01)
        nn.init.zeros_(fc.bias)
        super().__init__(*layers, fc)


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, chunk: int = 8192) -> Tensor:
    model.eval()
    return torch.cat([model(x[i:i + chunk]) for i in range(0, x.shape[0], chunk)])


def make_optimizer(params, p: Protocol) -> torch.optim.Optimizer:
    if p.optimizer == "adam":
        return torch.optim.Adam(params, lr=p.lr, weight_decay=p.wd)
    return torch.optim.SGD(params, lr=p.lr, momentum=p.momentum, weight_decay=p.wd)


def train_linear(x_train: Tensor, y_train: Tensor, x_val: Tensor, y_val: Tensor, num_classes: int, p: Protocol,
                 device: torch.device | None = None, seed: int = 0, progress: bool = True,
                 desc: str = "linear") -> dict:
    """Train LinearHead on features x_train [N, D] / labels y_train [N]; evaluate on x_val [M, D] every epoch.

    Returns {"top1", "top5"} of the LAST epoch (not the best: picking the best epoch on val is optimistic)
    and "history": per-epoch {epoch, lr, loss, val_top1}.
    """
    from tqdm import tqdm

    device = device or default_device()
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # the head's init is seeded without touching the caller's RNG
        torch.manual_seed(seed)
        head = LinearHead(x_train.shape[1], num_classes, p.bn).to(device)
    xt, yt = x_train.to(device).float(), y_train.to(device)
    xv, yv = x_val.to(device).float(), y_val.to(device)
    opt = make_optimizer(head.parameters(), p)
    n = xt.shape[0]
    start = start_loss(head, xt, yt)
    history = []
    bar = tqdm(range(p.epochs), disable=not progress, desc=desc, file=sys.stderr, dynamic_ncols=True)
    for epoch in bar:
        lr = lr_at(p, epoch)
        for group in opt.param_groups:
            group["lr"] = lr
        head.train()
        order = torch.randperm(n, generator=g).to(device)
        batches = list(order.split(p.batch_size))
        if p.bn and len(batches) > 1 and batches[-1].numel() == 1:
            batches.pop()  # BatchNorm cannot train on a batch of one
        total, seen = 0.0, 0
        for idx in batches:
            loss = F.cross_entropy(head(xt[idx]), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * idx.numel()  # summed on the device: no host sync per step
            seen += idx.numel()
        acc = topk_accuracy(predict(head, xv), yv)
        history.append({"epoch": epoch + 1, "lr": lr, "loss": float(total) / max(seen, 1), "val_top1": acc["top1"]})
        bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", top1=f"{acc['top1']:.2f}")
    bar.close()
    # 1 % slack: an epoch's mean loss is taken during training, so a first epoch of one batch equals the start
    risen = [h for h in history if not h["loss"] <= 1.01 * start]  # NaN counts as risen
    if risen:
        warnings.warn(f"{desc}: the probe's loss rose above its start ({start:.3f} at initialisation -> "
                      f"{risen[0]['loss']:.3f} in epoch {risen[0]['epoch']}, lr {p.lr:g}): it diverged; keep "
                      f"--standardize and the lr sweep, or lower --lr", RuntimeWarning, stacklevel=2)
    return {**acc, "history": history, "start_loss": start, "diverged": bool(risen)}


@torch.no_grad()
def start_loss(head: nn.Module, x: Tensor, y: Tensor) -> float:
    """Mean CE of the untrained head on x [N, D] / y [N] (train-mode BN statistics, the running ones untouched)."""
    import copy

    probe = copy.deepcopy(head).train()
    return float(F.cross_entropy(probe(x), y))


# ------------------------------------------------------------------------------------------ sound probe

LR_GRID = (1.0, 0.1, 0.01, 0.001)  # multipliers of the preset's lr tried on the held-out split


def standardize(x_train: Tensor, *others: Tensor) -> tuple[Tensor, ...]:
    """Per-dimension (x - mean) / std with the statistics of x_train [N, D] applied to every tensor [M, D].

    Dead dimensions (std 0: a ReLU unit never active) stay 0 instead of dividing by zero."""
    mean, std = x_train.float().mean(0), x_train.float().std(0)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return tuple((x.float() - mean) / std for x in (x_train, *others))


def holdout_split(n: int, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(fit ids, held-out ids) of n training rows: a seeded random `fraction` held out (at least one row each)."""
    if not 0 < fraction < 1:
        raise ValueError(f"--holdout must lie in (0, 1), got {fraction}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    k = min(max(1, round(fraction * n)), n - 1)
    return order[k:], order[:k]


def sweep_lr(x: Tensor, y: Tensor, num_classes: int, p: Protocol, grid=LR_GRID, holdout: float = 0.1,
             device: torch.device | None = None, seed: int = 0, progress: bool = False) -> tuple[float, list[dict]]:
    """The lr among p.lr * grid with the best top-1 on a held-out part of the TRAINING split (x [N, D], y [N]).

    A candidate whose loss rose above its start is never chosen (a small held-out split can rank a diverging
    probe first by chance). When the best candidate is the smallest lr tried (or every candidate diverged), the
    optimum may lie below the grid, so the sweep continues downwards (x0.1, at most 3 more) until a smaller lr
    stops winning: on standardised features of the study's CIFAR encoders MoCo's lr 30 needs x0.0001 (0.003).
    Ties go to the lower final training loss. Returns (lr, per-lr table)."""
    fit, held = holdout_split(x.shape[0], holdout, seed)
    table = []
    mults = [float(m) for m in grid]
    while mults:
        q = replace(p, lr=p.lr * mults.pop(0))
        with warnings.catch_warnings():  # a diverging candidate is expected here: it is just not chosen
            warnings.simplefilter("ignore", RuntimeWarning)
            r = train_linear(x[fit], y[fit], x[held], y[held], num_classes, q, device, seed, progress,
                             desc=f"lr sweep {q.lr:g}")
        table.append({"lr": q.lr, "holdout_top1": r["top1"], "final_loss": r["history"][-1]["loss"],
                      "diverged": r["diverged"]})
        lowest = min(t["lr"] for t in table)
        if not mults and len(table) < len(grid) + 3 and (all(t["diverged"] for t in table)
                                                          or _best(table)["lr"] == lowest):
            mults.append(lowest * 0.1 / p.lr)
    return _best(table)["lr"], table


def _best(table: list[dict]) -> dict:
    """The sweep's winner: best held-out top-1 among the candidates that did not diverge, then lowest loss."""
    ok = [t for t in table if not t["diverged"]] or [t for t in table if math.isfinite(t["final_loss"])] or table
    return max(ok, key=lambda t: (t["holdout_top1"], -t["final_loss"]))


def fit_probe(x_train: Tensor, y_train: Tensor, x_val: Tensor, y_val: Tensor, num_classes: int, p: Protocol,
              device: torch.device | None = None, seed: int = 0, progress: bool = True, desc: str = "linear",
              standardize_features: bool = True, lr_grid=LR_GRID, holdout: float = 0.1) -> dict:
    """The sound probe: standardise (train statistics), sweep the lr on a held-out part of the training split
    (lr_grid None or empty: p.lr as given), then train on the whole training split and evaluate on val.

    x_train [N, D], y_train [N], x_val [M, D], y_val [M] -> train_linear's result plus "lr", "lr_sweep",
    "standardize"."""
    if standardize_features:
        x_train, x_val = standardize(x_train, x_val)
    table = []
    if lr_grid:
        lr, table = sweep_lr(x_train, y_train, num_classes, p, lr_grid, holdout, device, seed)
        p = replace(p, lr=lr)
    res = train_linear(x_train, y_train, x_val, y_val, num_classes, p, device, seed, progress, desc)
    return {**res, "lr": p.lr, "lr_sweep": table, "standardize": bool(standardize_features), "protocol": asdict(p)}


# ------------------------------------------------------------------------------------------ command

def add_checkpoint_args(ap: argparse.ArgumentParser, required: bool = True) -> None:
    """--checkpoint and --which: the backbone every evaluation / export command reads."""
    ap.add_argument("--checkpoint", required=required, help="run directory (newest checkpoint) or checkpoint directory")
    ap.add_argument("--which", default="student", choices=["student", "teacher"],
                    help="online encoder, or the EMA teacher for methods that keep one")


def add_common_args(ap: argparse.ArgumentParser, required: bool = True) -> None:
    """Arguments shared by the linear, kNN and semi-supervised commands."""
    add_checkpoint_args(ap, required)
    ap.add_argument("--data", required=True, help="labelled TRAIN image folder (class sub-folders)")
    ap.add_argument("--val", required=required, help="labelled VAL image folder (same class folder names)")
    ap.add_argument("--classes", default=None,
                    help="class-list file (one class folder name per line) restricting --data and --val; default: the "
                         "run's data.classes; 'all' = every class folder")
    ap.add_argument("--cache", default=None,
                    help="feature cache folder (default <run>/eval/features; '' disables the cache)")
    ap.add_argument("--eval-size", type=int, default=None,
                    help="eval crop side (default: the run's data.aug.eval_size)")
    ap.add_argument("--extract-batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="decode threads")
    ap.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON result path (default <run>/eval/<command>_....json)")
    ap.add_argument("--no-progress", action="store_true")


def check_common_args(args) -> None:
    """Fail on bad sizes and unusable folders BEFORE any feature is extracted or cached (the cache lives in the
    run directory). Raises ValueError / FileNotFoundError naming the flag or folder."""
    from fastcl.pipelines.folder import scan_folder

    # bad-input fix (tests/test_bad_input.py): --extract-batch-size 0 was a ZeroDivisionError traceback,
    # --eval-size -4 an error naming no flag, and a bad --val was found only after the train features had been
    # extracted and written into <run>/eval/features
    if args.extract_batch_size < 1:
        raise ValueError(f"--extract-batch-size must be >= 1, got {args.extract_batch_size}")
    if args.eval_size is not None and args.eval_size < 1:
        raise ValueError(f"--eval-size must be >= 1, got {args.eval_size}")
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    if getattr(args, "val", None):
        classes = eval_classes(args)
        train, val = scan_folder(args.data, classes=classes), scan_folder(args.val, classes=classes)
        remap_labels(train.classes, val.classes, torch.tensor(val.labels, dtype=torch.int64), args.data, args.val)


def eval_classes(args) -> list[str] | None:
    """The class subset of an eval command: --classes FILE, 'all' (None), or by default the run's data.classes
    (so a model pretrained on ImageNet-100 is evaluated on the same 100 classes, with the training ids)."""
    from fastcl.pipelines.folder import cfg_classes, read_class_list

    spec = getattr(args, "classes", None)
    if spec == "all":
        return None
    if spec:
        return read_class_list(spec)
    if getattr(args, "checkpoint", None):
        return cfg_classes(checkpoint_context(args.checkpoint)[2])
    return None


def load_pair(args) -> tuple[FeatureSet, FeatureSet, dict]:
    """Train and val features for parsed common args; also the cache hits, for the JSON report."""
    check_common_args(args)
    kw = dict(which=args.which, cache_dir=args.cache, eval_size=args.eval_size, batch_size=args.extract_batch_size,
              workers=args.workers, device=torch.device(args.device) if args.device else None,
              progress=not args.no_progress, classes=eval_classes(args))
    train, hit_t = cached_features(args.checkpoint, args.data, **kw)
    val, hit_v = cached_features(args.checkpoint, args.val, **kw)
    return train, val, {"train": hit_t, "val": hit_v}


def write_result(result: dict, out: str | None, default_name: str) -> str:
    """Write the JSON atomically to `out` (or <run>/eval/<default_name>); print a one-line summary to stdout."""
    out = out or os.path.join(result["run_dir"], "eval", default_name)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, out)
    summary = {k: v for k, v in result.items() if k not in ("history", "results", "protocol")}
    print(json.dumps({**summary, "out": out}))
    return out


def run_cli(main_fn) -> int:
    """Run a command's main(); a user error (bad path, bad subset file, mismatched classes) ends with ONE line
    naming it instead of a traceback."""
    try:
        return main_fn()
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def add_probe_args(ap: argparse.ArgumentParser) -> None:
    """--standardize, --lr-sweep, --lr-grid, --holdout: what makes the probe converge on any backbone."""
    ap.add_argument("--standardize", action=argparse.BooleanOptionalAction, default=True,
                    help="standardise features with the train split's per-dimension mean/std (default: on)")
    ap.add_argument("--lr-sweep", action=argparse.BooleanOptionalAction, default=None,
                    help="choose the lr on a held-out part of the training split (default: on unless --lr is given)")
    ap.add_argument("--lr-grid", type=float, nargs="+", default=list(LR_GRID),
                    help="multipliers of the protocol's lr tried by the sweep")
    ap.add_argument("--holdout", type=float, default=0.1, help="held-out fraction of the training split (sweep)")


def probe_grid(args) -> tuple[float, ...]:
    """The sweep's lr multipliers for parsed args: none when --no-lr-sweep, or when --lr is explicit."""
    on = args.lr_sweep if args.lr_sweep is not None else args.lr is None
    if on and (not args.lr_grid or min(args.lr_grid) <= 0):
        raise ValueError(f"--lr-grid must hold positive multipliers, got {args.lr_grid}")
    if on and not 0 < args.holdout < 1:
        raise ValueError(f"--holdout must lie in (0, 1), got {args.holdout}")
    return tuple(args.lr_grid) if on else ()


def linear_eval(args) -> dict:
    """Run the linear evaluation described by parsed CLI args; returns the JSON-ready result."""
    p = resolve_protocol(args.protocol, args.epochs, args.batch_size, args.lr, args.wd, args.bn)
    grid = probe_grid(args)  # bad values fail before any feature is extracted
    train, val, hits = load_pair(args)
    y_train, y_val, classes = aligned_labels(train, val)
    device = torch.device(args.device) if args.device else default_device()
    res = fit_probe(train.feats, y_train, val.feats, y_val, len(classes), p, device, args.seed,
                    progress=not args.no_progress, desc=f"linear/{p.name}", standardize_features=args.standardize,
                    lr_grid=grid, holdout=args.holdout)
    ck, run_dir, _ = checkpoint_context(args.checkpoint)
    return {"command": "linear", "checkpoint": ck, "run_dir": run_dir, "which": args.which,
            "train_path": train.root, "val_path": val.root, "n_train": len(train.rel_paths),
            "n_val": len(val.rel_paths), "num_classes": len(classes), "feat_dim": int(train.feats.shape[1]),
            "features": "precomputed once with the eval transform (no augmentation)", "cache_hit": hits,
            "protocol": res["protocol"], "standardize": res["standardize"], "lr": res["lr"],
            "lr_sweep": res["lr_sweep"], "start_loss": res["start_loss"], "diverged": res["diverged"],
            "top1": res["top1"], "top5": res["top5"], "history": res["history"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastcl.eval.linear", description=__doc__.split("\n")[0])
    add_common_args(ap)
    ap.add_argument("--protocol", default="moco", choices=sorted(PROTOCOLS))
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--wd", type=float, default=None)
    ap.add_argument("--bn", action=argparse.BooleanOptionalAction, default=None,
                    help="BatchNorm1d(affine=False) before the linear layer (default: off in every preset)")
    add_probe_args(ap)
    args = ap.parse_args(argv)
    result = linear_eval(args)
    write_result(result, args.out, f"linear_{args.protocol}_{args.which}.json")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
