"""2-process gloo check of the miners' rank-0-compute + broadcast contract (run by tests/test_mining.py).

    torchrun --standalone --nproc_per_node 2 tests/_dist_miner_worker.py OUTDIR

Only rank 0 holds the real features; rank 1 passes garbage of another shape. Each rank writes what it ended
with to OUTDIR/rank{r}.pt; the test checks both equal each other and a single-process run.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from fastcl.methods.ifnd import ClusterMiner
from fastcl.mining import NeighbourMiner

N, D, LEVELS, K_NN, THRESHOLD = 600, 16, [6, 12], 5, 0.3


def planted_features(n: int = N, d: int = D, c: int = 6, seed: int = 0) -> torch.Tensor:
    """n unit vectors around c orthonormal centres (cos to centre ~0.95)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.linalg.qr(torch.randn(d, d, generator=g))[0][:c]
    lab = torch.arange(n) % c
    return torch.nn.functional.normalize(centres[lab] * 12 + torch.randn(n, d, generator=g), dim=1)


def make_miners() -> tuple[ClusterMiner, NeighbourMiner]:
    return (ClusterMiner(N, LEVELS, niter=10, seed=0, init="kmeans++"),
            NeighbourMiner(N, K_NN, THRESHOLD))


def run(features, r: int) -> dict:
    cm, nm = make_miners()
    out = {"features": features if r == 0 else None}
    out["labels_refresh"] = cm.refresh(features, 0.5, epoch=3).clone()
    out["labels_relabel"] = cm.relabel(0.8).clone()
    out.update(assign=cm.assign.clone(), conf=cm.conf.clone(), epoch_mined=cm.epoch_mined)
    ids, sims = nm.mine(features)
    out.update(nbr_ids=ids.clone(), nbr_sims=sims.clone())
    # a failure on rank 0 must reach every rank as an exception, not leave rank 1 waiting in a broadcast
    try:
        cm.refresh(None if r == 0 else features, 0.5)
        out["error"] = None
    except (ValueError, RuntimeError) as e:
        out["error"] = f"{type(e).__name__}: {e}"
    return out


def main() -> None:
    outdir = sys.argv[1]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    r = dist.get_rank()
    features = planted_features() if r == 0 else torch.randn(7, 3) * 1e3   # rank 1: garbage, wrong shape
    out = run(features, r)
    torch.save(out, os.path.join(outdir, f"rank{r}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
