"""Augmentation parity: torch, ffcv and dali draw views of the SAME images from the same AugSpec; their
distributions must agree within the tolerances below (docs/DATA.md lists the known differences).

Geometry is read from the pixels: `zz_coord` samples are copies of a 128x128 coordinate map (R = 2x, G = 2y),
and view 1 does crop + flip only (no colour op), so each output's min/max R and G give its crop box:
an output pixel j of S samples the source at x0 + (j + 0.5) w / S, hence w = (maxR - minR) / 2 * S / (S - 1)
(exact for any symmetric, normalized resampling kernel on a linear ramp: bilinear, PIL/DALI antialiasing,
cv2 INTER_AREA). Flip: the left edge holds larger R than the right. The reference is `augment.rrc_params`
(torchvision's RandomResizedCrop semantics) sampled 20,000 times.
Colour: view 0 runs the full MoCo-v2 recipe on the CIFAR samples: per-channel mean/std after normalization,
and the grayscale rate (samples whose channels are equal after un-normalizing).

Sample sizes: 2 epochs = 512 crops and 1,000 colour views per backend. Tolerances are ~4 standard errors
of the statistic plus the estimator's pixel rounding, so a backend fails only on a real difference.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastcl.pipelines import build_loader
from fastcl.pipelines.augment import rrc_params
from fastcl.pipelines.augspec import ViewSpec

COORD_SIDE = 128  # = conftest.COORD_SIDE (checked by the `data` fixture)

EPOCHS = (11, 12)
MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)  # the VIEW_OVERRIDES of conftest
STD = torch.tensor([0.247, 0.2435, 0.2616]).view(1, 3, 1, 1)
TOL = {"area_mean": 0.04, "area_ks": 0.12, "log_aspect_mean": 0.04, "log_aspect_std": 0.04, "flip": 0.09,
       "gray": 0.07, "channel_mean": 0.1, "channel_std": 0.1}


@pytest.fixture(scope="session")
def data(ffcv_dali_data) -> dict:
    """conftest's session data set, shared with tests/test_ffcv_dali.py (one ffcv loader per session)."""
    assert ffcv_dali_data["coord_side"] == COORD_SIDE
    return ffcv_dali_data


def _loader(backend: str, data: dict):
    if backend == "ffcv":
        pytest.importorskip("ffcv")
        return data["ffcv"]  # data.ffcv_decode=once (pipelines/ffcv_multicrop.py)
    if backend == "ffcv_per_view":
        pytest.importorskip("ffcv")
        return data["ffcv_per_view"]()
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    return build_loader(data["make_cfg"](backend, data["root"], data["batch"], False,
                                         workers=0 if backend == "torch" else 2), 0, 1, "cpu")


def boxes_from_pixels(v: torch.Tensor) -> dict:
    """Crop statistics of crop+flip views of the coordinate map. v: [n,3,S,S] normalized -> dict of [n]."""
    S = v.shape[-1]
    px = (v * STD + MEAN) * 255.0
    R, G = px[:, 0], px[:, 1]
    w = (R.amax((1, 2)) - R.amin((1, 2))) / 2 * S / (S - 1)
    h = (G.amax((1, 2)) - G.amin((1, 2))) / 2 * S / (S - 1)
    return {"area": w * h / COORD_SIDE**2, "log_aspect": torch.log(w / h),
            "flipped": (R[:, :, 0].mean(1) > R[:, :, -1].mean(1)).float()}


def collect(loader, coord_label: int) -> dict:
    geo, colour = [], []
    for e in EPOCHS:
        loader.set_epoch(e)
        for b in loader:
            m = b.label == coord_label
            geo.append(b.views[1][m])
            colour.append(b.views[0][~m])
    return {"geo": boxes_from_pixels(torch.cat(geo)), "colour": torch.cat(colour)}


@pytest.fixture(scope="module")
def views(data) -> dict:
    coord_label = data["scan"].classes.index("zz_coord")
    out = {}
    for backend in ("torch", "ffcv", "ffcv_per_view", "dali"):
        try:
            out[backend] = collect(_loader(backend, data), coord_label)
        except pytest.skip.Exception:
            pass
    return out


def reference_boxes(spec: ViewSpec, n: int = 20_000) -> dict:
    b = rrc_params(n, torch.tensor([COORD_SIDE]), torch.tensor([COORD_SIDE]), spec,
                   torch.Generator().manual_seed(0)).double()
    return {"area": b[:, 2] * b[:, 3] / COORD_SIDE**2, "log_aspect": torch.log(b[:, 3] / b[:, 2])}


def ks_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    a, b = np.sort(a.double().numpy()), np.sort(b.double().numpy())
    grid = np.concatenate([a, b])
    return float(np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b)).max())


@pytest.mark.parametrize("backend", ["torch", "ffcv", "ffcv_per_view", "dali"])
def test_crop_area_aspect_and_flip_match_torchvision(views, backend):
    if backend not in views:
        pytest.skip(f"{backend} not installed")
    g = views[backend]["geo"]
    ref = reference_boxes(ViewSpec(size=32))
    assert len(g["area"]) == 2 * 256  # every coordinate sample of both epochs
    assert abs(g["area"].mean() - ref["area"].mean()) < TOL["area_mean"], (g["area"].mean(), ref["area"].mean())
    assert ks_distance(g["area"], ref["area"]) < TOL["area_ks"]
    la, rla = g["log_aspect"], ref["log_aspect"]
    assert abs(la.mean() - rla.mean()) < TOL["log_aspect_mean"]
    assert abs(la.std() - rla.std()) < TOL["log_aspect_std"], (la.std(), rla.std())
    # no crop outside the ratio range (plus the estimator's rounding)
    assert la.abs().max() < math.log(4 / 3) + 0.08
    assert abs(g["flipped"].mean() - 0.5) < TOL["flip"]


def test_colour_statistics_agree(views):
    if len(views) < 2:
        pytest.skip("needs at least two backends")
    stats = {}
    for backend, v in views.items():
        x = v["colour"]
        px = x * STD + MEAN  # [0,1]
        spread = ((px[:, 0] - px[:, 1]).abs() + (px[:, 1] - px[:, 2]).abs()).amax((1, 2))
        stats[backend] = {"mean": x.mean((0, 2, 3)), "std": x.std((0, 2, 3)), "gray": (spread < 0.02).float().mean()}
        assert len(x) == 2 * 500
        assert abs(stats[backend]["gray"] - 0.2) < TOL["gray"], (backend, stats[backend]["gray"])
    ref = stats["torch"] if "torch" in stats else next(iter(stats.values()))
    for backend, s in stats.items():
        assert (s["mean"] - ref["mean"]).abs().max() < TOL["channel_mean"], (backend, s["mean"], ref["mean"])
        assert (s["std"] - ref["std"]).abs().max() < TOL["channel_std"], (backend, s["std"], ref["std"])
