"""Export the trained backbone as a plain torchvision-named ResNet state dict.

    python -m fastcl.export --checkpoint RUN --out resnet.pt [--which student|teacher] [--num-classes N]
    python -m fastcl.export --checkpoint RUN --out resnet.pkl --format detectron2

Writes
- `resnet.pt`: `torch.save` of a flat {name: tensor} dict with torchvision's ResNet names (`conv1.weight`,
  `layer1.0.bn1.running_mean`, ..., `layer4.1.bn2.num_batches_tracked`): the backbone only, no projector,
  no `encoder.` / `backbone.` prefixes. No `fc.*` keys unless `--num-classes N`, which adds a freshly
  initialised `fc` (nn.Linear's default init, seeded by --seed) so the file loads with strict=True into a
  classifier with N outputs.
- `resnet.json` (same stem): arch, cifar_stem, width, feat_dim, num_classes, which encoder, the source run,
  checkpoint and step, the method, the .pt's sha256, and whether stock torchvision can load it.

`--format detectron2` writes instead a Detectron2 weights file (`.pkl`: pickle of {"model": {name: ndarray},
"__author__": "fastcl", "matching_heuristics": True}) with Detectron2's ResNet names (`stem.conv1.norm.weight`,
`res2.0.conv1.weight`, `res3.0.shortcut.norm.running_mean`, ...), for `MODEL.WEIGHTS` of a Detectron2 ResNet
with `MODEL.RESNETS.STRIDE_IN_1X1 False` (torchvision-style blocks stride in the 3x3 conv), `INPUT.FORMAT RGB`
and the pixel mean/std of the sidecar (x255). Standard stem only (Detectron2 has no CIFAR stem).

Loading: `fastcl.models.resnet(arch, cifar_stem, width, num_classes).load_state_dict(sd, strict=True)` always
works. `torchvision.models.<arch>(num_classes=N)` loads it with strict=True when width == 64 and the standard
stem was trained (`cifar_stem` false); a cifar_stem backbone has a 3x3 conv1 and no max-pool, so replace
`model.conv1` by a 3x3 stride-1 conv and `model.maxpool` by nn.Identity() before loading.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import sys

import torch


def backbone_state(checkpoint: str, which: str = "student", num_classes: int = 0, seed: int = 0):
    """(state dict with torchvision names, info dict) of a run's backbone; see the module docstring."""
    from fastcl.checkpoint import open_run
    from fastcl.models import resnet

    if which not in ("student", "teacher"):
        raise ValueError(f"--which must be student or teacher, got {which!r}")
    run = open_run(checkpoint)
    ck, enc, cfg = run.path, run.encoder(which), run.cfg
    m = cfg.model
    with torch.random.fork_rng(devices=[]):  # a seeded fc that leaves the caller's RNG alone
        torch.manual_seed(seed)
        skeleton = resnet(m.arch, cifar_stem=m.cifar_stem, width=m.width, num_classes=num_classes)
    missing, unexpected = skeleton.load_state_dict(enc.backbone.state_dict(), strict=False)
    # only the new classifier may be missing; anything else means the backbone and skeleton disagree
    if unexpected or set(missing) - {"fc.weight", "fc.bias"}:
        raise RuntimeError(f"backbone of {ck} does not match a {m.arch} skeleton: missing {missing}, "
                           f"unexpected {unexpected}")
    state = {k: v.detach().clone().contiguous() for k, v in skeleton.state_dict().items()}
    meta, run_dir = run.meta, run.run_dir
    info = {"format": "torchvision-resnet-state-dict", "arch": m.arch, "cifar_stem": bool(m.cifar_stem),
            "width": int(m.width), "feat_dim": int(skeleton.feat_dim), "num_classes": int(num_classes),
            "fc": "fresh nn.Linear default init, seed %d" % seed if num_classes else "absent",
            "which": which, "method": cfg.method.name, "source_run": run_dir, "checkpoint": ck,
            "step": meta.get("step"), "epoch": meta.get("epoch"), "keys": len(state),
            "torchvision_loadable": bool(m.width == 64 and not m.cifar_stem),
            "mean": [float(v) for v in cfg.data.aug.mean], "std": [float(v) for v in cfg.data.aug.std],
            "eval_size": int(cfg.data.aug.eval_size)}
    return state, info


def detectron2_names(state: dict) -> dict:
    """torchvision ResNet names -> Detectron2 ResNet names, tensors unchanged. {name: tensor} -> {name: tensor}

    conv1 / bn1 -> stem.conv1 / stem.conv1.norm; layerN -> res(N+1); in a block bnK -> convK.norm and
    downsample.0 / downsample.1 -> shortcut / shortcut.norm. `num_batches_tracked` and `fc.*` are dropped:
    Detectron2's frozen/sync BN and its backbones have neither.
    """
    out = {}
    for name, value in state.items():
        if name.endswith("num_batches_tracked") or name.startswith("fc."):
            continue
        if name.startswith("layer"):
            stage, rest = name.split(".", 1)
            new = f"res{int(stage[len('layer'):]) + 1}.{rest}"
        else:
            new = f"stem.{name}"
        for k in (1, 2, 3):
            new = new.replace(f".bn{k}.", f".conv{k}.norm.")
        out[new.replace(".downsample.0.", ".shortcut.").replace(".downsample.1.", ".shortcut.norm.")] = value
    return out


def sidecar_path(out: str) -> str:
    return os.path.splitext(out)[0] + ".json"


def export(checkpoint: str, out: str, which: str = "student", num_classes: int = 0, seed: int = 0,
           fmt: str = "torchvision") -> dict:
    """Write `out` and its JSON sidecar (both atomically); returns the sidecar content."""
    state, info = backbone_state(checkpoint, which, num_classes, seed)
    if fmt == "detectron2":
        if info["cifar_stem"]:
            raise ValueError(f"--format detectron2 needs a standard-stem backbone; {info['checkpoint']} was trained "
                             f"with model.cifar_stem=true (Detectron2 has no 3x3 stride-1 stem)")
        state = detectron2_names(state)
        info.update(format="detectron2-pkl", keys=len(state), num_classes=0, fc="absent",
                    detectron2_config={"MODEL.RESNETS.DEPTH": int(info["arch"][len("resnet"):]),
                                       "MODEL.RESNETS.STRIDE_IN_1X1": False, "INPUT.FORMAT": "RGB",
                                       "MODEL.PIXEL_MEAN": [255 * v for v in info["mean"]],
                                       "MODEL.PIXEL_STD": [255 * v for v in info["std"]]})
    elif fmt != "torchvision":
        raise ValueError(f"--format must be torchvision or detectron2, got {fmt!r}")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.tmp-{os.getpid()}"
    if fmt == "detectron2":
        with open(tmp, "wb") as f:
            pickle.dump({"model": {k: v.numpy() for k, v in state.items()}, "__author__": "fastcl",
                         "matching_heuristics": True}, f)
    else:
        torch.save(state, tmp)
    with open(tmp, "rb") as f:
        info["sha256"] = hashlib.sha256(f.read()).hexdigest()
    os.replace(tmp, out)
    side = sidecar_path(out)
    with open(f"{side}.tmp-{os.getpid()}", "w") as f:
        json.dump({**info, "file": os.path.abspath(out)}, f, indent=2)
    os.replace(f"{side}.tmp-{os.getpid()}", side)
    return info


def main(argv=None) -> int:
    from fastcl.eval.linear import add_checkpoint_args

    ap = argparse.ArgumentParser(prog="python -m fastcl.export", description=__doc__.split("\n")[0])
    add_checkpoint_args(ap)
    ap.add_argument("--out", required=True, help="output .pt path (the JSON sidecar goes next to it)")
    ap.add_argument("--num-classes", type=int, default=0, help="add a freshly initialised fc with N outputs")
    ap.add_argument("--seed", type=int, default=0, help="seed of the fresh fc")
    ap.add_argument("--format", default="torchvision", choices=["torchvision", "detectron2"],
                    help="torchvision state dict (.pt) or Detectron2 weights (.pkl)")
    args = ap.parse_args(argv)
    if args.num_classes < 0:
        ap.error(f"--num-classes must be >= 0, got {args.num_classes}")
    if args.format == "detectron2" and args.num_classes:
        ap.error("--num-classes has no meaning for --format detectron2 (a detection backbone has no fc)")
    info = export(args.checkpoint, args.out, args.which, args.num_classes, args.seed, args.format)
    print(json.dumps({**info, "out": os.path.abspath(args.out), "sidecar": sidecar_path(args.out)}))
    return 0


if __name__ == "__main__":
    from fastcl.eval.linear import run_cli

    sys.exit(run_cli(main))
