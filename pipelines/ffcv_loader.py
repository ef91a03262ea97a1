"""`ffcv` backend: a .beton written by `pipelines/convert.py` (fields image, label, index).

Image decoding (`data.ffcv_decode`):
- `once` (default): ONE ffcv pipeline on the `image` field whose decoder (`ffcv_multicrop.MultiViewDecoder`)
  decodes each image once and cuts every view from it (RandomResizedCrop per ViewSpec, cv2 INTER_AREA resize,
  flip, in numba threads), emitting one packed uint8 row per sample -> ToTensor -> ToDevice (CUDA only); the rows
  are split into channels-last [B,S,S,3] views without a copy. Crops and flips are hashed from (seed, epoch, id,
  view): reproducible. SePP pair mode cuts view 0 from the partner image (a second decode for those samples only).
- `per_view`: per view, one stock ffcv pipeline on the same field: RandomResizedCropRGBImageDecoder (JPEG decode +
  crop + resize) -> RandomHorizontalFlip -> ToTensor -> ToDevice -> ToTorchImage, i.e. one decode per VIEW, crops
  from numba's per-thread np.random (not reproducible). Kept for comparison (docs/BENCHMARKS.md).
The rest of the recipe (colour jitter, grayscale, blur, solarize, normalize) is `augment.device_stage` on the
training device, the same code the torch backend runs. `label` and `index` go through IntDecoder.

Sharding and order: ffcv's own `distributed=True` is unreliable (EXPECTATIONS §16), so ONE ffcv Loader is
built (its first epoch JIT-compiles: ~5-10 s decode=once, 20-38 s per_view; later epochs reuse the code) and its traversal order
is replaced by `_EpochRows`, which hands ffcv this rank's rows for the current epoch: the ids of
`shard_indices(N, per_rank_batch, rank, world, seed, epoch)` (through the same `ShardBatchSampler` as the torch
backend, so both backends put the same ids in the same batches) mapped to .beton rows. Each id is therefore
seen exactly once per epoch across ranks (minus the dropped tail with drop_last), in an order seeded by
(seed, epoch) identically on every rank. `Batch.index` is the decoded `index` field, not the row.

Threads: ffcv sets numba's AND torch's thread count to `data.workers` whenever an epoch starts.

Randomness: the device stage draws from generators seeded like the torch backend's (run seed, epoch, rank,
batch number); the crops and flips as described above.
"""
from __future__ import annotations

import copy
import os

import numpy as np
import torch

from fastcl.kernels import numba_quiet
from fastcl.pipelines.augment import device_stage
from fastcl.device import host_to_device
from fastcl.rand import seed_for
from fastcl.pipelines.batch import Batch, register
from fastcl.pipelines.folder import split_path
from fastcl.pipelines.ffcv_multicrop import Control, layout, multi_view_decoder, read_meta, split_views
from fastcl.pipelines.torch_loader import DEVICE_STREAM, ShardBatchSampler, ShardedLoader

numba_quiet.install()  # ffcv compiles its pipeline with numba at run time and drops it with the loader

REQUIRED_FIELDS = ("image", "label", "index")


def read_beton_fields(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(index [rows] int64, label [rows] int64) from a .beton's metadata, without decoding any image.

    Raises a ValueError naming the file and the missing field when the .beton lacks image/label/index.
    """
    from ffcv.reader import Reader

    if not os.path.isfile(path):
        raise FileNotFoundError(f"ffcv backend: .beton not found: {path} (write one with pipelines/convert.py)")
    try:
        reader = Reader(path)
    except Exception as e:  # noqa: BLE001 - ffcv raises AssertionError/ValueError on foreign files
        raise ValueError(f"ffcv backend: {path} is not a readable .beton ({type(e).__name__}: {e})") from e
    names = list(reader.handlers)
    for f in REQUIRED_FIELDS:
        if f not in names:
            raise ValueError(f"ffcv backend: {path} has no `{f}` field (it has {names}); re-create it with "
                             f"`python pipelines/convert.py --src <images> --out {path} --overwrite`, which writes "
                             f"image, label and index")
    meta = reader.metadata
    pos = {n: i for i, n in enumerate(names)}
    return (np.asarray(meta[f"f{pos['index']}"], dtype=np.int64),
            np.asarray(meta[f"f{pos['label']}"], dtype=np.int64))


def _rows_by_id(index: np.ndarray, path: str, max_samples: int) -> np.ndarray:
    """[N] row of each global id. The index field must be a permutation of 0..rows-1 (convert.py writes
    index == row); max_samples keeps ids < max_samples."""
    n = len(index)
    if n == 0 or index.min() != 0 or index.max() != n - 1 or len(np.unique(index)) != n:
        raise ValueError(f"ffcv backend: {path}: the `index` field is not a permutation of 0..{n - 1}; "
                         "ids must be unique and contiguous (re-create the file with pipelines/convert.py)")
    rows = np.empty(n, dtype=np.int64)
    rows[index] = np.arange(n)
    return rows[:max_samples] if 0 < max_samples < n else rows


class FFCVLoader(ShardedLoader):  # length, epochs, mid-epoch resume
    """Loader protocol over a .beton (see module docstring)."""

    def __init__(self, path: str, views: list, mean, std, batch_size: int, rank: int = 0, world: int = 1,
                 device="cpu", seed: int = 0, workers: int = 2, shuffle: bool = True, drop_last: bool = True,
                 max_samples: int = 0, batches_ahead: int = 2, decode: str = "once", dct_scale: bool = False):
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.pipeline import PipelineSpec
        from ffcv.transforms import RandomHorizontalFlip, ToDevice, ToTensor, ToTorchImage

        index, labels = read_beton_fields(path)
        self.path = path
        self._rows = _rows_by_id(index, path, max_samples)  # [N] row of id
        self._shard_setup(len(self._rows), torch.from_numpy(labels[self._rows]), views, mean, std, batch_size, rank,
                          world, device, seed, shuffle, drop_last)

        cuda = self.device.type == "cuda"
        if decode not in ("once", "per_view"):
            raise ValueError(f"data.ffcv_decode: {decode!r} not in once|per_view")
        self.decode = decode
        pipelines = {"label": [IntDecoder(), ToTensor()], "index": [IntDecoder(), ToTensor()]}
        self._view_keys = []
        # decode=once: the control block feeds (seed, epoch, ids, partner rows) to the compiled decoder
        self._control = Control(index) if decode == "once" else None
        self._layout = layout([spec.size for spec in self.views])
        if decode == "once":
            ops = [ToTensor()] + ([ToDevice(self.device, non_blocking=True)] if cuda else [])
            pipelines["image"] = PipelineSpec("image", decoder=multi_view_decoder(self.views, self._control,
                                                                                  dct_scale), transforms=ops)
        for v, spec in enumerate(self.views if decode == "per_view" else []):
            key = "image" if v == 0 else f"image_{v}"
            ops = [RandomHorizontalFlip(spec.flip_p), ToTensor()]
            # on the CPU ToDevice would only add a copy: device_stage's float conversion makes a new tensor anyway
            ops += [ToDevice(self.device, non_blocking=True)] if cuda else []
            ops += [ToTorchImage(channels_last=True)]
            dec = RandomResizedCropRGBImageDecoder((spec.size, spec.size), scale=tuple(spec.scale),
                                                   ratio=tuple(spec.ratio))
            pipelines[key] = PipelineSpec("image", decoder=dec, transforms=ops)
            self._view_keys.append(key)
        # drop_last=False: the batch count is ours (ShardBatchSampler); ffcv just chunks the rows it is given
        self._ffcv = Loader(path, batch_size=batch_size, num_workers=max(1, workers), order=OrderOption.SEQUENTIAL,
                            pipelines=pipelines, drop_last=False, batches_ahead=batches_ahead, os_cache=True)
        self._order = _EpochRows(self._ffcv)
        self._ffcv.traversal_order = self._order
        # ffcv sizes len() (and caps every epoch) by its first order: the longest possible, all rows
        self._ffcv.first_traversal_order = np.arange(len(index), dtype=np.int64)
        self._out_names = list(self._ffcv.pipeline_specs.keys())  # ffcv's output tuple follows this order

    last_meta: torch.Tensor | None = None  # decode=once: int32 [B, 2 + 6 V] of the last batch (ffcv_multicrop)

    def with_shard(self, rank: int, world: int, batch_size: int | None = None) -> "FFCVLoader":
        """A loader for another (rank, world, per-rank batch) over the same .beton that reuses this one's
        compiled ffcv pipelines (no second 20-38 s JIT). Both share one ffcv Loader: iterate one at a time."""
        other = copy.copy(self)
        s = self.sampler
        other.sampler = ShardBatchSampler(self.num_samples, batch_size or s.batch_size, rank, world, s.seed,
                                          s.shuffle, s.drop_last)
        other.rank, other.batches_done = rank, 0
        return other

    def set_key_partners(self, nbr, rho: float) -> None:
        # per_view: every view is its own stock pipeline over the batch's rows, none can read another image
        # (a silent plain-MoCo run was the old bad-input bug, tests/test_bad_input.py)
        if self.decode != "once":
            raise ValueError("method.sepp.mode=pair on data.backend='ffcv' needs data.ffcv_decode=once (the "
                             "per_view path cannot draw the key view from a partner image)")
        super().set_key_partners(nbr, rho)

    def _key_rows(self, ids: torch.Tensor) -> np.ndarray | None:
        """[rows] row view 0 of each row is cut from this epoch (SePP pair mode), None without partners.
        Same seeded draw as the torch backend (`pairs.partner_sources` of (seed, epoch, id))."""
        if self.key_partners is None:
            return None
        key = np.arange(len(self._control.id_of_row), dtype=np.int64)
        key[self._rows[ids.numpy()]] = self._rows[self.key_source(ids).numpy()]
        return key

    def __iter__(self):
        start, batches = self.sampler.take_batches()
        self.batches_done = start
        epoch, dev = self.sampler.epoch, self.device
        ids = torch.cat(batches) if batches else torch.empty(0, dtype=torch.int64)
        self._order.rows = self._rows[ids.numpy()]
        # ffcv allocates its batch buffers per epoch from this, so a with_shard() copy may change it
        self._ffcv.batch_size = self.sampler.batch_size
        if len(ids) == 0:
            return
        if self._control is not None:  # read by the compiled decoder when the epoch's producer thread starts
            self._control.set_epoch(self.seed, epoch)
            self._control.set_key_rows(self._key_rows(ids))
        it = iter(self._ffcv)
        try:
            for k, out in enumerate(it, start=start):
                named = dict(zip(self._out_names, out))
                # ffcv refills its output buffers (pinned when CUDA is present) a few batches later: the small
                # id/label tensors are copied on the host first, so the transfer to the device reads memory that
                # nothing refills (a non_blocking copy straight out of the slot is not ordered before the refill)
                index = host_to_device(named["index"].view(-1).clone(), dev)
                label = host_to_device(named["label"].view(-1).clone(), dev)
                g = torch.Generator().manual_seed(seed_for(self.seed, epoch, self.rank, k, DEVICE_STREAM))
                if self._control is not None:
                    packed = named["image"]
                    # the crop boxes, flips and decode counts of this batch (tests; small: 4 (2 + 6 V) B bytes)
                    self.last_meta = read_meta(packed, self._layout)
                    raw = split_views(packed, self._layout)
                else:
                    raw = [named[key] for key in self._view_keys]
                views = tuple(device_stage(x, spec, self.mean, self.std, g) for x, spec in zip(raw, self.views))
                self.batches_done = k + 1
                yield Batch(views, index, label)
        finally:
            # an epoch left early (max_steps, a benchmark) would otherwise keep ffcv's producer thread, which
            # references itself, blocked forever on its full output queue, holding the batch buffers
            it.close()


class _EpochRows:
    """ffcv TraversalOrder stand-in: returns the rows the owning FFCVLoader set for the current epoch."""

    def __init__(self, ffcv_loader):
        self.loader, self.indices, self.seed, self.distributed = ffcv_loader, ffcv_loader.indices, 0, False
        self.rows = np.zeros(0, dtype=np.int64)

    def sample_order(self, epoch: int) -> np.ndarray:
        return self.rows


@register("ffcv")
def build(cfg, rank: int = 0, world: int = 1, device="cpu", split: str = "train") -> FFCVLoader:
    d = cfg.data
    from fastcl.pipelines.convert import check_beton_classes  # data.classes must match the .beton's
    from fastcl.pipelines.folder import cfg_classes
    check_beton_classes(split_path(cfg, split), cfg_classes(cfg))
    return FFCVLoader(split_path(cfg, split), list(d.aug.views), d.aug.mean, d.aug.std,
                      cfg.optim.batch_size // world, rank, world, device, cfg.trainer.seed, d.workers,
                      d.shuffle, d.drop_last, d.max_samples, decode=d.ffcv_decode)


# ------------------------------------------------------------------------------------ eval-transform pass

_EVAL_PASSES: dict = {}  # (path, size, ratio, batch, workers, max_samples) -> _EvalPass: compiled once per process


class _EvalPass:
    """A .beton through the eval transform (center crop of ratio * shorter side, resized; decode-once decoder in
    center mode, DCT-scaled decodes where no crop gets upsampled). One ffcv Loader, compiled at its first use."""

    def __init__(self, path: str, size: int, ratio: float, batch_size: int, workers: int, max_samples: int):
        from ffcv.fields.basics import IntDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.pipeline import PipelineSpec
        from ffcv.transforms import ToTensor

        from fastcl.pipelines.augspec import ViewSpec

        index, _ = read_beton_fields(path)
        self.rows = _rows_by_id(index, path, max_samples)  # [N] row of id
        self.control = Control(index)
        self.layout = layout([size])
        dec = multi_view_decoder([ViewSpec(size=size, flip_p=0.0)], self.control, dct_scale=True,
                                 center_ratio=ratio)
        pipelines = {"image": PipelineSpec("image", decoder=dec, transforms=[ToTensor()]),
                     "index": [IntDecoder(), ToTensor()], "label": None}
        self.loader = Loader(path, batch_size=batch_size, num_workers=max(1, workers), order=OrderOption.SEQUENTIAL,
                             pipelines=pipelines, drop_last=False, batches_ahead=2, os_cache=True)
        self.order = _EpochRows(self.loader)
        self.loader.traversal_order = self.order
        self.loader.first_traversal_order = np.arange(len(index), dtype=np.int64)
        self.names = list(self.loader.pipeline_specs.keys())

    def batches(self, ids: torch.Tensor):
        """Yields (uint8 channels-last [B,S,S,3] (a copy), ids [B] int64) for `ids` in order."""
        self.order.rows = self.rows[ids.numpy()]
        if len(ids) == 0:
            return
        it = iter(self.loader)
        try:
            for out in it:
                named = dict(zip(self.names, out))
                x = split_views(named["image"], self.layout)[0].clone()  # ffcv reuses its buffers
                yield x, named["index"].view(-1).to(torch.int64, copy=True)
        finally:
            it.close()


def ffcv_eval_batches(path: str, aug, batch_size: int, rank: int = 0, world: int = 1, workers: int = 2,
                      max_samples: int = 0):
    """`eval_data.eval_batches` for a .beton: this rank's contiguous shard of ids (`arange(N).tensor_split(world)
    [rank]`) in order. Yields (x float [B,3,S,S] normalized on the CPU, ids [B] int64)."""
    from fastcl.pipelines.augment import normalize

    size, ratio = int(aug.eval_size), float(aug.eval_resize_ratio)
    key = (os.path.abspath(path), size, ratio, batch_size, workers, max_samples)
    if key not in _EVAL_PASSES:
        _EVAL_PASSES[key] = _EvalPass(path, size, ratio, batch_size, workers, max_samples)
    ep = _EVAL_PASSES[key]
    ids = torch.arange(len(ep.rows), dtype=torch.int64).tensor_split(world)[rank]
    mean, std = tuple(float(m) for m in aug.mean), tuple(float(s) for s in aug.std)
    for x, got in ep.batches(ids):
        yield normalize(x.permute(0, 3, 1, 2).float().div_(255.0), mean, std), got
