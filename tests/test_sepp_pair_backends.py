"""SePP pair mode (view 0 from a semantic partner image, METHODS.md §4.2) on the torch, ffcv and dali backends.

Data: 48 flat-colour images (image c has R = 16 + 32 (c % 8), G = 20 + 40 (c // 8), B = 128: levels far enough
apart to survive the .beton's JPEG round trip), so any crop of any view tells which image it was cut from. With crop + flip views and mean 0 / std 1, view 0's colour must be the colour of
`pairs.partner_sources(ids, nbr, rho, seed, epoch)` (the torch backend's seeded draw) and every other view the
sample's own colour: the three backends put the same partner ids in the same batches, on one rank and on two
(simulated) ranks, and again after a mid-epoch resume. ffcv also reports two decodes for exactly the samples whose
key view comes from a partner (decode once otherwise).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from fastcl.pipelines.augspec import ViewSpec
from fastcl.pipelines.pairs import partner_sources

N, K, RHO, SEED, BATCH = 48, 3, 0.6, 3, 8
VIEWS = [ViewSpec(size=16, jitter_p=0.0, gray_p=0.0, blur_p=0.0)] * 3


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> dict:
    from PIL import Image

    root = tmp_path_factory.mktemp("pair") / "flat"
    for i in range(N):
        os.makedirs(root / f"c{i % 2}", exist_ok=True)
        Image.new("RGB", (40 + i % 5, 36), (16 + 32 * (i % 8), 20 + 40 * (i // 8), 128)).save(
            root / f"c{i % 2}" / f"{i:03d}.png")
    from fastcl.pipelines.folder import scan_folder

    order = scan_folder(str(root))  # id -> file: the colour index of each id
    colour_of_id = torch.tensor([int(os.path.basename(p)[:3]) for p in order.paths])
    g = torch.Generator().manual_seed(1)
    nbr = torch.randint(0, N, (N, K), generator=g)
    nbr[torch.rand(N, K, generator=g) < 0.3] = -1  # some rows short of partners, a few with none
    nbr = nbr.sort(1, descending=True).values  # the miners' format: valid partners first, -1 padding last
    return {"root": str(root), "colour_of_id": colour_of_id, "nbr": nbr}


def source_of(view: torch.Tensor, colour_of_id: torch.Tensor) -> torch.Tensor:
    """[B,3,S,S] (pixel / 255) -> the id whose flat colour the view shows [B]."""
    px = view[:, :2].mean((2, 3)) * 255
    c = ((px[:, 0] - 16) / 32).round().long().clamp(0, 7) + 8 * ((px[:, 1] - 20) / 40).round().long().clamp(0, 5)
    id_of_colour = torch.empty_like(colour_of_id)
    id_of_colour[colour_of_id] = torch.arange(len(colour_of_id))
    return id_of_colour[c]


def check_epoch(loader, data: dict, epoch: int, start: int = 0) -> list[torch.Tensor]:
    """Iterate one epoch (from batch `start` after a resume); every batch's view 0 shows the seeded partner,
    views 1.. the sample itself. Returns the per-batch partner ids."""
    if start:
        loader.load_state_dict({"epoch": epoch, "batches_done": start})
    else:
        loader.set_epoch(epoch)
    out = []
    for b in loader:
        want = partner_sources(b.index.cpu(), data["nbr"], RHO, SEED, epoch)
        assert torch.equal(source_of(b.views[0], data["colour_of_id"]), want)
        for v in b.views[1:]:
            assert torch.equal(source_of(v, data["colour_of_id"]), b.index)
        meta = getattr(loader, "last_meta", None)
        if meta is not None:  # ffcv: one decode, two when the key view has a partner source
            assert torch.equal(meta[:, 0].long(), 1 + (want != b.index).long())
        out.append(want)
    return out


def build(backend: str, data: dict, rank: int = 0, world: int = 1, beton: str | None = None):
    mean, std = (0.0,) * 3, (1.0,) * 3
    if backend == "torch":
        from fastcl.pipelines.torch_loader import TorchFolderLoader
        ld = TorchFolderLoader(data["root"], VIEWS, mean, std, BATCH // world, rank, world, seed=SEED, workers=0)
    elif backend == "dali":
        pytest.importorskip("nvidia.dali")
        from fastcl.pipelines.dali_loader import DALILoader
        ld = DALILoader(data["root"], VIEWS, mean, std, BATCH // world, rank, world, seed=SEED, workers=1)
    else:
        from fastcl.pipelines.ffcv_loader import FFCVLoader
        ld = FFCVLoader(beton, VIEWS, mean, std, BATCH // world, rank, world, seed=SEED, workers=2)
    ld.set_key_partners(data["nbr"], RHO)
    return ld


@pytest.fixture(scope="module")
def ffcv_pair(colours, tmp_path_factory):
    pytest.importorskip("ffcv")
    from fastcl.pipelines.convert import convert

    beton = str(tmp_path_factory.mktemp("pair") / "flat.beton")
    convert(colours["root"], beton, write_mode="jpg", workers=1, progress=False)
    return build("ffcv", colours, beton=beton)


def test_same_partners_in_the_same_batches_on_every_backend_one_and_two_ranks(colours, ffcv_pair):
    ref = None
    for backend in ("torch", "ffcv", "dali"):
        ld = ffcv_pair if backend == "ffcv" else build(backend, colours)
        got = check_epoch(ld, colours, epoch=2)
        assert len(got) == N // BATCH
        ref = got if ref is None else ref
        assert all(torch.equal(a, b) for a, b in zip(got, ref)), backend
        # two ranks: rank r's batch k = slice r of global batch k, with the same partner draws
        ranks = [ffcv_pair.with_shard(r, 2, BATCH // 2) if backend == "ffcv" else build(backend, colours, r, 2)
                 for r in range(2)]
        per_rank = [check_epoch(rl, colours, epoch=2) for rl in ranks]
        for k, want in enumerate(ref):
            assert torch.equal(torch.cat([per_rank[0][k], per_rank[1][k]]), want), (backend, k)
    # the draw really moves keys: with rho 0.6 and ~70% valid partners, a good share of keys are partners
    tl = build("torch", colours)
    tl.set_epoch(2)
    ids = torch.cat([b.index for b in tl])
    assert 0.2 < (torch.cat(ref) != ids).float().mean() < 0.8


def test_resume_mid_epoch_keeps_the_partner_draws(colours, ffcv_pair):
    for backend in ("torch", "ffcv", "dali"):
        ld = ffcv_pair if backend == "ffcv" else build(backend, colours)
        full = check_epoch(ld, colours, epoch=5)
        rest = check_epoch(ld, colours, epoch=5, start=2)
        assert len(rest) == len(full) - 2 and all(torch.equal(a, b) for a, b in zip(rest, full[2:])), backend
        other = check_epoch(ld, colours, epoch=6)
        assert not all(torch.equal(a, b) for a, b in zip(other, full))  # a new draw every epoch
