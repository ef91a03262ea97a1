"""Batch norm over the GLOBAL batch for multi-process runs, on GPU and on CPU.

torch.nn.SyncBatchNorm only runs on CUDA ("expected input tensor to be on GPU"), but the 2-process gloo
tests and CPU demos need the same semantics. `convert_sync_bn` therefore picks SyncBatchNorm for CUDA
modules and `AllReduceBatchNorm` (below) for CPU ones. Both keep BN's parameter/buffer names
(weight, bias, running_mean, running_var, num_batches_tracked), so checkpoints load into either.
"""
from __future__ import annotations

import itertools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from fastcl.dist import is_dist


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; backward sums the output gradients over processes too.

    d(sum_r loss_r)/d(input on rank q) = sum_r d loss_r / d(output) (the output is the same tensor
    everywhere). Own Function rather than torch.distributed.nn.functional.all_reduce, which warns as
    deprecated in torch 2.13.
    """

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        x = x.clone(memory_format=torch.contiguous_format)  # gloo/nccl need dense input
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g: Tensor):
        g = g.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _StatsBatchNorm(_BatchNorm):
    """BN on any [N, C, *] input whose training statistics a subclass computes: the running-statistics update and
    the normalisation from given (mean, biased var) are shared here."""

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected an input of shape [N, C, *], got {tuple(x.shape)}")

    @torch.no_grad()
    def _track(self, mean: Tensor, unbiased_var: Tensor) -> None:
        """Same update as torch's BN (the running variance is the unbiased one)."""
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            f = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            self.running_mean.mul_(1 - f).add_(mean.to(self.running_mean.dtype), alpha=f)
            self.running_var.mul_(1 - f).add_(unbiased_var.to(self.running_var.dtype), alpha=f)

    def _normalize(self, x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
        """(x - mean) / sqrt(var + eps) * weight + bias as one affine map per channel; mean/var [C]. x * s + b
        keeps x's memory format (channels_last stays channels_last)."""
        scale = torch.rsqrt(var + self.eps)
        shift = -mean * scale
        if self.affine:
            scale = scale * self.weight
            shift = shift * self.weight + self.bias
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        return x * scale.to(x.dtype).view(shape) + shift.to(x.dtype).view(shape)


class AllReduceBatchNorm(_StatsBatchNorm):
    """BatchNorm{1,2,3}d whose training statistics cover the batches of all processes.

    Input [N, C, *] -> same shape. In training mode with torch.distributed initialised, each process
    contributes (count, sum, sum of squares) per channel through one autograd-aware all_reduce, so the
    outputs and input gradients equal those of one process running plain BN over the concatenated batch
    (per-process batch sizes may differ). Eval mode, or no process group, is plain BN.

    The per-channel sums travel in float64, built from each process's own (Welford) mean/variance:
    E[x^2] - E[x]^2 in float32 loses the variance when |mean| >> std.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and is_dist()):
            return super().forward(x)
        self._check_input_dim(x)
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        n = x.numel() // c if c else 0
        xs = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        if n > 0:
            var_l, mean_l = torch.var_mean(xs, dim=dims, correction=0)
        else:
            # An empty shard still joins the collective, and its zeros keep the graph so that this
            # process also joins the all_reduce of the backward pass.
            var_l = mean_l = xs.sum(dim=dims)
        m = mean_l.double()
        packed = torch.cat([m * n, (var_l.double() + m * m) * n, m.new_full((1,), float(n))])
        packed = _AllReduceSum.apply(packed, self.process_group)  # the one collective per BN forward
        total = packed[2 * c]
        mean = packed[:c] / total
        var = (packed[c:2 * c] / total - mean * mean).clamp_min(0.0)  # biased, as used to normalise
        self._track(mean, var * total / (total - 1).clamp_min(1.0))
        return self._normalize(x, mean, var)


def _tile(t: Tensor, s: int) -> Tensor:
    """[C] -> [S·C], S copies in a row: one copy kernel (Tensor.repeat is a chain of a dozen small ops)."""
    return t.expand(s, t.shape[0]).reshape(-1)


class SplitBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics are computed over `splits` groups of the batch: one process
    simulating several GPUs with per-device BN (MoCo's CIFAR demo `SplitBatchNorm(bn_splits=8)`, SCE's
    `simulate_n_devices`).

    Input [N, C, *] with N divisible by S = splits -> same shape. Group s is the rows s, s+S, s+2S, ... (row
    i belongs to group i mod S), which is what lets the whole layer run as ONE batch-norm call, as in the MoCo
    demo: [N, C, *] is viewed (no copy, for a contiguous input) as [N/S, S·C, *], so that channel s·C + c of
    the view is channel c of group s, and normalised with the weight, bias and running statistics repeated S
    times. A Python loop over the S groups launches 8× the kernels, which on a GPU running at tens of thousands
    of images per second costs more than the arithmetic. `fastcl.step.forward_group` orders the rows so that
    group s holds the s-th N/S images of every view, as device s would.

    The running statistics take the mean of the groups' statistics (each group's running variance is the
    unbiased one, as in torch's BN). Eval mode, or splits = 1, is plain BN. Parameter/buffer names are BN's,
    so checkpoints and torchvision exports are unchanged. A channels_last input is copied into the grouped
    view and the output returned channels_last (the view needs the channels next to the batch in memory).
    """

    def __init__(self, num_features: int, splits: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.splits = splits

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected an input of shape [N, C, *], got {tuple(x.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        s = self.splits
        if not self.training or s == 1:
            return super().forward(x)
        self._check_input_dim(x)
        n, c = x.shape[0], x.shape[1]
        if n % s:
            raise ValueError(f"model.bn_splits={s} does not divide the batch of {n} images at this BN layer")
        track = self.track_running_stats and self.running_mean is not None
        factor = 0.0
        if track:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        rm = _tile(self.running_mean, s) if track else None  # F.batch_norm updates these copies in place
        rv = _tile(self.running_var, s) if track else None
        w = _tile(self.weight, s) if self.affine else None
        b = _tile(self.bias, s) if self.affine else None
        y = F.batch_norm(x.reshape(n // s, s * c, *x.shape[2:]), rm, rv, w, b, True, factor, self.eps)
        if track:
            with torch.no_grad():
                self.running_mean.copy_(rm.view(s, c).mean(0))
                self.running_var.copy_(rv.view(s, c).mean(0))
        y = y.reshape(x.shape)
        if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            y = y.contiguous(memory_format=torch.channels_last)
        return y


_PLAIN_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _swap_bn(module: nn.Module, swap: tuple, make) -> nn.Module:
    """Recursively replace BN layers of the classes `swap` by `make(old)`, SHARING their tensors: an optimizer or
    EMA already holding these Parameters stays valid, and the state-dict names stay BN's."""
    out = module
    if isinstance(module, swap) and not isinstance(module, (nn.SyncBatchNorm, AllReduceBatchNorm)):
        out = make(module)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _swap_bn(child, swap, make))
    return out


def convert_split_bn(module: nn.Module, splits: int, kinds: tuple = _PLAIN_BN) -> nn.Module:
    """Swap the plain BatchNorm layers of the classes `kinds` (default: every plain BN) for SplitBatchNorm(splits)
    (splits = 1 and none there yet: unchanged). An existing SplitBatchNorm gets the new count (the teacher of
    `model.shuffle_bn=sync` uses 1)."""
    for m in module.modules():
        if isinstance(m, SplitBatchNorm):
            m.splits = splits
    if splits == 1:
        return module
    return _swap_bn(module, kinds, lambda bn: SplitBatchNorm(bn.num_features, splits, bn.eps, bn.momentum,
                                                              bn.affine, bn.track_running_stats))


def _to_allreduce_bn(module: nn.Module, process_group) -> nn.Module:
    """Recursively swap plain (and split) BatchNorm layers for AllReduceBatchNorm, sharing their tensors."""
    return _swap_bn(module, _PLAIN_BN + (SplitBatchNorm,), lambda bn: AllReduceBatchNorm(
        bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, process_group))


def convert_sync_bn(module: nn.Module, process_group=None) -> nn.Module:
    """BN statistics over the global batch. Returns the module (converted in place where possible).

    One process (or no torch.distributed): returned unchanged. CUDA module: torch's SyncBatchNorm.
    CPU module: AllReduceBatchNorm. The device is read from the module's tensors, so convert after
    moving the model to its device.
    """
    if not is_dist():
        return module
    ws = dist.get_world_size(process_group) if process_group is not None else dist.get_world_size()
    if ws == 1:
        return module
    first = next(itertools.chain(module.parameters(), module.buffers()), None)
    if first is not None and first.device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    return _to_allreduce_bn(module, process_group)


__all__ = ["AllReduceBatchNorm", "SplitBatchNorm", "convert_split_bn", "convert_sync_bn"]
