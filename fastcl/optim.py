"""Optimizers: SGD (torch) and LARS (SimCLR/SCE ImageNet recipes)."""
from __future__ import annotations

import torch
from torch import nn


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratio eta*||w||/(||g + wd*w||).

    Params in groups with `lars_exclude=True` (biases, norm weights: 1-D) get neither weight decay nor the
    trust ratio, as in the SimCLR / SCE recipes (METHODS §5.6(7)).
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                                      lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):
        """One update per param group in multi-tensor (foreach) ops: the kernels launched do not grow with the
        number of parameters, except one scaling per tensor for its trust ratio."""
        for g in self.param_groups:
            params = [p for p in g["params"] if p.grad is not None]
            if not params:
                continue
            d = [p.grad for p in params]
            if not g["lars_exclude"]:
                if g["weight_decay"]:
                    d = torch._foreach_add(d, params, alpha=g["weight_decay"])
                pn = torch.stack(torch._foreach_norm(params))  # [P]
                dn = torch.stack(torch._foreach_norm(d))
                trust = torch.where((pn > 0) & (dn > 0), g["eta"] * pn / dn, torch.ones_like(pn))
                d = torch._foreach_mul(d, list(trust.unbind()))
            bufs = []
            for p, di in zip(params, d):
                st = self.state[p]
                if "momentum_buffer" not in st:  # first step: the buffer is the update itself
                    st["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(st["momentum_buffer"])
            torch._foreach_mul_(bufs, g["momentum"])
            torch._foreach_add_(bufs, d)
            torch._foreach_add_(params, bufs, alpha=-g["lr"])


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "sgd":
        # MoCo/SCE CIFAR recipes decay every parameter.
        return torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    decay = [p for p in model.parameters() if p.ndim > 1]
    skip = [p for p in model.parameters() if p.ndim <= 1]
    return LARS([{"params": decay}, {"params": skip, "lars_exclude": True, "weight_decay": 0.0}],
                lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, eta=o.lars_eta)


def set_lr_wd(opt: torch.optim.Optimizer, lr: float, wd: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr
        if not g.get("lars_exclude", False):
            g["weight_decay"] = wd
