"""ResNet-18/34/50 backbones with torchvision's module and parameter names.

Names match torchvision exactly (conv1, bn1, relu, maxpool, layer1..layer4 whose blocks hold
conv1/bn1/conv2/bn2[/conv3/bn3]/downsample.{0,1}, avgpool, fc), so checkpoints load either way and
published SSL weights drop in. torchvision itself has no CPU wheel for this torch, hence this file.

Differences from torchvision, both keeping the state-dict keys identical:
- `cifar_stem`: conv1 is 3x3 stride 1 (no bias) and `maxpool` is nn.Identity, for 32-64 px images.
- `width`: base channel count (64 = torchvision); stages use width * (1, 2, 4, 8).
- `fc` is nn.Identity unless num_classes > 0, so the backbone returns pooled features [B, feat_dim].

Bottleneck puts the stride on the 3x3 conv (torchvision's "ResNet v1.5").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class StridedConv1x1(nn.Conv2d):
    """1x1 conv with stride s > 1 (the downsample shortcut); same parameters/keys as nn.Conv2d.

    On CPU it subsamples first and runs a stride-1 conv, which is the same function: torch 2.13's
    oneDNN weight-gradient kernel for strided 1x1 convs segfaults on some shapes (e.g. 8 input channels
    with an odd batch, or odd spatial sizes such as 15x15; both memory formats). GPU keeps the fused conv.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu" or self.stride == (1, 1):
            return super().forward(x)
        sh, sw = self.stride
        return F.conv2d(x[:, :, ::sh, ::sw], self.weight, self.bias)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    if stride > 1:
        return StridedConv1x1(cin, cout, kernel_size=1, stride=stride, bias=False)
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs. [B, cin, H, W] -> [B, planes, H/stride, W/stride]."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand. [B, cin, H, W] -> [B, 4*planes, H/stride, W/stride]."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv1x1(cin, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Backbone. forward: [B, 3, H, W] -> [B, feat_dim] (or [B, num_classes] when num_classes > 0).

    `feat_dim` = 8 * width * block.expansion (512 for ResNet-18/34, 2048 for ResNet-50 at width 64).
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: list[int], cifar_stem: bool = False,
                 width: int = 64, num_classes: int = 0, zero_init_residual: bool = False):
        super().__init__()
        self.inplanes = width
        # Registration order follows torchvision too, so named_modules()/state_dict() iterate alike.
        if cifar_stem:
            # 32 px images: a 7x7/2 conv + max-pool would leave 8x8 maps before layer1 and lose most detail.
            self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        # Identity (not a missing attribute) with the CIFAR stem keeps the module tree torchvision's.
        self.maxpool = nn.Identity() if cifar_stem else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.feat_dim = width * 8 * block.expansion
        self.fc = nn.Linear(self.feat_dim, num_classes) if num_classes > 0 else nn.Identity()

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # Each residual branch starts as zero, so every block starts as the identity (Goyal et al. 2017).
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: Tensor) -> Tensor:
        """[B, 3, H, W] -> last feature map [B, feat_dim, H/s, W/s] (s = 32, or 8 with the CIFAR stem)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: Tensor) -> Tensor:
        """[B, 3, H, W] -> [B, feat_dim] pooled features (through fc when it is a Linear)."""
        x = self.avgpool(self.forward_features(x))
        # flatten, not view: a channels_last map pooled to 1x1 is not "contiguous" in the NCHW sense.
        return self.fc(torch.flatten(x, 1))


ARCHS = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}


def resnet(arch: str, cifar_stem: bool = False, width: int = 64, num_classes: int = 0,
           zero_init_residual: bool = False) -> ResNet:
    """Build a backbone by name: resnet18 | resnet34 | resnet50."""
    if arch not in ARCHS:
        raise ValueError(f"unknown backbone {arch!r}; choose one of {sorted(ARCHS)}")
    block, layers = ARCHS[arch]
    return ResNet(block, layers, cifar_stem=cifar_stem, width=width, num_classes=num_classes,
                  zero_init_residual=zero_init_residual)
