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
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if not g["lars_exclude"]:
                    if g["weight_decay"]:
                        d = d.add(p, alpha=g["weight_decay"])
                    pn, dn = torch.norm(p), torch.norm(d)
                    trust = torch.where((pn > 0) & (dn > 0), g["eta"] * pn / dn, torch.ones_like(pn))
                    d = d.mul(trust)
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = d.clone()
                else:
                    buf.mul_(g["momentum"]).add_(d)
                p.add_(buf, alpha=-g["lr"])


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
