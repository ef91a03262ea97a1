"""Batched augmentation ops (fastcl.pipelines.augment): statistics, exactness, and the device stage on real
CIFAR JPEGs; the fast colour path (`color_ops` / `device_stage`: colour matrices, YIQ hue, 3-sigma blur) against
the exact torchvision-semantics reference (`color_ops_reference`: per-op clamps, HSV hue, full blur window)."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from fastcl.pipelines import augment
from fastcl.pipelines.augment import (as_view_spec, blur_kernel_size, blur_radius, color_ops, color_ops_reference,
                                      crop_resize, device_stage, flip, gaussian_blur, gaussian_blur_full, hsv_to_rgb,
                                      normalize, rgb_to_hsv, rrc_box, rrc_params)
from fastcl.pipelines.augspec import CIFAR10_MEAN, CIFAR10_STD, ViewSpec
from fastcl.pipelines.folder import decode_uint8, scan_folder

# a view spec with every colour op off; each test switches on the op it checks
OFF = dict(jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def expected_rrc_area(scale=(0.2, 1.0), ratio=(0.75, 4 / 3), attempts=10, grid=2000) -> float:
    """E[crop area fraction] of RandomResizedCrop on a large SQUARE image, by midpoint integration.

    An attempt (s ~ U(scale), log r ~ U(log ratio)) fits iff s*r <= 1 and s/r <= 1; the first fitting attempt
    is taken, else the fallback is the whole image (ratio 1 lies in the range)."""
    s = scale[0] + (np.arange(grid) + 0.5) / grid * (scale[1] - scale[0])
    lr = math.log(ratio[0]) + (np.arange(grid) + 0.5) / grid * (math.log(ratio[1]) - math.log(ratio[0]))
    fits = s[:, None] <= np.exp(-np.abs(lr))[None, :]
    q = fits.mean()
    e_fit = (s[:, None] * fits).sum() / fits.sum()
    fail = (1 - q) ** attempts
    return (1 - fail) * e_fit + fail * 1.0


def test_rrc_params_statistics():
    n, side = 20000, 1000  # large image: rounding to whole pixels is negligible
    spec = ViewSpec()
    b = rrc_params(n, torch.full((n,), side), torch.full((n,), side), spec, gen())
    y0, x0, h, w = b.unbind(1)
    assert b.shape == (n, 4) and b.dtype == torch.float32
    assert (y0 >= 0).all() and (x0 >= 0).all() and (y0 + h <= side).all() and (x0 + w <= side).all()
    area = h * w / side**2
    assert area.min() >= spec.scale[0] - 0.005 and area.max() <= 1.0
    aspect = w / h
    assert aspect.min() >= spec.ratio[0] * 0.99 and aspect.max() <= spec.ratio[1] * 1.01
    assert abs(area.mean().item() - expected_rrc_area()) < 0.01
    # positions are spread over the free range, not pinned to a corner
    assert (y0 / (side - h).clamp(min=1)).mean().item() == pytest.approx(0.5, abs=0.03)


def test_rrc_params_mixed_sizes_and_fallback():
    n = 2000
    H = torch.randint(8, 64, (n,), generator=gen(1))
    W = torch.randint(8, 64, (n,), generator=gen(2))
    b = rrc_params(n, H, W, ViewSpec(), gen(3))
    y0, x0, h, w = b.unbind(1)
    assert (h >= 1).all() and (w >= 1).all() and (y0 + h <= H).all() and (x0 + w <= W).all()
    # a 10x100 strip never fits the ratio range: the fallback is the centered crop at the max ratio (13x10)
    fb = rrc_params(5, torch.tensor(10), torch.tensor(100), ViewSpec(scale=(0.9, 1.0)), gen())
    assert torch.equal(fb, torch.tensor([[0.0, 43.0, 10.0, 13.0]]).expand(5, 4))
    # same generator state -> same boxes
    assert torch.equal(rrc_params(n, H, W, ViewSpec(), gen(3)), b)


def test_rrc_box_matches_rrc_params():
    """The per-sample worker path draws and decides exactly like the batched one."""
    for i in range(300):
        H, W = (int(v) for v in torch.randint(1, 300, (2,), generator=gen(i)))
        spec = ViewSpec(scale=(0.08, 1.0) if i % 2 else (0.9, 1.0))
        ref = rrc_params(1, torch.tensor(H), torch.tensor(W), spec, gen(i))[0]
        assert rrc_box(H, W, spec, gen(i)) == tuple(int(v) for v in ref)


def test_crop_resize_exact_crops():
    x = torch.randint(0, 256, (4, 3, 20, 24), dtype=torch.uint8)
    square = x[..., :, :20]  # the whole image at its own size is the identity
    assert torch.allclose(crop_resize(square, torch.tensor([[0.0, 0.0, 20.0, 20.0]]).expand(4, 4), 20),
                          square.float() / 255, atol=1e-6)
    # a box of the output size is an exact slice (pixel centers land on pixel centers). Tolerance: grid_sample
    # un-normalises float32 coordinates (error ~W·eps ≈ 2e-6 px here), which moves a value by up to that times the
    # neighbour difference; 1e-6 failed once in a fresh-clone run, a half-pixel shift would be ~0.5.
    box = torch.tensor([[3.0, 5.0, 8.0, 8.0]]).expand(4, 4)
    assert torch.allclose(crop_resize(x, box, 8), x[:, :, 3:11, 5:13].float() / 255, atol=1e-5)
    # float input keeps its range; a constant region stays constant when upsampled
    c = torch.full((2, 3, 16, 16), 0.25)
    assert torch.allclose(crop_resize(c, torch.tensor([[2.0, 2.0, 5.0, 7.0]]).expand(2, 4), 32), c[..., :1, :1])


def test_flip_rate():
    x = torch.rand(4000, 3, 2, 2)
    y = flip(x, 0.5, gen())
    flipped = (y == x.flip(-1)).flatten(1).all(1)
    same = (y == x).flatten(1).all(1)
    assert (flipped ^ same).all()
    assert flipped.float().mean().item() == pytest.approx(0.5, abs=0.03)
    assert torch.equal(flip(x, 0.0, gen()), x)


def test_grayscale_rate_and_luma():
    x = torch.rand(4000, 3, 4, 4)
    y = color_ops(x, ViewSpec(**{**OFF, "gray_p": 0.3}), gen())
    gray = (y.amax(1) - y.amin(1)).flatten(1).amax(1) < 1e-6
    assert gray.float().mean().item() == pytest.approx(0.3, abs=0.03)
    luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    assert torch.allclose(y[gray, 0], luma[gray], atol=1e-6)
    assert torch.equal(y[~gray], x[~gray])


def high_freq(x: torch.Tensor) -> torch.Tensor:
    """Mean squared neighbour difference per sample: [B]."""
    dx = (x[..., 1:] - x[..., :-1]) ** 2
    dy = (x[..., 1:, :] - x[..., :-1, :]) ** 2
    return dx.mean(dim=(1, 2, 3)) + dy.mean(dim=(1, 2, 3))


def test_blur_smooths_and_rate():
    # 10% of the side (23 px at 224), widened to 2*ceil(3*sigma_max)+1 = 13 px so that sigma 2 is never cut
    assert [blur_kernel_size(ViewSpec(), s) for s in (8, 32, 96, 224)] == [13, 13, 13, 23]
    assert blur_kernel_size(ViewSpec(blur_sigma=(0.1, 5.0)), 8) == 15  # reflect padding: radius < side
    x = torch.rand(64, 3, 32, 32)
    y = color_ops(x, ViewSpec(**{**OFF, "blur_p": 1.0, "blur_sigma": (0.5, 2.0)}), gen())
    assert (high_freq(y) < 0.7 * high_freq(x)).all()
    assert torch.allclose(y.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=0.02)  # kernel sums to 1
    xs = torch.rand(2000, 3, 8, 8)
    ys = color_ops(xs, ViewSpec(**{**OFF, "blur_p": 0.5}), gen())
    changed = (ys != xs).flatten(1).any(1)
    assert changed.float().mean().item() == pytest.approx(0.5, abs=0.04)


def test_solarize_inverts_above_threshold():
    x = torch.rand(16, 3, 8, 8)
    y = color_ops(x, ViewSpec(**{**OFF, "solarize_p": 1.0, "solarize_threshold": 0.5}), gen())
    assert torch.allclose(y, torch.where(x >= 0.5, 1 - x, x))


def test_brightness_factors_per_sample():
    x = 0.2 + 0.4 * torch.rand(500, 3, 4, 4)  # stays inside [0,1] for factors in [0.6, 1.4]
    spec = ViewSpec(**{**OFF, "jitter_p": 1.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0})
    f = (color_ops(x, spec, gen()) / x).flatten(1)
    assert torch.allclose(f, f[:, :1].expand_as(f), atol=1e-5)  # one factor per sample
    assert f[:, 0].min() >= 0.6 - 1e-5 and f[:, 0].max() <= 1.4 + 1e-5 and f[:, 0].std() > 0.15


YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def to_yiq(x: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ij,bjhw->bihw", YIQ, x)


def test_hue_rotates_chroma_keeps_luma():
    """The fast hue op is a rotation of the YIQ chroma plane by -2*pi*h: luma and chroma magnitude are kept,
    one angle per sample. (The exact HSV shift keeps HSV value and saturation instead; it is the reference,
    checked against distributionally below.) Inputs near mid-grey, so that no rotation leaves the RGB cube."""
    x = 0.35 + 0.3 * torch.rand(200, 3, 6, 6, generator=gen(1))
    assert torch.allclose(hsv_to_rgb(rgb_to_hsv(x)), x, atol=1e-5)
    spec = ViewSpec(**{**OFF, "jitter_p": 1.0, "brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.5})
    y = color_ops(x, spec, gen())
    assert y.min() > 0 and y.max() < 1  # no clamp involved
    qx, qy = to_yiq(x), to_yiq(y)
    assert torch.allclose(qy[:, 0], qx[:, 0], atol=1e-5)  # luma kept
    assert torch.allclose(qy[:, 1:].norm(dim=1), qx[:, 1:].norm(dim=1), atol=1e-5)  # chroma magnitude kept
    ang = torch.atan2(qy[:, 2], qy[:, 1]) - torch.atan2(qx[:, 2], qx[:, 1])
    ang = torch.remainder(ang + math.pi, 2 * math.pi).flatten(1) - math.pi  # in [-pi, pi)
    circ = torch.remainder(ang - ang[:, :1], 2 * math.pi)
    assert (torch.minimum(circ, 2 * math.pi - circ).amax(1) < 1e-3).all()  # one rotation per sample
    assert ang[:, 0].std() > 0.5  # hue factors ~ U(-0.5, 0.5) turn: angles spread over the circle


def test_hue_direction_and_size_match_hsv_reference():
    """Same draws, same hue factor: the YIQ rotation shifts HSV hue the same way and by about as much as the
    exact HSV shift (it is not identical: YIQ and HSV hue circles are not uniformly related)."""
    x = torch.rand(400, 3, 8, 8, generator=gen(2))
    spec = ViewSpec(**{**OFF, "jitter_p": 1.0, "brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.1})
    fast, ref = color_ops(x, spec, gen(3)), color_ops_reference(x, spec, gen(3))
    hx = rgb_to_hsv(x)
    colourful = hx[:, 1] > 0.3

    def shift(y):  # per-sample circular mean HSV hue shift over the colourful pixels, in turns
        d = 2 * math.pi * (rgb_to_hsv(y)[:, 0] - hx[:, 0])
        s, c = (torch.sin(d) * colourful).sum((1, 2)), (torch.cos(d) * colourful).sum((1, 2))
        return torch.atan2(s, c) / (2 * math.pi)

    sf, sr = shift(fast), shift(ref)
    assert sr.abs().max() <= 0.1 + 1e-4 and sr.std() > 0.05  # the reference shifts by the factor itself
    assert np.corrcoef(sf.numpy(), sr.numpy())[0, 1] > 0.98
    assert (sf - sr).abs().mean() < 0.01 and (sf - sr).abs().max() < 0.03


def test_jitter_without_hue_equals_reference():
    """Brightness, contrast, saturation as colour matrices, in each sample's random order, with the clamp after
    every op: identical (to float rounding) to the op-by-op reference, also where strong factors clip."""
    x = torch.rand(500, 3, 5, 5, generator=gen(4))
    for spec in (ViewSpec(**{**OFF, "jitter_p": 0.8, "hue": 0.0}),
                 ViewSpec(**{**OFF, "jitter_p": 1.0, "hue": 0.0, "brightness": 0.9, "contrast": 0.9,
                             "saturation": 0.9, "gray_p": 0.3})):
        fast, ref = color_ops(x, spec, gen(5)), color_ops_reference(x, spec, gen(5))
        assert torch.allclose(fast, ref, atol=2e-6), (fast - ref).abs().max()
        assert ((fast == 0) | (fast == 1)).float().mean() > (0.05 if spec.brightness > 0.5 else 0.0)
    # uint8 input in both layouts through the same matrices
    x8 = (x * 255).round().to(torch.uint8)
    spec = ViewSpec(**{**OFF, "jitter_p": 0.8, "hue": 0.0})
    ref = color_ops_reference(x8, spec, gen(6))
    assert torch.allclose(color_ops(x8, spec, gen(6)), ref, atol=2e-6)
    assert torch.allclose(color_ops(x8.permute(0, 2, 3, 1).contiguous(), spec, gen(6)), ref, atol=2e-6)


# ------------------------------------------------------------------ blur: effective std against the sampled sigma
# The source recipes blur with PIL's GaussianBlur(radius=sigma) (MoCo-v2 `loader.GaussianBlur`, SCE CIFAR
# `RandomPILGaussianBlur`), whose std is sigma at any image size. An impulse image through each backend's blur
# gives the blur's own kernel; its spatial std must match the sampled sigma. Below ~0.5 px a Gaussian sampled on
# the pixel grid is narrower than sigma whatever the window (sigma 0.3: taps 0.004/0.992/0.004, std 0.09), so
# the check covers the draws with sigma >= 0.5 (about three quarters of U(0.1, 2)).
BLUR_SIGMA_MIN_MEASURABLE = 0.5
BLUR_TOL = 0.15


def impulse(n: int, size: int) -> torch.Tensor:
    """[n,3,S,S] float zeros with a single 1 at the centre pixel."""
    x = torch.zeros(n, 3, size, size)
    x[:, :, size // 2, size // 2] = 1.0
    return x


def effective_std(y: torch.Tensor) -> torch.Tensor:
    """[n,C,S,S] blurred impulses -> [n] std (px) of channel 0's horizontal marginal (the blur is separable)."""
    w = y[:, 0].double().sum(1)  # [n, S]: column marginal
    w = w / w.sum(1, keepdim=True)
    pos = torch.arange(w.shape[1], dtype=torch.float64)
    mu = (w * pos).sum(1, keepdim=True)
    return ((w * (pos - mu) ** 2).sum(1)).sqrt()


def check_blur_std(std: torch.Tensor, sigma: torch.Tensor, what: str) -> None:
    keep = sigma >= BLUR_SIGMA_MIN_MEASURABLE
    assert int(keep.sum()) >= 8, "too few measurable draws"
    rel = (std[keep] / sigma[keep].double() - 1).abs()
    worst = int(rel.argmax())
    assert float(rel.max()) <= BLUR_TOL, (f"{what}: effective std {float(std[keep][worst]):.3f} px for sampled "
                                          f"sigma {float(sigma[keep][worst]):.3f} px")


@pytest.mark.parametrize("size", [32, 224])
def test_blur_effective_std_device_stage(size):
    """torch / gpu_tensor / ffcv device stage (`device_stage`, the CPU path: per-sample axpy passes)."""
    n = 48 if size == 32 else 24
    spec = ViewSpec(**{**OFF, "size": size, "blur_p": 1.0})  # sigma ~ U(0.1, 2), the recipes' range
    sigma = augment._draw(n, spec, gen(11))["sigma"]  # the draws device_stage makes from the same seed
    y = device_stage(impulse(n, size), spec, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), gen(11))
    check_blur_std(effective_std(y), sigma, f"device_stage cpu {size}px")


@pytest.mark.parametrize("size", [32, 224])
def test_blur_effective_std_batched_path(size):
    """The batched blur of the GPU device stage (grouped convs over the blurred subset): on a CUDA device the
    real device_stage, else the same taps through `_separable_blur` on the CPU."""
    n = 48 if size == 32 else 24
    spec = ViewSpec(**{**OFF, "size": size, "blur_p": 1.0})
    sigma = augment._draw(n, spec, gen(12))["sigma"]
    if torch.cuda.is_available():
        y = device_stage(impulse(n, size).cuda(), spec, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), gen(12)).cpu()
    else:
        _, k = augment.gaussian_taps(sigma, blur_kernel_size(spec, size))
        y = augment._separable_blur(impulse(n, size), k.float())
    check_blur_std(effective_std(y), sigma, f"batched blur {size}px")


@pytest.mark.parametrize("size", [32, 224])
def test_blur_effective_std_dali(size):
    """The DALI graph's blur (`dali_loader.blur_graph`, the node the loader builds), CPU pipeline; it returns
    the sigma it sampled."""
    pytest.importorskip("nvidia.dali")
    import numpy as np
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath

    from fastcl.pipelines.dali_loader import blur_graph

    n = 32
    spec = ViewSpec(**{**OFF, "size": size, "blur_p": 1.0})
    img = np.zeros((size, size, 3), np.float32)
    img[size // 2, size // 2] = 1.0

    @pipeline_def(enable_conditionals=True)
    def graph():
        x = fn.external_source(source=lambda: [img] * n, layout="HWC", dtype=types.FLOAT)
        return blur_graph(x, spec, fn, types, dmath)

    pipe = graph(batch_size=n, num_threads=1, device_id=None, seed=13)
    pipe.build()
    out, sig = pipe.run()
    y = torch.from_numpy(np.stack([np.asarray(out[i]) for i in range(n)])).permute(0, 3, 1, 2)
    sigma = torch.tensor([float(np.asarray(sig[i])) for i in range(n)])
    check_blur_std(effective_std(y), sigma, f"dali cpu {size}px")


def test_blur_cut_at_3_sigma():
    assert blur_radius(torch.tensor([0.1, 0.34, 1.0, 1.7, 2.0, 5.0]), 23).tolist() == [1, 2, 3, 6, 6, 11]
    assert blur_radius(torch.tensor([0.1, 2.0]), 3).tolist() == [1, 1]  # capped by the spec's window
    x = torch.rand(12, 3, 40, 40, generator=gen(7))
    sigma = torch.linspace(0.1, 2.0, 12)
    y = gaussian_blur(x, sigma, 23)
    # a sample's result does not depend on the batch (its taps beyond ceil(3 sigma) are 0, not the batch's)
    for i in (0, 5, 11):
        assert torch.allclose(gaussian_blur(x[i:i + 1], sigma[i:i + 1], 23), y[i:i + 1], atol=1e-6)
    # the batched GPU path (grouped convs over the subset, window = the batch's largest radius) is the same blur
    _, k = augment.gaussian_taps(sigma, 23)
    assert torch.allclose(augment._separable_blur(x, k.float()), y, atol=1e-6)
    # in place on a subset (the pipeline's call) leaves the other samples alone
    z = x.clone()
    mask = torch.arange(12) % 3 == 0
    augment.gaussian_blur_(z, mask, sigma, 23)
    assert torch.allclose(z[mask], y[mask], atol=1e-6) and torch.equal(z[~mask], x[~mask])
    # vs the full 23-tap window: the cut tails hold <= 0.27% of the mass
    full = gaussian_blur_full(x, sigma, 23)
    assert (y - full).abs().max() < 5e-3 and (y - full).abs().mean() < 5e-4
    assert torch.allclose(y.mean((1, 2, 3)), x.mean((1, 2, 3)), atol=0.01)


def test_device_stage_is_normalized_color_ops():
    """Normalization folded into the last colour matrix (and blur commuting with it) changes nothing but
    rounding; solarized samples are normalized after the solarize."""
    x = torch.randint(0, 256, (64, 3, 12, 12), dtype=torch.uint8, generator=gen(8))
    for spec in (ViewSpec(), ViewSpec(gray_p=0.5, solarize_p=0.5, blur_p=0.5), ViewSpec(**OFF)):
        a = device_stage(x, spec, CIFAR10_MEAN, CIFAR10_STD, gen(9))
        b = normalize(color_ops(x, spec, gen(9)), CIFAR10_MEAN, CIFAR10_STD)
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_cpu_threads_restored_and_irrelevant_to_results(monkeypatch):
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=gen(12))
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        a = device_stage(x, ViewSpec(), CIFAR10_MEAN, CIFAR10_STD, gen(13))  # runs on augment.CPU_THREADS = 1
        assert torch.get_num_threads() == 2
        monkeypatch.setattr(augment, "CPU_THREADS", None)
        b = device_stage(x, ViewSpec(), CIFAR10_MEAN, CIFAR10_STD, gen(13))
    finally:
        torch.set_num_threads(prev)
    assert torch.allclose(a, b, atol=1e-6)


def test_cpu_chunking_does_not_change_results(monkeypatch):
    x = torch.randint(0, 256, (10, 3, 16, 16), dtype=torch.uint8, generator=gen(10))
    spec = ViewSpec(gray_p=0.5)
    want = device_stage(x, spec, CIFAR10_MEAN, CIFAR10_STD, gen(11))
    for chunk_bytes in (1, 3 * 12 * 16 * 16, 10**9):  # 1 sample, 3 samples (uneven), the whole batch
        monkeypatch.setattr(augment, "CPU_CHUNK_BYTES", chunk_bytes)
        assert torch.allclose(device_stage(x, spec, CIFAR10_MEAN, CIFAR10_STD, gen(11)), want, atol=1e-6)


def test_jitter_p_and_reproducibility():
    x = torch.rand(2000, 3, 4, 4)
    spec = ViewSpec(**{**OFF, "jitter_p": 0.8})
    y = color_ops(x, spec, gen(5))
    assert (y != x).flatten(1).any(1).float().mean().item() == pytest.approx(0.8, abs=0.03)
    assert torch.equal(color_ops(x, spec, gen(5)), y)
    assert not torch.equal(color_ops(x, spec, gen(6)), y)
    assert y.min() >= 0 and y.max() <= 1


@pytest.fixture(scope="module")
def cifar_uint8(cifar_folder) -> torch.Tensor:
    paths = scan_folder(os.path.join(cifar_folder, "train")).paths[::2]  # 250 images, all classes
    return decode_uint8(paths, lambda im: im, (32, 32))


def test_device_stage_layouts_and_normalization(cifar_uint8):
    x = cifar_uint8
    spec = ViewSpec()  # the full MoCo-v2 colour recipe
    a = device_stage(x, spec, CIFAR10_MEAN, CIFAR10_STD, gen(7))
    b = device_stage(x.permute(0, 2, 3, 1).contiguous(), spec, CIFAR10_MEAN, CIFAR10_STD, gen(7))  # FFCV layout
    c = device_stage(x.float() / 255, spec, CIFAR10_MEAN, CIFAR10_STD, gen(7))
    assert a.shape == (len(x), 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and torch.allclose(a, c, atol=1e-5)
    assert abs(a.mean().item()) < 0.5 and 0.5 < a.std().item() < 1.5
    # with the colour ops off it is exactly the per-channel normalization
    plain = device_stage(x, ViewSpec(**OFF), CIFAR10_MEAN, CIFAR10_STD, gen())
    m = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    s = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    assert torch.allclose(plain, (x.float() / 255 - m) / s, atol=1e-5)
    assert plain.mean(dim=(0, 2, 3)).abs().max() < 0.3 and (plain.std(dim=(0, 2, 3)) - 1).abs().max() < 0.3


def test_as_view_spec_from_config_node():
    from omegaconf import OmegaConf
    node = OmegaConf.structured(ViewSpec(size=48, scale=(0.3, 0.9)))
    v = as_view_spec(node)
    assert isinstance(v, ViewSpec) and v.size == 48 and v.scale == (0.3, 0.9)


def colour_stats(y: torch.Tensor) -> dict:
    hsv = rgb_to_hsv(y)
    return {"channel_mean": y.mean((0, 2, 3)), "channel_std": y.std((0, 2, 3)), "sat_mean": hsv[:, 1].mean(),
            "sat_std": hsv[:, 1].std(), "value_mean": hsv[:, 2].mean(), "image_mean": y.mean((2, 3))}


# |fast - exact| allowed per statistic. Measured on 2026-11-23 (same draws, CIFAR 1,000 views / Imagenette 120
# views at 224 px, full recipe and jitter only): channel mean <= 0.0014, channel std <= 0.0013, saturation mean
# <= 0.0016, saturation std <= 0.0023, value mean <= 0.0011, per-image channel mean 0.010 on average. For scale:
# two disjoint seed sets of the EXACT reference differ by up to 0.0055 (channel mean), 0.0023 (std), 0.0013
# (saturation mean), 0.0007 (saturation std) on the CIFAR 1,000 views. The bounds are ~2x the measured gaps.
DIST_TOL = {"channel_mean": 0.003, "channel_std": 0.003, "sat_mean": 0.0035, "sat_std": 0.005, "value_mean": 0.0025}


@pytest.fixture(scope="module")
def imagenette_uint8(imagenette_folder) -> torch.Tensor:
    paths = scan_folder(os.path.join(imagenette_folder, "train")).paths  # 60 photos, 3 classes
    return decode_uint8(paths, lambda im: im.resize((224, 224)), (224, 224))


@pytest.mark.parametrize("data", ["cifar", "imagenette"])
@pytest.mark.parametrize("recipe", ["full", "jitter_only"])
def test_fast_colour_distribution_matches_exact_reference(request, data, recipe):
    """The accepted approximations (YIQ hue rotation instead of the HSV shift; blur cut at 3 sigma) leave the
    output distribution where the exact torchvision-semantics ops put it: per-channel mean/std, HSV saturation
    and value statistics over real images, with the same random draws."""
    x = request.getfixturevalue("cifar_uint8" if data == "cifar" else "imagenette_uint8")
    S = x.shape[-1]
    spec = ViewSpec(size=S) if recipe == "full" else ViewSpec(size=S, jitter_p=1.0, gray_p=0.0, blur_p=0.0)
    seeds = range(4) if data == "cifar" else range(2)
    fast = colour_stats(torch.cat([color_ops(x, spec, gen(s)) for s in seeds]))
    ref = colour_stats(torch.cat([color_ops_reference(x, spec, gen(s)) for s in seeds]))
    for k, tol in DIST_TOL.items():
        assert (fast[k] - ref[k]).abs().max() < tol, (k, fast[k], ref[k])
    # paired per image: the same view differs by a tint, not by a different augmentation
    assert (fast["image_mean"] - ref["image_mean"]).abs().mean() < 0.02
