"""Semi-supervised evaluation on fixed label subsets (1 % / 10 %).

    python -m fastcl.eval.semisup --data TRAIN --percent 1 10 --make-subset [--name cifar10]   # write subsets
    python -m fastcl.eval.semisup --checkpoint RUN --data TRAIN --val VAL --percent 1 10 [--mode linear|finetune]
    python -m fastcl.eval.semisup --checkpoint RUN --data IMAGENET/train --val IMAGENET/val \
        --subset-file 1percent.txt 10percent.txt        # SimCLR's published lists, one file name per line

Subset files (`<subset-dir>/<name>_<pct>pct.txt`, default dir data/subsets, run from the repo root) list one
labelled training image per line as its path relative to the TRAIN folder (`cat/0042.jpg`); `#` lines are
comments. A line that is not such a path is matched by file name alone, so the standard SimCLR ImageNet 1 % /
10 % lists (one `n01440764_10026.JPEG` per line) can be dropped in as `imagenet_1pct.txt` unchanged.

`--make-subset` draws them class-balanced and deterministically: every class contributes the same count
k = max(1, round(pct/100 * N / C)) (capped at the class size), namely its k files with the smallest
sha1("<seed>/<relative path>"). That depends only on the file names and the seed (not on the platform, numpy or
the other classes), and a smaller percentage is a subset of a larger one at the same seed.

Modes:
- linear: a linear classifier on the cached frozen features of the subset (the protocols of fastcl.eval.linear).
- finetune: backbone + linear head trained end to end on the subset (SimCLR's fine-tuning recipe: Nesterov SGD,
  momentum 0.9, lr 0.05 * B / 256, no weight decay, 60 epochs at <= 1 %, 30 above; cosine per step here),
  BN in training mode, augmentation `--aug crop` (RandomResizedCrop scale (crop_scale, 1) + flip; default),
  `flip` (eval transform + flip) or `none`.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

GENERIC_SPLIT_NAMES = ("train", "training", "val", "valid", "validation", "test", "images")


# ------------------------------------------------------------------------------------------ subset files

def dataset_name(root: str) -> str:
    """Name used in subset file names: the folder's name, or its parent's when it is a split folder (train/)."""
    root = os.path.normpath(os.path.abspath(root))
    base = os.path.basename(root)
    return os.path.basename(os.path.dirname(root)) if base.lower() in GENERIC_SPLIT_NAMES else base


def subset_file(subset_dir: str, name: str, percent: float) -> str:
    return os.path.join(subset_dir, f"{name}_{percent:g}pct.txt")


def per_class_count(n_total: int, n_classes: int, percent: float) -> int:
    """Images per class for `percent` % of n_total, equal for every class, at least 1 (half rounds up)."""
    return max(1, int(math.floor(percent / 100.0 * n_total / n_classes + 0.5)))


def make_subset(root: str, percent: float, seed: int = 0, classes: list[str] | None = None) -> list[str]:
    """Relative paths (in scan_folder order) of a class-balanced `percent` % subset of the class folder `root`."""
    from fastcl.pipelines.folder import scan_folder

    if not 0 < percent <= 100:
        raise ValueError(f"--percent must be in (0, 100], got {percent}")
    index = scan_folder(root, classes=classes)
    if not index.classes:
        raise ValueError(f"{root} is a flat folder (no class sub-folders): a labelled subset needs classes")
    abs_root = os.path.abspath(root)
    rels = [os.path.relpath(p, abs_root).replace(os.sep, "/") for p in index.paths]
    k = per_class_count(len(rels), len(index.classes), percent)
    by_class: dict[int, list[str]] = {}
    for rel, label in zip(rels, index.labels):
        by_class.setdefault(label, []).append(rel)
    keep = set()
    for members in by_class.values():
        ranked = sorted(members, key=lambda r: hashlib.sha1(f"{seed}/{r}".encode()).hexdigest())
        keep.update(ranked[:k])
    return [r for r in rels if r in keep]


def subset_text(rels: list[str], name: str, percent: float, seed: int) -> str:
    """File content: a comment header (how it was made) then one relative path per line."""
    header = [f"# fastcl label subset: {percent:g} % of {name} ({len(rels)} images)",
              f"# class-balanced, seed {seed}: per class the files with the smallest sha1('<seed>/<path>')",
              "# one image per line, path relative to the train folder"]
    return "\n".join(header + rels) + "\n"


def write_subset(path: str, text: str) -> bool:
    """Write a subset file; an identical existing file is kept (returns False), a different one is refused so
    that published subsets are never silently replaced."""
    if os.path.isfile(path):
        with open(path) as f:
            if f.read() == text:
                return False
        raise FileExistsError(f"{path} exists with different content (another seed or data folder?); delete it or "
                              f"choose another --subset-dir / --name")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return True


def read_subset(path: str, rel_paths: list[str]) -> Tensor:
    """Sorted sample ids [n] (positions in `rel_paths`, the scan_folder order) of the images a subset file lists.

    A line matches a relative path first, else a file name (for SimCLR's ImageNet lists); unmatched lines raise.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"subset file not found: {path} (write it with --make-subset)")
    with open(path) as f:
        lines = [ln.strip() for ln in f]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if not lines:
        raise ValueError(f"subset file {path} lists no image")
    by_rel = {r: i for i, r in enumerate(rel_paths)}
    by_name: dict[str, int] | None = None
    ids, missing = set(), []
    for ln in lines:
        i = by_rel.get(ln.replace("\\", "/"))
        if i is None:
            if by_name is None:  # built lazily: only lists of bare file names need it
                by_name = {}
                for j, r in enumerate(rel_paths):
                    by_name[r.rsplit("/", 1)[-1]] = -1 if r.rsplit("/", 1)[-1] in by_name else j
            i = by_name.get(ln)
            if i == -1:
                raise ValueError(f"{path}: file name {ln!r} is ambiguous in the data folder; list relative paths")
        if i is None:
            missing.append(ln)
        else:
            ids.add(i)
    if missing:
        raise ValueError(f"{path}: {len(missing)} listed images are not in the data folder, e.g. {missing[0]!r}")
    return torch.tensor(sorted(ids), dtype=torch.int64)


# ------------------------------------------------------------------------------------------ fine-tuning

class SubsetImages(torch.utils.data.Dataset):
    """Labelled images -> (uint8 [3, S, S], label). Randomness comes from seed_for(seed, epoch, i), so a run
    is reproducible whatever the worker count; set `.epoch` before iterating each epoch."""

    def __init__(self, paths: list[str], labels: list[int], size: int, resize_to: int, aug: str,
                 crop_scale: float, seed: int):
        from fastcl.pipelines.augspec import ViewSpec

        self.paths, self.labels, self.size, self.resize_to = paths, labels, size, resize_to
        self.aug, self.seed, self.epoch = aug, seed, 0
        self.spec = ViewSpec(size=size, scale=(crop_scale, 1.0))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        from fastcl.pipelines.augment import rrc_box
        from fastcl.rand import seed_for
        from fastcl.pipelines.folder import load_rgb, resize_center_crop

        g = torch.Generator().manual_seed(seed_for(self.seed, self.epoch, i))
        im = load_rgb(self.paths[i])
        if self.aug == "crop":
            y0, x0, h, w = rrc_box(im.size[1], im.size[0], self.spec, g)
            im = im.resize((self.size, self.size), Image.BILINEAR, box=(x0, y0, x0 + w, y0 + h))
        else:
            im = resize_center_crop(im, self.resize_to, self.size)
        if self.aug != "none" and float(torch.rand(1, generator=g)) < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.array(im)).permute(2, 0, 1), self.labels[i]


@torch.no_grad()
def evaluate_images(model: nn.Module, root: str, aug, labels_map: Tensor, batch_size: int, workers: int,
                    device: torch.device, classes: list[str] | None = None) -> dict[str, float]:
    """top1/top5 of `model` ([B,3,S,S] -> [B,C]) over the folder `root` through the eval transform;
    labels_map renumbers the folder's labels into the model's classes."""
    from fastcl.eval.linear import topk_accuracy
    from fastcl.pipelines.eval_data import eval_batches

    model.eval()
    logits, ys = [], []
    for x, y, _ in eval_batches(root, aug, batch_size, workers=workers, classes=classes):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits.append(model(x.to(device)).float().cpu())
        ys.append(labels_map[y])
    return topk_accuracy(torch.cat(logits), torch.cat(ys))


def finetune(checkpoint: str, which: str, train_root: str, ids: Tensor, val_root: str, epochs: int,
             batch_size: int = 256, lr: float | None = None, wd: float = 0.0, aug_mode: str = "crop",
             crop_scale: float = 0.08, eval_size: int | None = None, workers: int = 4,
             device: torch.device | None = None, seed: int = 0, progress: bool = True,
             classes: list[str] | None = None) -> dict:
    """Fine-tune backbone + LinearHead on the training images `ids` (scan_folder ids of train_root); evaluate
    on val_root after the last epoch. Returns {"top1", "top5", "history", "lr", "batch_size", "epochs"}."""
    from tqdm import tqdm

    from fastcl.checkpoint import load_encoder
    from fastcl.eval.linear import LinearHead, checkpoint_context, default_device, eval_aug, remap_labels
    from fastcl.pipelines.augment import normalize
    from fastcl.pipelines.folder import scan_folder

    device = device or default_device()
    ck, _, cfg = checkpoint_context(checkpoint)
    aug = eval_aug(cfg, eval_size)
    index, val_index = scan_folder(train_root, classes=classes), scan_folder(val_root, classes=classes)
    labels_map = remap_labels(index.classes, val_index.classes, torch.arange(len(val_index.classes)),
                              train_root, val_root)
    n = int(ids.numel())
    if n < 2:
        raise ValueError(f"fine-tuning needs at least 2 labelled images, the subset of {train_root} has {n}")
    bs = min(batch_size, n)
    lr = lr if lr is not None else 0.05 * bs / 256
    enc, _ = load_encoder(ck, which)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(enc.backbone, LinearHead(enc.feat_dim, len(index.classes))).to(device)
    ds = SubsetImages([index.paths[i] for i in ids.tolist()], [index.labels[i] for i in ids.tolist()],
                      aug.eval_size, int(round(aug.eval_size / aug.eval_resize_ratio)), aug_mode, crop_scale, seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)
    # drop_last once there are several batches: a short last batch gives noisy BN statistics (and a batch of
    # one cannot train BN at all); shuffling differs per epoch, so every image is still seen
    steps_per_epoch = n // bs if n > bs else 1
    total = epochs * steps_per_epoch
    history, step = [], 0
    bar = tqdm(range(epochs), disable=not progress, desc="finetune", file=sys.stderr, dynamic_ncols=True)
    for epoch in bar:
        ds.epoch = epoch
        loader = torch.utils.data.DataLoader(
            ds, batch_size=bs, shuffle=True, drop_last=n > bs, num_workers=workers,
            generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        model.train()
        loss_sum, seen = torch.zeros((), device=device), 0
        for x, y in loader:
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            x = normalize(x.to(device).float().div_(255.0), aug.mean, aug.std)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = F.cross_entropy(model(x).float(), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * y.numel()
            seen += y.numel()
            step += 1
        history.append({"epoch": epoch + 1, "loss": float(loss_sum) / max(seen, 1)})
        bar.set_postfix(loss=f"{history[-1]['loss']:.3f}")
    bar.close()
    acc = evaluate_images(model, val_root, aug, labels_map, 256, workers, device, classes)
    return {**acc, "history": history, "lr": lr, "batch_size": bs, "epochs": epochs, "aug": aug_mode,
            "crop_scale": crop_scale}


# ------------------------------------------------------------------------------------------ command

def main(argv=None) -> int:
    from fastcl.eval.linear import PROTOCOLS, add_common_args, aligned_labels, checkpoint_context, eval_classes, \
        load_pair, resolve_protocol, write_result, add_probe_args, fit_probe, probe_grid
    from fastcl.pipelines.folder import scan_folder

    ap = argparse.ArgumentParser(prog="python -m fastcl.eval.semisup", description=__doc__.split("\n")[0])
    add_common_args(ap, required=False)
    ap.add_argument("--percent", type=float, nargs="+", default=[1.0, 10.0], help="label percentages")
    ap.add_argument("--mode", default="linear", choices=["linear", "finetune"])
    ap.add_argument("--subset-dir", default=os.path.join("data", "subsets"))
    ap.add_argument("--subset-file", nargs="+", default=None, metavar="FILE",
                    help="evaluate these subset files instead of <subset-dir>/<name>_<pct>pct.txt: one image per line, "
                         "a path relative to --data or a bare file name (SimCLR's ImageNet 1%%/10%% lists)")
    ap.add_argument("--name", default=None, help="dataset name in subset file names (default: from --data)")
    ap.add_argument("--make-subset", action="store_true", help="write the subset files (deterministic) first")
    ap.add_argument("--subset-seed", type=int, default=0)
    ap.add_argument("--protocol", default="moco", choices=sorted(PROTOCOLS), help="linear mode optimiser preset")
    ap.add_argument("--epochs", type=int, default=None, help="default: the protocol's (linear); 60 at <=1 %%, "
                                                             "else 30 (finetune)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--wd", type=float, default=None)
    ap.add_argument("--bn", action=argparse.BooleanOptionalAction, default=None)
    add_probe_args(ap)  # linear mode: standardised features + held-out lr sweep (fastcl.eval.linear)
    ap.add_argument("--aug", default="crop", choices=["crop", "flip", "none"], help="finetune augmentation")
    ap.add_argument("--crop-scale", type=float, default=0.08, help="finetune RandomResizedCrop minimum area")
    args = ap.parse_args(argv)

    name = args.name or dataset_name(args.data)
    classes = eval_classes(args)
    if args.subset_file and args.make_subset:
        ap.error("--subset-file evaluates the given files; --make-subset writes <subset-dir>/<name>_<pct>pct.txt")
    if args.subset_file:  # the user's lists; the labelled fraction is measured, not taken from --percent
        files = {os.path.splitext(os.path.basename(f))[0]: f for f in args.subset_file}
    else:
        files = {pct: subset_file(args.subset_dir, name, pct) for pct in args.percent}
    if args.make_subset:
        for pct, path in files.items():
            rels = make_subset(args.data, pct, args.subset_seed, classes)
            wrote = write_subset(path, subset_text(rels, name, pct, args.subset_seed))
            print(f"{'wrote' if wrote else 'kept identical'} {path}", file=sys.stderr)
        if not args.checkpoint:
            return 0
    if not (args.checkpoint and args.val):
        ap.error("--checkpoint and --val are required to evaluate (only --make-subset works without them)")

    device = torch.device(args.device) if args.device else None
    results = []
    if args.mode == "linear":
        train, val, hits = load_pair(args)
        y_train, y_val, classes = aligned_labels(train, val)
        rel_paths = train.rel_paths
    else:
        hits = None
        index = scan_folder(args.data, classes=classes)
        abs_root = os.path.abspath(args.data)
        rel_paths = [os.path.relpath(p, abs_root).replace(os.sep, "/") for p in index.paths]
    for key, path in files.items():
        ids = read_subset(path, rel_paths)
        pct = key if isinstance(key, float) else round(100.0 * ids.numel() / len(rel_paths), 4)
        with open(path, "rb") as f:
            entry = {"subset": key if isinstance(key, str) else f"{key:g}", "percent": pct,
                     "subset_file": os.path.abspath(path), "n_labeled": int(ids.numel()),
                     "subset_sha1": hashlib.sha1(f.read()).hexdigest()}
        if args.mode == "linear":
            p = resolve_protocol(args.protocol, args.epochs, args.batch_size, args.lr, args.wd, args.bn)
            res = fit_probe(train.feats[ids], y_train[ids], val.feats, y_val, len(classes), p, device, args.seed,
                            progress=not args.no_progress, desc=f"linear/{pct:g}%",
                            standardize_features=args.standardize, lr_grid=probe_grid(args), holdout=args.holdout)
            entry.update(protocol=p.name, lr=res["lr"], batch_size=p.batch_size, epochs=p.epochs, bn=p.bn,
                         standardize=res["standardize"], lr_sweep=res["lr_sweep"], diverged=res["diverged"])
        else:
            epochs = args.epochs or (60 if pct <= 1 else 30)
            res = finetune(args.checkpoint, args.which, args.data, ids, args.val, epochs, args.batch_size or 256,
                           args.lr, args.wd or 0.0, args.aug, args.crop_scale, args.eval_size, args.workers, device,
                           args.seed, not args.no_progress, classes)
            entry.update({k: res[k] for k in ("lr", "batch_size", "epochs", "aug", "crop_scale")})
        entry.update(top1=res["top1"], top5=res["top5"], history=res["history"])
        results.append(entry)
    ck, run_dir, _ = checkpoint_context(args.checkpoint)
    result = {"command": "semisup", "mode": args.mode, "checkpoint": ck, "run_dir": run_dir, "which": args.which,
              "train_path": os.path.abspath(args.data), "val_path": os.path.abspath(args.val), "cache_hit": hits,
              "top1": {r["subset"]: r["top1"] for r in results},
              "top5": {r["subset"]: r["top5"] for r in results}, "results": results}
    write_result(result, args.out, f"semisup_{args.mode}_{args.which}.json")
    return 0


if __name__ == "__main__":
    from fastcl.eval.linear import run_cli

    sys.exit(run_cli(main))
