"""AugSpec: one description of the multi-view augmentation that every backend implements.

Pure data (no torch import) so the config schema can embed it. Defaults are the MoCo-v2 recipe
(METHODS.md §1): RandomResizedCrop(scale 0.2-1, ratio 3/4-4/3), ColorJitter(0.4,0.4,0.4,0.1) p=0.8,
grayscale p=0.2, Gaussian blur sigma 0.1-2 p=0.5, horizontal flip p=0.5, no solarize.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ViewSpec:
    size: int = 32  # output side in pixels (square)
    scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop area fraction
    ratio: tuple[float, float] = (0.75, 1.3333333)  # RandomResizedCrop aspect ratio range
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel_frac: float = 0.1  # minimum window side odd(frac * size) (SimCLR/torchvision: 23 px at 224), widened to fit 3 sigma_max
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5  # on [0,1] pixel values


# ImageNet statistics; CIFAR configs override them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@dataclass
class AugSpec:
    views: list[ViewSpec] = field(default_factory=lambda: [ViewSpec(), ViewSpec()])
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    eval_size: int = 32  # eval transform: resize shorter side to eval_size/0.875 (>= eval_size) then center crop
    eval_resize_ratio: float = 0.875  # crop/resize ratio of the eval transform (1.0 = no resize margin, CIFAR)
