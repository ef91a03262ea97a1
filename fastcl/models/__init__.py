"""Backbones, heads, EMA teacher and global batch norm.

    enc = build_encoder(cfg.model)        # enc.backbone: ResNet, enc.projector: MLP
    z = enc(x)                            # [B, 3, H, W] -> [B, proj_dim], NOT normalised
    pred = build_predictor(cfg.model)     # MLP or nn.Identity
    teacher = make_teacher(enc); ema_update(teacher, enc, m)
"""
from __future__ import annotations

from torch import Tensor, nn

from fastcl.models.ema import ema_update, make_teacher, unwrap
from fastcl.models.heads import MLP
from fastcl.models.norm import AllReduceBatchNorm, SplitBatchNorm, convert_split_bn, convert_sync_bn
from fastcl.models.resnet import ResNet, resnet


class Encoder(nn.Module):
    """Backbone + projector. forward: [B, 3, H, W] -> [B, proj_dim] (un-normalised).

    `backbone(x)` alone gives the [B, feat_dim] features used by the kNN monitor and linear probe.
    """

    def __init__(self, backbone: ResNet, projector: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.feat_dim = backbone.feat_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.projector(self.backbone(x))


def build_encoder(model_cfg) -> Encoder:
    """From a ModelCfg node (fastcl/config.py): arch, cifar_stem, width, proj_* fields."""
    backbone = resnet(model_cfg.arch, cifar_stem=model_cfg.cifar_stem, width=model_cfg.width)
    projector = MLP(backbone.feat_dim, model_cfg.proj_hidden, model_cfg.proj_dim, model_cfg.proj_layers,
                    hidden_bn=model_cfg.proj_bn, out_bn=model_cfg.proj_out_bn)
    return Encoder(backbone, projector)


def build_predictor(model_cfg) -> nn.Module:
    """Online predictor [B, proj_dim] -> [B, proj_dim]: 2-layer MLP if pred_hidden > 0, else identity.

    Linear (no bias) -> BN -> ReLU -> Linear without bias: SCE's official predictor head
    (CEA-LIST/SCE predictor_resnet50_mlp2_bn1.yaml: `bias: False`, `last_bias: False`).
    """
    if model_cfg.pred_hidden > 0:
        return MLP(model_cfg.proj_dim, model_cfg.pred_hidden, model_cfg.proj_dim, 2, last_bias=False)
    return nn.Identity()


__all__ = ["Encoder", "build_encoder", "build_predictor", "ResNet", "resnet", "MLP", "make_teacher",
           "ema_update", "unwrap", "convert_sync_bn", "AllReduceBatchNorm", "SplitBatchNorm",
           "convert_split_bn"]
