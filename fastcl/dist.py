"""Collectives with single-process paths (DESIGN.md style rule 8).

Every function works without torch.distributed initialised (world size 1) and is exercised by a
2-process gloo test.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import Tensor


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


@torch.no_grad()
def gather(x: Tensor) -> Tensor:
    """All-gather along dim 0, no gradient. [b, ...] per rank -> [W*b, ...] (rank order).

    Requires equal per-rank sizes (loaders drop the incomplete global batch, so they are).
    """
    if not is_dist():
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the incoming gradients over ranks and returns this rank's slice.

    With DDP's gradient averaging this gives exactly the gradient of the global-batch mean loss
    (SimCLR's negatives from other ranks contribute to this rank's gradient).
    """

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        dist.all_reduce(g)
        b = g.shape[0] // world_size()
        return g[rank() * b:(rank() + 1) * b]


def gather_with_grad(x: Tensor) -> Tensor:
    """All-gather along dim 0 keeping the autograd graph. [b, ...] -> [W*b, ...]."""
    return _GatherWithGrad.apply(x) if is_dist() else x


def broadcast(x: Tensor, src: int = 0) -> Tensor:
    """In-place broadcast from `src`; returns x. Identity on one process."""
    if is_dist():
        dist.broadcast(x, src)
    return x


def broadcast_object(obj, src: int = 0):
    """Broadcast a picklable object (miner results, small metadata)."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def broadcast_state_(t: Tensor) -> Tensor:
    """In-place broadcast from rank 0 of a state tensor; NCCL only moves CUDA tensors, so stage through one."""
    if is_dist() and dist.get_backend() == "nccl" and t.device.type != "cuda":
        staged = t.to(torch.device("cuda", torch.cuda.current_device()))
        broadcast(staged)
        t.copy_(staged)
    else:
        broadcast(t)
    return t


def run_on_rank0(fn):
    """fn() on rank 0 (None elsewhere), then tell every rank whether it raised, so that nobody waits forever
    on the broadcast that would have followed."""
    out, err = None, None
    if rank() == 0:
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below on every rank
            err = e
    status = broadcast_object(None if err is None else f"{type(err).__name__}: {err}")
    if err is not None:
        raise err
    if status is not None:
        raise RuntimeError(f"mining failed on rank 0: {status}")
    return out


def synced_seconds(t0: float) -> float:
    """Seconds since `t0` (a `time.perf_counter()` reading), after waiting for queued CUDA work: without the
    synchronise a GPU timing would stop when the kernels were launched, not when they finished."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def all_reduce_mean(x: Tensor) -> Tensor:
    """Mean over ranks (for logging); returns a new tensor."""
    if not is_dist():
        return x
    y = x.detach().clone()
    dist.all_reduce(y)
    return y / world_size()


def torch_dist_backend_needs_cuda() -> bool:
    """NCCL only reduces CUDA tensors."""
    return is_dist() and dist.get_backend() == "nccl"


def barrier() -> None:
    if is_dist():
        dist.barrier()


def shutdown() -> None:
    """Tear the process group down before the interpreter exits: a rank that exits with a live group can abort
    in C++ ("terminate called without an active exception") while its peer still talks to it."""
    if is_dist():
        dist.barrier()
        dist.destroy_process_group()


def launched_world_size() -> int:
    """WORLD_SIZE set by torchrun / accelerate launch (1 when started as a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """This process's global rank as the launcher set it (RANK), valid also after the process group is gone
    (accelerate's end_training destroys it); the live group's rank when no launcher set it."""
    return int(os.environ.get("RANK", rank()))


def exit_now(code: int = 0) -> NoReturn:
    """Leave a launched process without the interpreter's C++ teardown, after shutdown().

    Why: at teardown a rank occasionally aborts ("terminate called without an active exception", exit -6; about
    once in 40 two-process runs on a loaded 2-core machine) AFTER its work is done and written, and the
    launcher, SLURM included, then reports a finished run as failed. Every file is closed before this point;
    Python's own buffers are flushed here.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)
