"""Worker of tests/test_ffcv_multicrop.py::test_two_processes_* (torchrun, gloo, CPU).

    _dist_embed_worker.py OUT BETON FOLDER

Every rank: (1) `embed_dataset` sharded over the ranks for the ffcv (.beton, center-crop decoder), dali and
torch (PIL folder) sources, each returning the all-gathered [N, D]; (2) one epoch (epoch 1) of the ffcv training
loader (data.ffcv_decode=once) for this rank. Saves {"feats": {source: [N, D]}, "ids": [n_local]} to
OUT/rank{r}.pt. `run(...)` is also called in-process (no process group) for the 1-process reference.
"""
from __future__ import annotations

import os
import sys

import torch

EVAL = ["data.aug.eval_size=32", "data.aug.eval_resize_ratio=1.0", "data.workers=1", "optim.batch_size=64",
        "data.aug.views.0.size=32", "data.aug.views.1.size=32", "trainer.seed=5"]


def tiny_net() -> torch.nn.Module:
    """The same weights in every process (seeded)."""
    g = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 16))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return net


def sources(beton: str, folder: str) -> dict:
    return {"ffcv": ["data.backend=ffcv", f"data.path={beton}"], "dali": ["data.backend=dali", f"data.path={folder}"],
            "torch": ["data.backend=torch", f"data.path={folder}"]}


def run(beton: str, folder: str, rank: int = 0, world: int = 1) -> dict:
    from fastcl.config import load_config
    from fastcl.eval.features import embed_dataset
    from fastcl.pipelines import build_loader

    net, feats = tiny_net(), {}
    for name, over in sources(beton, folder).items():
        try:
            __import__({"ffcv": "ffcv", "dali": "nvidia.dali", "torch": "torch"}[name])
        except ImportError:
            continue
        feats[name] = embed_dataset(net, load_config(None, over + EVAL), batch_size=64)
    ld = build_loader(load_config(None, sources(beton, folder)["ffcv"] + EVAL), rank, world, "cpu")
    ld.set_epoch(1)
    ids = torch.cat([b.index for b in ld])
    return {"feats": feats, "ids": ids}


def main() -> None:
    out, beton, folder = sys.argv[1:4]
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    r, w = torch.distributed.get_rank(), torch.distributed.get_world_size()
    torch.save(run(beton, folder, r, w), os.path.join(out, f"rank{r}.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
