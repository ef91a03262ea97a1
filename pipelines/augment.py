"""Batched, per-sample-random augmentation ops in torch: the one implementation of `AugSpec` shared by the
torch, gpu_tensor and FFCV backends (DALI builds the same recipe in its own graph).

Where each op runs:
| backend    | host / worker stage                              | device stage (`device_stage`)           |
|------------|--------------------------------------------------|-----------------------------------------|
| torch      | PIL decode, RRC (`rrc_params` + PIL box resize), | colour jitter, grayscale, blur,         |
|            | flip -> uint8 [3,S,S] per view                   | solarize, normalize                     |
| ffcv       | decode + RRC + flip (ffcv ops) -> uint8 [B,S,S,3] | same                                   |
| gpu_tensor | (decoded once into device memory)                | `rrc_params` + `crop_resize` + `flip`,  |
|            |                                                  | then the same `device_stage`            |
The flip may run before the colour ops although torchvision's recipe flips later: jitter, grayscale,
solarize are per-pixel and the Gaussian kernel is symmetric, so the two orders give the same distribution.

Randomness: every random parameter is drawn on the CPU from the `torch.Generator` passed in (a fixed number of
draws per call, so a seed reproduces a batch), then moved to the device in one pinned, non-blocking copy. Which
samples an op touches is decided on the host from those CPU draws, so no op needs a device->host sync and each
op only computes on the samples it applies to.
"""
from __future__ import annotations

import math
from dataclasses import fields

import torch
import torch.nn.functional as F
from torch import Tensor

from fastcl.pipelines.augspec import ViewSpec

_M64 = (1 << 64) - 1
GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as PIL and torchvision use


def seed_for(*parts: int) -> int:
    """A well-mixed 64-bit seed from integers (seed, epoch, id, view, ...): splitmix64 over the parts, so
    nearby tuples give unrelated streams."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & _M64)) * 0xBF58476D1CE4E5B9 & _M64
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _M64
        h ^= h >> 29
    return h


def as_view_spec(v) -> ViewSpec:
    """A plain ViewSpec from a ViewSpec or a config node (OmegaConf attribute access is slow and lists are
    ListConfig; hot paths and worker processes get the plain dataclass)."""
    if isinstance(v, ViewSpec):
        return v
    kw = {}
    for f in fields(ViewSpec):
        val = getattr(v, f.name)
        kw[f.name] = tuple(float(x) for x in val) if f.name in ("scale", "ratio", "blur_sigma") else val
    return ViewSpec(**kw)


def host_to_device(t: Tensor, device: torch.device) -> Tensor:
    """Host tensor -> device without a sync (pinned + non_blocking for CUDA)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


# ---------------------------------------------------------------- random resized crop + flip

def rrc_params(n: int, heights: Tensor, widths: Tensor, spec: ViewSpec, generator: torch.Generator) -> Tensor:
    """RandomResizedCrop boxes with torchvision's semantics. heights, widths: [n] (or scalars). -> [n,4] float
    (y0, x0, h, w), integer-valued, on the CPU.

    Per sample: up to 10 attempts of area ~ U(scale)*H*W and log-uniform aspect in `ratio`; the first attempt
    whose rounded box fits is taken, at a uniform integer position; if none fits, the largest center crop whose
    aspect is clamped to `ratio`.
    """
    H = torch.as_tensor(heights, dtype=torch.float64).cpu().expand(n)
    W = torch.as_tensor(widths, dtype=torch.float64).cpu().expand(n)
    s0, s1 = float(spec.scale[0]), float(spec.scale[1])
    lr0, lr1 = math.log(float(spec.ratio[0])), math.log(float(spec.ratio[1]))
    u = torch.rand(n, 10, 4, generator=generator, dtype=torch.float64)  # area, log-ratio, y, x per attempt
    area = (H * W)[:, None] * (s0 + (s1 - s0) * u[..., 0])
    aspect = torch.exp(lr0 + (lr1 - lr0) * u[..., 1])
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    ok = (w > 0) & (h > 0) & (w <= W[:, None]) & (h <= H[:, None])
    first = torch.argmax(ok.to(torch.int8), dim=1)  # index of the first fitting attempt (0 if none)
    rows = torch.arange(n)
    h, w, pos = h[rows, first], w[rows, first], u[rows, first]
    # position of the chosen attempt: torch.randint(0, H-h+1) equivalent from its own uniform draw
    y0 = torch.floor(pos[:, 2] * (H - h + 1)).clamp(max=H - h)
    x0 = torch.floor(pos[:, 3] * (W - w + 1)).clamp(max=W - w)
    # fallback: whole image, its aspect clamped to the ratio range, centered
    in_ratio = W / H
    r_lo, r_hi = math.exp(lr0), math.exp(lr1)
    fw = torch.where(in_ratio < r_lo, W, torch.where(in_ratio > r_hi, torch.round(H * r_hi), W))
    fh = torch.where(in_ratio < r_lo, torch.round(W / r_lo), H)
    fy, fx = torch.div(H - fh, 2, rounding_mode="floor"), torch.div(W - fw, 2, rounding_mode="floor")
    any_ok = ok.any(dim=1)
    box = torch.stack([torch.where(any_ok, y0, fy), torch.where(any_ok, x0, fx),
                       torch.where(any_ok, h, fh), torch.where(any_ok, w, fw)], dim=1)
    return box.float()


def rrc_box(height: int, width: int, spec: ViewSpec, generator: torch.Generator) -> tuple[int, int, int, int]:
    """One box (y0, x0, h, w): `rrc_params(1, ...)` in plain Python (same draws, same result), ~10x cheaper
    per call, for the per-sample worker path."""
    s0, s1 = float(spec.scale[0]), float(spec.scale[1])
    lr0, lr1 = math.log(float(spec.ratio[0])), math.log(float(spec.ratio[1]))
    area = float(height * width)
    for ua, ur, uy, ux in torch.rand(10, 4, generator=generator, dtype=torch.float64).tolist():
        a = area * (s0 + (s1 - s0) * ua)
        aspect = math.exp(lr0 + (lr1 - lr0) * ur)
        w, h = round(math.sqrt(a * aspect)), round(math.sqrt(a / aspect))
        if 0 < w <= width and 0 < h <= height:
            return min(int(uy * (height - h + 1)), height - h), min(int(ux * (width - w + 1)), width - w), h, w
    in_ratio = width / height
    if in_ratio < math.exp(lr0):
        w, h = width, round(width / math.exp(lr0))
    elif in_ratio > math.exp(lr1):
        w, h = round(height * math.exp(lr1)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def crop_resize(images: Tensor, boxes: Tensor, size: int) -> Tensor:
    """Crop each image to its box and resize to size x size in ONE batched bilinear grid_sample
    (align_corners=False, no antialiasing: meant for small images such as CIFAR, where crops are upsampled).

    images: [B,3,H,W] uint8 or float; boxes: [B,4] (y0, x0, h, w) in pixels. -> float [B,3,size,size],
    in [0,1] for uint8 input, in the input's range otherwise.
    """
    B, _, H, W = images.shape
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    b = boxes.to(device=x.device, dtype=torch.float32)
    y0, x0, h, w = b.unbind(1)
    theta = torch.zeros(B, 2, 3, device=x.device)
    # output [-1,1] must land on the box edges [x0, x0+w] in normalized coords (pixel edge 0 -> -1, W -> 1)
    theta[:, 0, 0] = w / W
    theta[:, 0, 2] = (2 * x0 + w) / W - 1
    theta[:, 1, 1] = h / H
    theta[:, 1, 2] = (2 * y0 + h) / H - 1
    grid = F.affine_grid(theta, [B, 3, size, size], align_corners=False)
    # border padding: bilinear taps half a pixel outside a box on the image edge must not read black
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def flip(x: Tensor, p: float, generator: torch.Generator) -> Tensor:
    """Horizontal flip of each sample with probability p. x: [B,C,H,W] -> same shape (a new tensor)."""
    mask = torch.rand(x.shape[0], generator=generator) < p
    return torch.where(host_to_device(mask, x.device)[:, None, None, None], x.flip(-1), x)


# ---------------------------------------------------------------- colour ops on float [B,3,S,S] in [0,1]

def _gray(x: Tensor) -> Tensor:
    """[B,3,H,W] -> luma [B,1,H,W]."""
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(a: Tensor, b: Tensor, f: Tensor) -> Tensor:
    return (f * a + (1 - f) * b).clamp_(0, 1)


def rgb_to_hsv(x: Tensor) -> Tensor:
    """[B,3,H,W] RGB in [0,1] -> HSV, all channels in [0,1]."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    delta = maxc - minc
    gray = delta == 0
    s = delta / torch.where(gray, torch.ones_like(maxc), maxc)
    d = torch.where(gray, torch.ones_like(delta), delta)  # avoids 0/0 where the hue is undefined (set to 0)
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(gray, torch.zeros_like(h), h)
    h = torch.remainder(h / 6.0, 1.0)
    return torch.stack([h, s, maxc], 1)


def hsv_to_rgb(x: Tensor) -> Tensor:
    """[B,3,H,W] HSV in [0,1] -> RGB in [0,1] (the closed form c = v - v*s*clamp(min(k, 4-k), 0, 1) with
    k = (n + 6h) mod 6, n = 5, 3, 1 for r, g, b: no sector table, so nothing is copied to the device)."""
    h, s, v = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    n = torch.arange(5.0, 0.0, -2.0, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)  # 5, 3, 1
    k = torch.remainder(n + 6.0 * h, 6.0)
    return v - v * s * torch.minimum(k, 4.0 - k).clamp(0, 1)


def _brightness(x: Tensor, f: Tensor) -> Tensor:
    return (x * f).clamp_(0, 1)


def _contrast(x: Tensor, f: Tensor) -> Tensor:
    return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), f)


def _saturation(x: Tensor, f: Tensor) -> Tensor:
    return _blend(x, _gray(x), f)


def _hue(x: Tensor, f: Tensor) -> Tensor:
    hsv = rgb_to_hsv(x)
    hsv[:, 0:1] = torch.remainder(hsv[:, 0:1] + f, 1.0)
    return hsv_to_rgb(hsv)


_JITTER_OPS = (_brightness, _contrast, _saturation, _hue)


def _apply(x: Tensor, mask: Tensor, fn, *params: Tensor) -> None:
    """In place: x[mask] = fn(x[mask], params[mask]...). mask is a CPU bool [B]; params are device [B]."""
    idx = mask.nonzero().squeeze(1)  # host-side (CPU mask): no device sync
    if idx.numel() == 0:
        return
    if idx.numel() == x.shape[0]:
        x.copy_(fn(x, *(p.reshape(-1, 1, 1, 1) for p in params)))
        return
    di = host_to_device(idx, x.device)
    sub = fn(x.index_select(0, di), *(p.index_select(0, di).reshape(-1, 1, 1, 1) for p in params))
    x.index_copy_(0, di, sub)


def blur_kernel_size(spec: ViewSpec, size: int) -> int:
    """odd(max(3, blur_kernel_frac * size)): 3 px at 32, 9 px at 96, 23 px at 224."""
    k = int(max(3.0, spec.blur_kernel_frac * size))
    return k if k % 2 else k + 1


def gaussian_blur(x: Tensor, sigma: Tensor, ksize: int) -> Tensor:
    """Per-sample Gaussian blur, separable, as two grouped convs (one kernel per sample, shared by its 3
    channels) with reflect padding. x: [B,C,H,W]; sigma: [B] on x's device."""
    B, C, H, W = x.shape
    r = ksize // 2
    t = torch.arange(ksize, device=x.device, dtype=x.dtype) - r
    k = torch.exp(-(t[None] ** 2) / (2 * sigma.to(x.dtype)[:, None] ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(C, 0)  # [B*C, ksize]
    y = x.reshape(1, B * C, H, W)
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="reflect"), k[:, None, None, :], groups=B * C)
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="reflect"), k[:, None, :, None], groups=B * C)
    return y.reshape(B, C, H, W)


def color_ops(x: Tensor, spec: ViewSpec, generator: torch.Generator) -> Tensor:
    """Colour jitter (p=jitter_p; per-sample factors AND per-sample random order of brightness, contrast,
    saturation, hue, as torchvision's ColorJitter), grayscale (p=gray_p), Gaussian blur (p=blur_p, sigma ~
    U(blur_sigma)), solarize (p=solarize_p). x: float [B,3,S,S] in [0,1] -> new tensor, same shape, in [0,1].
    """
    B, _, S, _ = x.shape
    # all draws in one CPU tensor (fixed count per call): 0 jitter?, 1-4 factors, 5-8 order keys, 9 gray?,
    # 10 blur?, 11 sigma, 12 solarize?
    u = torch.rand(B, 13, generator=generator)
    strength = (float(spec.brightness), float(spec.contrast), float(spec.saturation), float(spec.hue))
    lo = torch.tensor([max(0.0, 1 - strength[0]), max(0.0, 1 - strength[1]), max(0.0, 1 - strength[2]), -strength[3]])
    hi = torch.tensor([1 + strength[0], 1 + strength[1], 1 + strength[2], strength[3]])
    factors = host_to_device(lo + (hi - lo) * u[:, 1:5], x.device)  # [B,4]
    order = u[:, 5:9].argsort(dim=1)  # [B,4] a random permutation of the 4 ops per sample
    jitter = u[:, 0] < spec.jitter_p
    x = x.to(torch.float32, copy=True)  # the ops below work in place on our own copy
    for k in range(4):
        for o, fn in enumerate(_JITTER_OPS):
            if strength[o] > 0:
                _apply(x, jitter & (order[:, k] == o), fn, factors[:, o])
    _apply(x, u[:, 9] < spec.gray_p, lambda t: _gray(t).expand_as(t))
    s0, s1 = float(spec.blur_sigma[0]), float(spec.blur_sigma[1])
    sigma = host_to_device(s0 + (s1 - s0) * u[:, 11], x.device)
    ksize = blur_kernel_size(spec, S)
    _apply(x, u[:, 10] < spec.blur_p, lambda t, s: gaussian_blur(t, s.view(-1), ksize), sigma)
    thr = float(spec.solarize_threshold)
    _apply(x, u[:, 12] < spec.solarize_p, lambda t: torch.where(t >= thr, 1 - t, t))
    return x.clamp_(0, 1)


def normalize(x: Tensor, mean, std) -> Tensor:
    """(x - mean) / std per channel. x: [B,3,H,W] float; mean, std: 3 numbers."""
    m = host_to_device(torch.tensor([float(v) for v in mean], dtype=x.dtype), x.device).view(1, -1, 1, 1)
    s = host_to_device(torch.tensor([float(v) for v in std], dtype=x.dtype), x.device).view(1, -1, 1, 1)
    return (x - m) / s


def to_float01(x: Tensor) -> Tensor:
    """uint8 [B,3,S,S] or channels-last uint8 [B,S,S,3] (FFCV) or float [B,3,S,S] in [0,1] -> contiguous
    float [B,3,S,S] in [0,1]."""
    if x.ndim != 4:
        raise ValueError(f"expected a [B,3,S,S] or [B,S,S,3] batch, got shape {tuple(x.shape)}")
    if x.shape[1] != 3 and x.shape[-1] == 3:
        x = x.permute(0, 3, 1, 2)
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    return x.contiguous()


def device_stage(x: Tensor, spec: ViewSpec, mean, std, generator: torch.Generator) -> Tensor:
    """The device half of every backend: colour ops + normalize on an already cropped/flipped view.

    x: uint8 [B,3,S,S], channels-last uint8 [B,S,S,3], or float [B,3,S,S] in [0,1], on the training device.
    -> normalized float [B,3,S,S] on the same device.
    """
    return normalize(color_ops(to_float01(x), spec, generator), mean, std)
