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

Randomness: every random parameter is drawn on the CPU from the `torch.Generator` passed in (ONE [B,13] uniform
draw per `color_ops` / `device_stage` call, the same draws as before the fast path, so a seed reproduces a batch),
then moved to the device in pinned, non-blocking copies. Which samples an op touches, and the blur window, are
decided on the host from those CPU draws, so no op needs a device->host sync.

How the device stage is computed (`device_stage` = `_color_pipeline`; `color_ops_reference` keeps the exact
torchvision-semantics ops, op by op, as the reference the tests compare with):
1. Jitter as colour matrices. Brightness (f*I), contrast (f*I plus (1-f) * the image's mean luma) and saturation
   (f*I + (1-f) * luma rows) are affine maps of the pixel; hue is a rotation of the YIQ chroma plane by
   -2*pi*h (`hue_matrix`) instead of torchvision's RGB->HSV->RGB shift. Position k of each sample's random op
   order becomes one per-sample 3x3 matrix (+ contrast offset), so the 4 ops are 4 batched matmuls
   (`torch.bmm` over [B,3,3] x [B,3,H*W]), each followed by the clamp to [0,1] that torchvision applies after
   every op: the random order and the clipping are kept exactly (tested equal to the reference without hue).
   Samples whose coin skips the jitter get the identity (no index shuffling); a position where every sample
   has the identity is skipped. The first matmul also reads uint8 and FFCV's channels-last layout directly
   (1/255 folded into it), so there is no separate float-conversion or layout pass.
2. Grayscale and normalization are one more matrix after the last clamp: luma rows for the gray samples,
   then diag(1/std) with offset -mean/std. Samples to be solarized are normalized after the solarize.
3. On the CPU steps 1-2 run in chunks of samples (~1.2 MB of pixels, `CPU_CHUNK_BYTES`) that stay in L2 across
   all the matmul/mean/clamp passes; on a GPU in one go.
4. Blur: only the samples whose coin says so, kernel cut at ceil(3 sigma) per sample (`gaussian_blur`, DALI's
   window rule; no denormal-range taps, which made the old 23-tap CPU blur 3x slower for small sigmas), one
   2-D reflect pad instead of one per pass. CPU: in place, sample by sample with its own radius, as shifted
   axpy passes that stay in L2 (`_blur_one_`); GPU: the blurred subset in two grouped convs (index_select,
   blur, index_copy_). Blurring the normalized values equals normalizing the blurred ones (linear, taps
   sum to 1).
5. Solarize: only on the selected samples.
6. CPU threads: the pipeline runs on ONE intra-op thread (`CPU_THREADS`, restored after the call): its ops
   are small and run beside the loader's decoders, where OpenMP barriers on busy cores cost more than the
   second thread gains (A/B in docs/BENCHMARKS.md, Loader).
Accepted distribution changes vs torchvision: the hue tint (YIQ rotation keeps luma and chroma magnitude; HSV
keeps value and saturation; same direction and about the same size of shift per factor) and the blur's dropped
tails (<= 0.27% of the kernel's mass). Over real CIFAR/Imagenette views with the same draws, per-channel
mean/std and HSV saturation/value statistics move by <= 0.0023 (tests/test_augment.py, docs/DATA.md).
Measured per image-view, one thread, old vs new interleaved: 224 px (batch 32) 5.5 -> 0.65-0.78 ms (7-8x);
160 px 2.3 -> 0.41-0.54 ms; 32 px (batch 256) 0.074 -> 0.034-0.039 ms.
"""
from __future__ import annotations

import math
from dataclasses import fields

import torch
import torch.nn.functional as F
from torch import Tensor

from fastcl.device import host_to_device
from fastcl.pipelines.augspec import ViewSpec

GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as PIL and torchvision use


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
    b = host_to_device(boxes.to(torch.float32), x.device)  # pinned + non_blocking: no sync per view on CUDA
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

# RGB -> YIQ (NTSC). Row 0 is the luma of GRAY_WEIGHTS; rows 1 and 2 sum to 0, so greys have I = Q = 0 and stay
# grey under a hue rotation.
_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=torch.float64)
_YIQ_INV = torch.linalg.inv(_YIQ)
_EYE3 = torch.eye(3, dtype=torch.float64)


def _gray(x: Tensor) -> Tensor:
    """[B,3,H,W] -> luma [B,1,H,W]."""
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def hue_matrix(h: Tensor) -> Tensor:
    """Per-sample 3x3 RGB matrices that rotate the chroma (I, Q) plane of YIQ by the angle -2*pi*h, keeping
    luma. h: [n] hue factors (torchvision's, in turns) -> [n,3,3] float64, applied as rgb' = M @ rgb.

    The rotation runs clockwise in the (I, Q) plane (angle -2*pi*h): that is the direction in which HSV hue
    grows (red -> yellow -> green), so a positive factor shifts hues the same way as torchvision's HSV shift.
    It is a linear approximation of that shift: luma and chroma magnitude are kept exactly (HSV keeps value
    and saturation instead), and a rotated colour can leave the RGB cube, so the caller clamps to [0,1].
    """
    th = -2.0 * math.pi * h.to(torch.float64)
    c, s = torch.cos(th), torch.sin(th)
    rot = _EYE3.repeat(len(h), 1, 1)
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = c, -s, s, c
    return _YIQ_INV @ rot @ _YIQ


def jitter_matrices(factors: Tensor, order: Tensor, active: Tensor, strength) -> tuple[Tensor, Tensor]:
    """ColorJitter as 4 affine maps per sample, one per position ("slot") of its random op order.

    factors: [B,4] (brightness, contrast, saturation, hue) factors; order: [B,4] permutation (slot k applies
    op order[:,k]); active: [B] bool (jitter coin); strength: the 4 spec strengths (an op of strength 0 is the
    identity, as torchvision skips it). -> (A [4,B,3,3], coef [4,B]) float64 on the CPU: slot k maps
    rgb -> A[k] @ rgb + coef[k] * mean_luma(image entering slot k), then clamps to [0,1].
      brightness f: f*I;   contrast f: f*I, coef 1-f;   saturation f: f*I + (1-f) * 1 w^T (w = luma weights);
      hue h: `hue_matrix(h)`.   Inactive samples / zero-strength ops: I, coef 0 (exactly the identity).
    """
    B = factors.shape[0]
    f = factors.to(torch.float64)
    fb, fc, fs = (f[:, i, None, None] for i in range(3))
    w = torch.tensor(GRAY_WEIGHTS, dtype=torch.float64)
    per_op = torch.stack([fb * _EYE3, fc * _EYE3, fs * _EYE3 + (1 - fs) * w.expand(3, 3), hue_matrix(f[:, 3])], 1)
    off = torch.zeros(B, 4, dtype=torch.float64)
    off[:, 1] = 1 - f[:, 1]
    for o in range(4):
        if not strength[o] > 0:
            per_op[:, o] = _EYE3
            off[:, o] = 0.0
    rows = torch.arange(B)[:, None]
    A, coef = per_op[rows, order], off[rows, order]  # [B,4,3,3], [B,4]: by slot
    A[~active] = _EYE3
    coef[~active] = 0.0
    return A.transpose(0, 1).contiguous(), coef.t().contiguous()


def _as_bmm_operand(x: Tensor) -> tuple[Tensor, float, int, int]:
    """uint8/float [B,3,H,W] or channels-last [B,H,W,3] -> ([B,3,H*W] view in x's dtype, scale to [0,1], H, W).
    Channels-last input becomes a transposed (stride 1 over channels) view: `torch.bmm` reads it as is, so the
    first colour matrix does the NHWC -> NCHW reordering (and the 1/255 scale) in the same pass."""
    if x.ndim != 4:
        raise ValueError(f"expected a [B,3,S,S] or [B,S,S,3] batch, got shape {tuple(x.shape)}")
    scale = 1.0 / 255.0 if x.dtype == torch.uint8 else 1.0
    if x.shape[1] != 3 and x.shape[-1] == 3:
        B, H, W, _ = x.shape
        return x.reshape(B, H * W, 3).transpose(1, 2), scale, H, W
    B, _, H, W = x.shape
    return x.reshape(B, 3, H * W), scale, H, W


# CPU: samples per chunk of `color_matrix_stage` so that a chunk's float pixels (~1.2 MB) stay in a core's L2
# cache through all the matmul / mean / clamp passes (measured 2x faster than whole-batch passes at 224 px).
CPU_CHUNK_BYTES = 1_200_000


def color_matrix_stage(x: Tensor, A: Tensor, coef: Tensor, scale: float = 1.0,
                       final: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Apply K affine colour maps in sequence, each followed by a clamp to [0,1], as ONE batched matmul per map,
    then optionally one more affine map without a clamp (grayscale and/or normalization).

    x: [B,3,N] uint8 or float, any strides (a channels-last view is fine); A: [K,B,3,3] and coef: [K,B] on the
    CPU (host-side draws; moved in one copy each); `scale` multiplies the input first (1/255 for uint8 pixels;
    folded into map 0). Map k: y = A[k] @ x + coef[k] * mean_luma(x) (the contrast offset: mean luma of the
    image entering map k, computed on the device only where a sample of the chunk has one), then clamp.
    final: (M [B,3,3], off [B,3]) on the CPU: y = M @ y + off, skipped for chunks where it is the identity.
    -> new contiguous float [B,3,N].
    On the CPU the batch is processed in chunks of samples that fit in L2 (`CPU_CHUNK_BYTES`); on a GPU in one go.
    """
    K, B = A.shape[:2]
    N = x.shape[2]
    dev = x.device
    A = A.clone()
    A[0] *= scale
    if final is not None:
        M, off = final
        A = torch.cat([A, M[None].to(A.dtype)])
        final_used = ~(M == _EYE3).flatten(1).all(1) | (off != 0).any(1)  # [B] samples it changes
        with_off = bool((off != 0).any())
    A_d = host_to_device(A.to(torch.float32), dev)
    coef_d = host_to_device(coef.to(torch.float32), dev)
    off_d = host_to_device(off.to(torch.float32), dev) if final is not None else None
    w = host_to_device(torch.tensor(GRAY_WEIGHTS, dtype=torch.float32), dev)
    out = torch.empty(B, 3, N, device=dev)
    c = B if dev.type != "cpu" else max(1, min(B, CPU_CHUNK_BYTES // (12 * N)))
    bufs = [torch.empty(c, 3, N, device=dev) for _ in range(2)] if K + (final is not None) > 1 else []
    for i in range(0, B, c):
        j = min(B, i + c)
        cur = x[i:j] if x.dtype == torch.float32 else x[i:j].float()  # keeps the (transposed) strides
        need_mean = (coef[:, i:j] != 0).any(1).tolist()
        last = K if final is not None and bool(final_used[i:j].any()) else K - 1
        for k in range(last + 1):
            dst = out[i:j] if k == last else bufs[k % 2][: j - i]
            y = torch.bmm(A_d[k, i:j], cur, out=dst)
            if k == K:  # the final map: offset, no clamp
                cur = y.add_(off_d[i:j, :, None]) if with_off else y
                continue
            if need_mean[k]:
                m = cur.mean(2) @ w  # [n] mean luma of the map's input (in input units: * scale for map 0)
                y.add_((coef_d[k, i:j] * (m * scale if k == 0 else m)).view(-1, 1, 1))
            cur = y.clamp_(0, 1)
    return out


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


# the exact per-op torchvision ColorJitter ops, used by `color_ops_reference`
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
    """In place: x[mask] = fn(x[mask], params[mask]...). mask is a CPU bool [B]; params are [B] tensors, on the
    device or (when fn wants host values) on the CPU."""
    idx = mask.nonzero().squeeze(1)  # host-side (CPU mask): no device sync
    if idx.numel() == 0:
        return
    if idx.numel() == x.shape[0]:
        x.copy_(fn(x, *(p.reshape(-1, 1, 1, 1) for p in params)))
        return
    di = host_to_device(idx, x.device)
    sub = fn(x.index_select(0, di),
             *(p.index_select(0, di if p.device == x.device else idx).reshape(-1, 1, 1, 1) for p in params))
    x.index_copy_(0, di, sub)


def blur_kernel_size(spec: ViewSpec, size: int) -> int:
    """The largest blur window: odd(max(3, blur_kernel_frac * size)) (torchvision's 10% convention: 23 px at 224),
    widened to 2 * ceil(3 * sigma_max) + 1 so that no sampled sigma is cut (the source recipes blur with PIL's
    GaussianBlur(radius=sigma), whose std is sigma at any image size; a 3 px window at 32 px held sigma 2 to an
    effective std <= 0.8 px), and at most 2 * (size - 1) + 1 (reflect padding needs radius < size).
    13 px at 32 and 96 px, 23 px at 224 for sigma in (0.1, 2). Each sample's kernel is cut at ceil(3 sigma)
    inside it (`blur_radius`), so only the samples with a large sigma pay for the wide window."""
    k = int(max(3.0, spec.blur_kernel_frac * size))
    k = k if k % 2 else k + 1
    need = 2 * math.ceil(3.0 * float(spec.blur_sigma[1])) + 1
    return max(3, min(max(k, need), 2 * (size - 1) + 1))


def blur_radius(sigma: Tensor, ksize: int) -> Tensor:
    """Per-sample kernel radius: ceil(3 sigma), at most ksize // 2 (DALI's window rule). sigma: [n] CPU."""
    return torch.ceil(3.0 * sigma.double()).clamp(1, ksize // 2).long()


def _separable_blur(x: Tensor, k: Tensor) -> Tensor:
    """x: [B,C,H,W]; k: [B, 2r+1] normalized taps per sample (shared by its C channels), on x's device.
    ONE reflect pad of both axes, then a horizontal and a vertical grouped conv (reflecting rows commutes with
    the horizontal pass, so this equals padding before each pass). The batched path (GPU)."""
    B, C, H, W = x.shape
    r = k.shape[1] // 2
    k = k.repeat_interleave(C, 0)  # [B*C, 2r+1]
    y = F.pad(x.reshape(1, B * C, H, W), (r, r, r, r), mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=B * C)
    y = F.conv2d(y, k[:, None, :, None], groups=B * C)
    return y.reshape(B, C, H, W)


def _blur_one_(x: Tensor, taps: list[float]) -> None:
    """In place on one sample x [1,C,H,W]: separable blur with the symmetric taps k0, k1..kr (one reflect pad,
    then shifted axpy passes). The CPU path: a sample's padded copy and its horizontal pass (~1.3 MB at 224 px)
    stay in L2, each sample uses its own radius, and there is no gather/scatter of the blurred subset; measured
    2.6x faster than the grouped convs (oneDNN's NCHW depthwise kernel is slow for 1-D kernels)."""
    r = len(taps) - 1
    H, W = x.shape[-2:]
    xp = F.pad(x, (r, r, r, r), mode="reflect")
    h = torch.mul(xp[..., r:r + W], taps[0])
    for t in range(1, r + 1):
        h.add_(xp[..., r - t:r - t + W], alpha=taps[t]).add_(xp[..., r + t:r + t + W], alpha=taps[t])
    y = torch.mul(h[..., r:r + H, :], taps[0], out=x)
    for t in range(1, r + 1):
        y.add_(h[..., r - t:r - t + H, :], alpha=taps[t]).add_(h[..., r + t:r + t + H, :], alpha=taps[t])


def gaussian_taps(sigma: Tensor, ksize: int) -> tuple[Tensor, Tensor]:
    """Per-sample Gaussian taps cut at `blur_radius` and renormalized. sigma: [n] (CPU) -> (radius [n] long,
    taps [n, 2R+1] float64, R = the largest radius; a sample's taps beyond its own radius are exactly 0)."""
    s = sigma.detach().to("cpu", torch.float64).reshape(-1)
    rad = blur_radius(s, ksize)
    R = int(rad.max())
    t = torch.arange(-R, R + 1, dtype=torch.float64)
    k = torch.exp(-(t[None] ** 2) / (2 * s[:, None] ** 2)) * (t[None].abs() <= rad[:, None])
    return rad, k / k.sum(1, keepdim=True)


def gaussian_blur_(x: Tensor, mask: Tensor, sigma: Tensor, ksize: int) -> None:
    """In place: blur the samples of x [B,C,H,W] where the CPU bool mask [B] is set, with `gaussian_blur`'s
    kernels (sigma: [B], host draws). CPU: sample by sample (`_blur_one_`); GPU: the blurred subset batched."""
    idx = mask.nonzero().squeeze(1).tolist()
    if not idx:
        return
    if x.device.type != "cpu":
        _apply(x, mask, lambda t, s: gaussian_blur(t, s, ksize), sigma)
        return
    rad, k = gaussian_taps(sigma[idx], ksize)
    R = k.shape[1] // 2
    for i, r, kk in zip(idx, rad.tolist(), k.tolist()):
        _blur_one_(x[i:i + 1], kk[R:R + r + 1])


def gaussian_blur(x: Tensor, sigma: Tensor, ksize: int) -> Tensor:
    """Per-sample Gaussian blur, separable, reflect padding, each sample's kernel cut at ceil(3 sigma)
    (`blur_radius`) and renormalized; a sample's result does not depend on the other samples. The dropped
    tails hold <= 0.27% of the Gaussian's mass; cutting them also avoids denormal-range taps (sigma 0.1 in a
    23-tap window has taps of 1e-39, which made the old full-window CPU blur 3x slower).
    x: [B,C,H,W]; sigma: [B] (host draws: the window is decided on the CPU, no device sync). -> new tensor."""
    if x.device.type == "cpu":
        y = x.clone()
        gaussian_blur_(y, torch.ones(x.shape[0], dtype=torch.bool), sigma, ksize)
        return y
    _, k = gaussian_taps(sigma, ksize)
    return _separable_blur(x, host_to_device(k.to(x.dtype), x.device))


def gaussian_blur_full(x: Tensor, sigma: Tensor, ksize: int) -> Tensor:
    """The reference blur: the full ksize window for every sample (torchvision's GaussianBlur(ksize, sigma)).
    sigma: [B] on x's device."""
    r = ksize // 2
    t = torch.arange(ksize, device=x.device, dtype=x.dtype) - r
    k = torch.exp(-(t[None] ** 2) / (2 * sigma.to(x.dtype).reshape(-1)[:, None] ** 2))
    return _separable_blur(x, k / k.sum(1, keepdim=True))


def _draw(B: int, spec: ViewSpec, generator: torch.Generator) -> dict:
    """All random parameters of `color_ops` for a batch, on the CPU: one [B,13] uniform draw (a fixed count per
    call, so a seed reproduces a batch): 0 jitter?, 1-4 factors, 5-8 order keys, 9 gray?, 10 blur?, 11 sigma,
    12 solarize?"""
    u = torch.rand(B, 13, generator=generator)
    strength = (float(spec.brightness), float(spec.contrast), float(spec.saturation), float(spec.hue))
    lo = torch.tensor([max(0.0, 1 - strength[0]), max(0.0, 1 - strength[1]), max(0.0, 1 - strength[2]), -strength[3]])
    hi = torch.tensor([1 + strength[0], 1 + strength[1], 1 + strength[2], strength[3]])
    s0, s1 = float(spec.blur_sigma[0]), float(spec.blur_sigma[1])
    return {"strength": strength, "factors": lo + (hi - lo) * u[:, 1:5],  # [B,4]
            "order": u[:, 5:9].argsort(dim=1),  # [B,4] a random permutation of the 4 ops per sample
            "jitter": u[:, 0] < spec.jitter_p, "gray": u[:, 9] < spec.gray_p, "blur": u[:, 10] < spec.blur_p,
            "sigma": s0 + (s1 - s0) * u[:, 11], "solarize": u[:, 12] < spec.solarize_p}


def _gray_blur_solarize(x: Tensor, d: dict, spec: ViewSpec, ksize: int, blur) -> Tensor:
    """The ops after the jitter, each on its own subset of samples, in place on x [B,3,H,W] in [0,1]."""
    _apply(x, d["gray"], lambda t: _gray(t).expand_as(t))
    _apply(x, d["blur"], blur, d["sigma"])
    thr = float(spec.solarize_threshold)
    _apply(x, d["solarize"], lambda t: torch.where(t >= thr, 1 - t, t))
    return x


def _affine_normalization(mean, std) -> tuple[Tensor, Tensor]:
    """(diag(1/std) [3,3], -mean/std [3]) float64: normalization as an affine colour map."""
    m = torch.tensor([float(v) for v in mean], dtype=torch.float64)
    s = torch.tensor([float(v) for v in std], dtype=torch.float64)
    return torch.diag(1.0 / s), -m / s


# CPU: intra-op threads for the colour pipeline (None: leave torch's setting). Its ops are small on purpose
# (L2-sized chunks, one blurred sample at a time) and in a loader they run beside the decoders (torch's worker
# processes, ffcv's numba threads), so splitting each op over OpenMP threads only adds barrier waits on
# oversubscribed cores: measured in the loader benchmark (docs/BENCHMARKS.md, Loader). The previous thread count
# is restored after the call.
CPU_THREADS: int | None = 1


def _color_pipeline(x: Tensor, spec: ViewSpec, generator: torch.Generator, mean=None, std=None) -> Tensor:
    """`color_ops`, and with mean/std also the normalization (`device_stage`), fused as described there."""
    prev = torch.get_num_threads()
    if x.device.type != "cpu" or CPU_THREADS is None or prev == CPU_THREADS:
        return _color_pipeline_impl(x, spec, generator, mean, std)
    torch.set_num_threads(CPU_THREADS)
    try:
        return _color_pipeline_impl(x, spec, generator, mean, std)
    finally:
        torch.set_num_threads(prev)


def _color_pipeline_impl(x: Tensor, spec: ViewSpec, generator: torch.Generator, mean=None, std=None) -> Tensor:
    B = x.shape[0]
    d = _draw(B, spec, generator)
    X, scale, H, W = _as_bmm_operand(x)
    A, coef = jitter_matrices(d["factors"], d["order"], d["jitter"], d["strength"])
    keep = [0] + [k for k in range(1, 4) if not (torch.equal(A[k], _EYE3.expand_as(A[k])) and not coef[k].any())]
    # final map (no clamp): grayscale (luma in all 3 channels: rows = w) for the gray samples, then the
    # normalization for every sample that is not solarized (solarize thresholds raw [0,1] values: those
    # samples are normalized after it)
    gray_m = torch.tensor(GRAY_WEIGHTS, dtype=torch.float64).expand(3, 3)
    M = torch.where(d["gray"][:, None, None], gray_m, _EYE3)
    off = torch.zeros(B, 3, dtype=torch.float64)
    normalized = mean is not None
    if normalized:
        D, o = _affine_normalization(mean, std)
        late = d["solarize"]
        M = torch.where(late[:, None, None], M, D @ M)
        off = torch.where(late[:, None], off, o)
    y = color_matrix_stage(X, A[keep], coef[keep], scale, (M, off)).view(B, 3, H, W)
    ksize = blur_kernel_size(spec, H)
    # blur is linear with taps summing to 1 and reflect padding, so it commutes with the per-channel affine
    # normalization: blurring normalized values gives the normalized blur. In [0,1] units it is clamped like
    # every op of the reference (a convex combination: only float rounding can leave the range).
    gaussian_blur_(y, d["blur"], d["sigma"], ksize)
    if not normalized and bool(d["blur"].any()):
        y.clamp_(0, 1)  # a no-op on the other samples
    thr = float(spec.solarize_threshold)
    _apply(y, d["solarize"], lambda t: torch.where(t >= thr, 1 - t, t))
    if normalized and bool(d["solarize"].any()):
        _apply(y, d["solarize"], lambda t: normalize(t, mean, std))
    return y


def color_ops(x: Tensor, spec: ViewSpec, generator: torch.Generator) -> Tensor:
    """Colour jitter (p=jitter_p; per-sample factors AND per-sample random order of brightness, contrast,
    saturation, hue, as torchvision's ColorJitter), grayscale (p=gray_p), Gaussian blur (p=blur_p, sigma ~
    U(blur_sigma)), solarize (p=solarize_p).

    x: uint8 [B,3,S,S], channels-last uint8 [B,S,S,3] (FFCV) or float [B,3,S,S] in [0,1].
    -> new float [B,3,S,S] in [0,1].

    Same draws and the same op semantics as `color_ops_reference` (torchvision's), computed faster:
    - jitter: each op is an affine map of the pixel (brightness, contrast and saturation exactly; hue as a YIQ
      chroma rotation, `hue_matrix`, instead of the HSV round trip). Slot k of every sample's random order is
      one per-sample 3x3 matrix (+ contrast offset), and all samples go through up to 4 batched matmuls, each
      followed by the clamp torchvision applies after every op (`color_matrix_stage`); samples without jitter
      get the identity. The first matmul also converts uint8 / channels-last input (no separate float pass);
      grayscale is one more matrix (luma rows) after the last clamp, for the chunks that hold a gray sample.
    - blur: kernel cut at ceil(3 sigma) per sample (`gaussian_blur`), only on the samples that are blurred.
    - solarize: on the selected samples only (index_select, op, index_copy_).
    """
    return _color_pipeline(x, spec, generator)


def color_ops_reference(x: Tensor, spec: ViewSpec, generator: torch.Generator) -> Tensor:
    """The exact torchvision-semantics colour ops, op by op (HSV round trip for hue, the full blur window): the
    reference `color_ops` is tested against, with the same draws from `generator`. Same inputs and output."""
    d = _draw(x.shape[0], spec, generator)
    x = to_float01(x).clone()  # the ops below work in place on our own copy
    factors = host_to_device(d["factors"], x.device)
    for k in range(4):
        for o, fn in enumerate(_JITTER_OPS):
            if d["strength"][o] > 0:
                _apply(x, d["jitter"] & (d["order"][:, k] == o), fn, factors[:, o])
    ksize = blur_kernel_size(spec, x.shape[2])
    sigma = host_to_device(d["sigma"], x.device)
    d = {**d, "sigma": sigma}
    return _gray_blur_solarize(x, d, spec, ksize, lambda t, s: gaussian_blur_full(t, s.view(-1), ksize)).clamp_(0, 1)


def normalize(x: Tensor, mean, std) -> Tensor:
    """(x - mean) / std per channel, computed as x * (1/std) + (-mean/std) in one pass. x: [B,3,H,W] float;
    mean, std: 3 numbers. -> new tensor."""
    m = torch.tensor([float(v) for v in mean], dtype=torch.float64)
    s = torch.tensor([float(v) for v in std], dtype=torch.float64)
    ab = host_to_device(torch.stack([1.0 / s, -m / s]).to(x.dtype), x.device).view(2, 1, -1, 1, 1)
    return torch.addcmul(ab[1], x, ab[0])


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
    Equals `normalize(color_ops(x, ...), mean, std)` (up to float rounding) with the normalization folded into
    the last colour matrix (`_color_pipeline`), so it costs no pass of its own.
    """
    return _color_pipeline(x, spec, generator, mean, std)
