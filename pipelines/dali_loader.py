"""`dali` backend: an image folder through one DALI graph per epoch (CPU with device_id=None, GPU otherwise).

Graph (`build_pipeline`): readers.file(files, labels=GLOBAL ids) -> decoders.image (mixed on a GPU) -> per view:
random_resized_crop (linear, antialiased) -> color_twist (jitter with p=jitter_p, grayscale folded in as
saturation 0 with p=gray_p) -> gaussian_blur with a per-sample sigma (window cut at 3 sigma) under a
per-sample `if` (p=blur_p) ->
solarize by arithmetic under an `if` (p=solarize_p) -> crop_mirror_normalize (flip with p=flip_p, mean/std,
HWC uint8 -> CHW float). Ops whose probability is 0 are left out of the graph. DALI has no `jitter` on the CPU
and no solarize op, hence the choices above; docs/DATA.md lists every difference from the torch recipe.

Ids: the reader's `labels` ARE the global sample ids (position in `scan_folder` order); real labels are looked
up by id from an array afterwards, so the id survives DALI's shuffling, sharding and padding untouched.

Order, sharding, epochs: DALI's own `random_shuffle` is a buffer shuffle (`initial_fill` samples) driven by a
reader-internal RNG, and without `stick_to_shard` the shard a rank reads rotates every epoch; neither can be
set to "epoch e" on resume, and its shard sizes need not give every rank the same number of batches. So each
epoch the loader builds a fresh pipeline whose reader gets exactly this rank's ids, in order, from
`shard_indices(N, per_rank_batch, rank, world, seed, epoch)` (the same `ShardBatchSampler` as the torch and ffcv
backends: same seed on every rank, disjoint shards, each sample exactly once per epoch across ranks, minus the
dropped tail under drop_last), with `random_shuffle=False`, `num_shards=1`. The reader pads the last batch with
copies of the last sample (`pad_last_batch`); those copies are cut off (the iterator knows the reader's epoch
size, and the loader checks the count), so ids stay unique. Rebuilding costs well under a second per epoch.

SePP pair mode (`set_key_partners`): a second reader over this epoch's key sources (`ShardedLoader.key_source`,
the seeded draw the torch backend makes per id) runs in lockstep with the first; view 0 is cut from its images.

Randomness: the pipeline seed is `seed_for(seed, epoch, rank, first batch)`, so augmentations differ per rank
and epoch and a run is reproducible on the same DALI version and device kind.
"""
from __future__ import annotations

import torch

from fastcl.pipelines.augment import as_view_spec, blur_kernel_size
from fastcl.pipelines.augspec import ViewSpec
from fastcl.pipelines.batch import Batch, register
from fastcl.pipelines.folder import cfg_classes, scan_folder, split_path
from fastcl.pipelines.torch_loader import ShardedLoader

DALI_STREAM = 0xDA  # salt of the per-epoch pipeline seed


def blur_graph(x, spec: ViewSpec, fn, types, dmath):
    """Gaussian blur with p=blur_p and sigma ~ U(blur_sigma) per sample -> (blurred x, sigma) DataNodes.

    The window is the sample's ceil(3 sigma) radius inside `augment.blur_kernel_size` (wide enough for the
    largest sigma at every image size, so the std of the blur is the sampled sigma, as PIL's
    GaussianBlur(radius=sigma) of the source recipes): the taps beyond hold 0.27% of the Gaussian's mass, and
    the CPU blur costs ~ linearly in the window. tests/test_augment.py measures the effective std."""
    sigma = fn.random.uniform(range=list(spec.blur_sigma))
    radius = dmath.min(dmath.ceil(3.0 * sigma), float(blur_kernel_size(spec, spec.size) // 2))
    window = fn.cast(2.0 * radius + 1.0, dtype=types.INT32)
    if fn.random.coin_flip(probability=spec.blur_p):  # per-sample branch: unblurred samples cost nothing
        x = fn.gaussian_blur(x, sigma=sigma, window_size=window)
    return x, sigma


def _view_graph(images, spec: ViewSpec, mean, std, fn, types, dmath):
    """One augmented view of decoded HWC uint8 images -> normalized CHW float (a DataNode)."""
    x = fn.random_resized_crop(images, size=[spec.size, spec.size], random_area=list(spec.scale),
                               random_aspect_ratio=list(spec.ratio), interp_type=types.INTERP_LINEAR,
                               antialias=True)
    has_jitter = spec.jitter_p > 0 and any((spec.brightness, spec.contrast, spec.saturation, spec.hue))
    if has_jitter or spec.gray_p > 0:
        # identity parameters for samples the coin leaves alone: f = 1 + on * (U - 1)
        on = fn.cast(fn.random.coin_flip(probability=spec.jitter_p), dtype=types.FLOAT) if has_jitter else 0.0

        def factor(strength):
            if not has_jitter or strength <= 0:
                return 1.0
            return 1.0 + on * (fn.random.uniform(range=[max(0.0, 1 - strength), 1 + strength]) - 1.0)

        sat = factor(spec.saturation)
        if spec.gray_p > 0:  # grayscale = saturation 0 (luma kept), applied after the jitter's own saturation
            sat = sat * (1.0 - fn.cast(fn.random.coin_flip(probability=spec.gray_p), dtype=types.FLOAT))
        hue = 0.0
        if has_jitter and spec.hue > 0:  # torchvision's hue factor is a fraction of the colour circle
            hue = on * fn.random.uniform(range=[-360.0 * spec.hue, 360.0 * spec.hue])
        x = fn.color_twist(x, brightness=factor(spec.brightness), contrast=factor(spec.contrast), saturation=sat,
                           hue=hue)
    if spec.blur_p > 0:
        x, _ = blur_graph(x, spec, fn, types, dmath)
    if spec.solarize_p > 0:
        if fn.random.coin_flip(probability=spec.solarize_p):
            xf = fn.cast(x, dtype=types.FLOAT)
            hit = fn.cast(xf >= 255.0 * spec.solarize_threshold, dtype=types.FLOAT)
            x = fn.cast(xf + hit * (255.0 - 2.0 * xf), dtype=types.UINT8)
    mirror = fn.random.coin_flip(probability=spec.flip_p) if spec.flip_p > 0 else 0
    return fn.crop_mirror_normalize(x, dtype=types.FLOAT, output_layout="CHW", mirror=mirror,
                                    mean=[255.0 * m for m in mean], std=[255.0 * s for s in std])


def build_pipeline(files: list[str], labels_or_ids: list[int], views: list[ViewSpec], mean, std, batch_size: int,
                   shard_id: int, num_shards: int, seed: int, device_id: int | None, num_threads: int = 2,
                   random_shuffle: bool = False, prefetch_queue_depth: int = 2,
                   key_files: list[str] | None = None, key_ids: list[int] | None = None):
    """The DALI graph (built, not yet run). Outputs: one CHW float [B,3,S,S] per view, then ids int32 [B,1]
    (then, with key_files, the key view's source ids int32 [B,1]).

    files / labels_or_ids: the reader's list (labels = global sample ids). device_id None: everything on the
    CPU (decoders.image device="cpu"); an int: "mixed" decoding and GPU ops on that device.
    key_files / key_ids (SePP pair mode): a second reader over the same number of files in lockstep with the
    first (same order, no shuffle, same padding); view 0 is cut from its images, the other views from the first's.
    """
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath

    views = [as_view_spec(v) for v in views]
    gpu = device_id is not None

    @pipeline_def(enable_conditionals=True)
    def graph():
        jpegs, ids = fn.readers.file(files=list(files), labels=[int(i) for i in labels_or_ids], shard_id=shard_id,
                                     num_shards=num_shards, random_shuffle=random_shuffle, pad_last_batch=True,
                                     name="Reader")
        images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
        if key_files is None:
            return (*[_view_graph(images, v, mean, std, fn, types, dmath) for v in views], ids)
        kjpegs, kids = fn.readers.file(files=list(key_files), labels=[int(i) for i in key_ids], shard_id=shard_id,
                                       num_shards=num_shards, random_shuffle=False, pad_last_batch=True,
                                       name="KeyReader")
        keys = fn.decoders.image(kjpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
        return (*[_view_graph(keys if v == 0 else images, spec, mean, std, fn, types, dmath)
                  for v, spec in enumerate(views)], ids, kids)

    pipe = graph(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed % (2**31),
                 prefetch_queue_depth=prefetch_queue_depth)
    pipe.build()
    return pipe


class DALILoader(ShardedLoader):  # length, epochs, mid-epoch resume
    """Loader protocol over an image folder with a DALI graph (see module docstring)."""

    def __init__(self, path: str, views: list, mean, std, batch_size: int, rank: int = 0, world: int = 1,
                 device="cpu", seed: int = 0, workers: int = 2, shuffle: bool = True, drop_last: bool = True,
                 max_samples: int = 0, classes: list[str] | None = None):
        import nvidia.dali  # noqa: F401 - fail at construction, not at the first epoch, when DALI is missing

        index = scan_folder(path, max_samples, classes)  # classes: data.classes subset (folder.py)
        self.paths = index.paths
        self.classes = index.classes
        self._shard_setup(len(index), torch.tensor(index.labels, dtype=torch.int64), views, mean, std, batch_size,
                          rank, world, device, seed, shuffle, drop_last)
        self.workers = max(1, workers)
        # "mixed" decoding + GPU ops only when training on a GPU; the same graph runs on the CPU otherwise
        self.device_id = (self.device.index or 0) if self.device.type == "cuda" else None
        self.batch_size = batch_size

    last_key_ids: torch.Tensor | None = None  # SePP pair mode: source ids [B] of view 0 in the last batch

    def epoch_pipeline(self, ids: torch.Tensor):
        """A DALI pipeline whose reader yields exactly `ids` (this rank's, in order) once; in SePP pair mode a
        second reader yields their key sources `key_source(ids)` (the torch backend's seeded draw) in lockstep."""
        from fastcl.pipelines.augment import seed_for

        pseed = seed_for(self.seed, self.sampler.epoch, self.rank, self.batches_done, DALI_STREAM)
        id_list = ids.tolist()
        key = None if self.key_partners is None else self.key_source(ids).tolist()
        return build_pipeline([self.paths[i] for i in id_list], id_list, self.views, self.mean, self.std,
                              self.batch_size, shard_id=0, num_shards=1, seed=pseed, device_id=self.device_id,
                              num_threads=self.workers, key_files=None if key is None else [self.paths[i] for i in key],
                              key_ids=key)

    def __iter__(self):
        from nvidia.dali.plugin.base_iterator import LastBatchPolicy
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        start, batches = self.sampler.take_batches()
        self.batches_done = start
        if not batches:
            return
        ids = torch.cat(batches)
        pipe = self.epoch_pipeline(ids)
        pair = self.key_partners is not None
        names = [f"view{v}" for v in range(len(self.views))] + ["id"] + (["key_id"] if pair else [])
        # reader_name: the iterator takes the epoch size from the reader and, with PARTIAL, returns the last
        # batch without the reader's padding copies
        it = DALIGenericIterator(pipe, names, reader_name="Reader", last_batch_policy=LastBatchPolicy.PARTIAL,
                                 auto_reset=False)
        dev, seen = self.device, 0
        try:
            for k, out in enumerate(it, start=start):
                d = out[0]
                index = d["id"].view(-1).to(torch.int64)
                n = min(len(index), len(ids) - seen)  # belt and braces: never pass a padding copy on
                expect = ids[seen:seen + n]
                if n != len(index) or not torch.equal(index[:n].cpu(), expect):
                    raise RuntimeError(f"dali backend: reader returned ids {index[:8].tolist()}... where "
                                       f"{expect[:8].tolist()}... were expected (batch {k}, {path_hint(self)})")
                if pair:  # the key reader must be in lockstep with the anchors: its ids are the seeded draw
                    key = d["key_id"].view(-1).to(torch.int64)[:n].cpu()
                    if not torch.equal(key, self.key_source(expect)):
                        raise RuntimeError(f"dali backend: key reader out of step with the anchors (batch {k})")
                    self.last_key_ids = key
                seen += n
                views = tuple(d[f"view{v}"][:n].to(dev, non_blocking=True) for v in range(len(self.views)))
                self.batches_done = k + 1
                yield Batch(views, index[:n].to(dev, non_blocking=True), self.labels[expect].to(dev, non_blocking=True))
                if seen >= len(ids):
                    break
        finally:
            del it, pipe  # frees the pipeline's threads and buffers before the next epoch builds its own


def path_hint(loader: DALILoader) -> str:
    return f"folder with {loader.num_samples} images starting {loader.paths[0] if loader.paths else '-'}"


@register("dali")
def build(cfg, rank: int = 0, world: int = 1, device="cpu", split: str = "train") -> DALILoader:
    d = cfg.data
    return DALILoader(split_path(cfg, split), list(d.aug.views), d.aug.mean, d.aug.std,
                      cfg.optim.batch_size // world, rank, world, device, cfg.trainer.seed, d.workers,
                      d.shuffle, d.drop_last, d.max_samples, cfg_classes(cfg))


def dali_eval_batches(path: str, aug, batch_size: int, rank: int = 0, world: int = 1, workers: int = 2,
                      max_samples: int = 0, device_id: int | None = None, classes: list[str] | None = None):
    """`eval_data.eval_batches` through DALI: this rank's contiguous shard of ids (`arange(N).tensor_split(world)
    [rank]`, scan_folder order) in order; decode -> shorter side resized to round(eval_size / eval_resize_ratio)
    (linear, antialiased) -> center crop eval_size -> normalize. Yields (x float [B,3,S,S], ids [B] int64).
    device_id None: the CPU graph; an int: mixed decoding on that GPU (x on it)."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.base_iterator import LastBatchPolicy
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    index = scan_folder(path, max_samples, classes)  # classes: data.classes subset (folder.py)
    ids = torch.arange(len(index), dtype=torch.int64).tensor_split(world)[rank]
    if len(ids) == 0:
        return
    size = int(aug.eval_size)
    short = int(round(size / float(aug.eval_resize_ratio)))
    id_list = ids.tolist()

    @pipeline_def
    def graph():
        # labels = global ids (as in the training graph): they survive the reader untouched
        jpegs, lab = fn.readers.file(files=[index.paths[i] for i in id_list], labels=id_list, random_shuffle=False,
                                     pad_last_batch=True, name="Reader")
        img = fn.decoders.image(jpegs, device="cpu" if device_id is None else "mixed", output_type=types.RGB)
        img = fn.resize(img, resize_shorter=short, interp_type=types.INTERP_LINEAR, antialias=True)
        x = fn.crop_mirror_normalize(img, crop=(size, size), dtype=types.FLOAT, output_layout="CHW",
                                     mean=[255.0 * float(m) for m in aug.mean], std=[255.0 * float(s) for s in aug.std])
        return x, lab

    pipe = graph(batch_size=batch_size, num_threads=max(1, workers), device_id=device_id, seed=0)
    pipe.build()
    it = DALIGenericIterator(pipe, ["x", "id"], reader_name="Reader", last_batch_policy=LastBatchPolicy.PARTIAL,
                             auto_reset=False)
    try:
        for out in it:
            yield out[0]["x"], out[0]["id"].view(-1).to(torch.int64).cpu()
    finally:
        del it, pipe
