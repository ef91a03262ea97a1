"""Projector / predictor MLP heads.

MoCo-v2: MLP(feat, 2048, 128, 2, hidden_bn=False); SimCLR-v2 / SANE: 3 layers with BN;
SCE ImageNet: MLP(2048, 2048, 256, 3, out_bn=True) projector plus a 2-layer predictor whose last Linear has no
bias (official `predictor_resnet50_mlp2_bn1.yaml`: `last_bias: False`).
"""
from __future__ import annotations

from torch import nn


class MLP(nn.Sequential):
    """[B, in_dim] -> [B, out_dim].

    num_layers - 1 hidden blocks of Linear (+ BatchNorm1d) + ReLU, then a final Linear (with a bias unless
    last_bias is False), optionally followed by a non-affine BatchNorm1d when out_bn. num_layers=1 is a single
    Linear. A plain nn.Sequential, so state-dict keys are '0.weight', '1.running_mean', ...; last_bias changes
    no module position, only drops '<last>.bias'.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int,
                 hidden_bn: bool = True, out_bn: bool = False, last_bias: bool = True):
        if num_layers < 1:
            raise ValueError(f"MLP needs num_layers >= 1, got {num_layers}")
        layers: list[nn.Module] = []
        d = in_dim
        for _ in range(num_layers - 1):
            # A bias right before BN is cancelled by the mean subtraction: drop it.
            layers.append(nn.Linear(d, hidden_dim, bias=not hidden_bn))
            if hidden_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            d = hidden_dim
        layers.append(nn.Linear(d, out_dim, bias=last_bias))
        if out_bn:
            # SCE (ImageNet) normalises the projector output without a learned scale/shift.
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
        super().__init__(*layers)
        self.in_dim, self.out_dim = in_dim, out_dim
