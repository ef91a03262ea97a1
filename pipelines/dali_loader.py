"""`dali` backend: an image folder through ONE DALI graph, built on the first epoch and fed every epoch after
(CPU with device_id=None, "mixed" GPU decoding otherwise; both run the same graph).

Graph (`build_pipeline`): external_source (the encoded file bytes, the ids, and every per-sample random
parameter, pulled from `_Feed` one batch at a time) -> decoders.image (mixed on a GPU; EXIF orientation ignored,
as the torch backend's PIL decode does) -> per view: resize of the crop box (`roi_start`/`roi_end`, linear,
antialiased) to size x size -> color_twist (jitter with p=jitter_p, grayscale folded in as saturation 0 with
p=gray_p) -> gaussian_blur with a per-sample sigma (window cut at 3 sigma) under a per-sample `if` (p=blur_p) ->
solarize by arithmetic under an `if` (p=solarize_p) -> crop_mirror_normalize (flip with p=flip_p, mean/std, HWC
uint8 -> CHW float). Ops whose probability is 0 are left out of the graph, and so are their inputs. DALI has no
`jitter` on the CPU and no solarize op, hence the choices above; `fn.random_resized_crop` cannot be given a crop
window, hence resize with a ROI (which is what it runs internally). docs/DATA.md lists every difference from
the torch recipe.

Built once: the graph has no reader. Each epoch the loader hands `_Feed` a plan (this rank's id batches of the
epoch, and their key sources in SePP pair mode) and resets the pipeline; the external source calls the feed
with the batch number within the epoch, and the feed raises StopIteration past the plan's last batch, which
ends DALI's epoch. A pass the consumer stops early is drained (the feed stops, the at most prefetch_queue_depth
batches already queued are run out and dropped) so the next epoch starts clean on the same graph. The graph is
rebuilt only when it must change shape (SePP pair mode switched on or off: the key images are graph inputs) or
after an error left its state unknown.

Order, sharding, epochs, resume: the ids of the pass are exactly `self.sampler.take_batches()` (the same
`ShardBatchSampler` as the torch and ffcv backends: `shard_indices(N, per_rank_batch, rank, world, seed,
epoch)`, same seed on every rank, disjoint shards, each sample exactly once per epoch across ranks, minus the
dropped tail under drop_last), starting after the `batches_done` of a mid-epoch resume. The external source takes
variable batch sizes up to `batch_size`, so the last partial batch is fed with its true size (no padding); the
ids travel through the graph and every batch's ids and count are checked against the plan.

Ids: global sample ids (position in `scan_folder` order); real labels are looked up by id afterwards.

Randomness: every random parameter is drawn in Python, per batch, from
`torch.Generator().manual_seed(seed_for(seed, epoch, rank, k, DALI_STREAM))` for local batch k (`view_params`,
per view in order: the RandomResizedCrop box from `augment.rrc_params` on each image's size (torchvision's
semantics, the algorithm of the torch backend's `rrc_box`), the flip coin, then the colour draws of
`augment.device_stage` (jitter coin and factors, grayscale, blur coin and sigma, solarize)), and reaches the graph
as per-sample argument inputs. In DALI 2.4 every op involved takes them (resize's roi_start/roi_end,
color_twist's four factors, gaussian_blur's sigma and window_size, crop_mirror_normalize's mirror, the `if`
predicates), so no DALI op draws a random number and no op keeps an internal RNG: a batch's pixels depend only
on (seed, epoch, rank, k) and its ids, and a run resumed mid-epoch yields the same pixels as the uninterrupted
one (same DALI version and device kind). The image sizes come from the file headers (PIL, read once per id and
cached); the graph's `peek_image_shape` of the same bytes is checked against them, so a crop box is never cut
for the wrong size.

Cost: DALI runs the external source's callback on the thread that asks for batches (here the consumer, inside
`next()`), prefetch_queue_depth batches ahead: per batch it reads the files (in Python: the graph has no reader
op), parses the headers of files not seen yet and draws the parameters (one intra-op thread); measured 12 ms
per 256 CIFAR-10 files on the 2-core development machine, mostly file reads. The first batch of every epoch
waits for prefetch_queue_depth (2) such calls; no epoch builds a graph after the first.

SePP pair mode (`set_key_partners`): two more external-source inputs carry the bytes and ids of this epoch's key
sources (`ShardedLoader.key_source`, the seeded draw the torch backend makes per id), fed in the same batch as
their anchors; view 0 is cut from their images (with crop boxes drawn on their sizes), the other views from the
anchors'. A sample that is its own key is read once, and decoded once by each of the two decoders.
"""
from __future__ import annotations

import io
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from fastcl.pipelines import augment
from fastcl.pipelines.augment import _draw, as_view_spec, blur_kernel_size, rrc_params
from fastcl.rand import seed_for
from fastcl.pipelines.augspec import ViewSpec
from fastcl.pipelines.batch import Batch, register
from fastcl.pipelines.folder import cfg_classes, scan_folder, split_path
from fastcl.pipelines.torch_loader import ShardedLoader

DALI_STREAM = 0xDA  # salt of the per-batch parameter seeds

# per-sample parameters of one view, fed as argument inputs (suffixed with the view number in the feed)
VIEW_PARAMS = ("roi_start", "roi_end", "brightness", "contrast", "saturation", "hue", "blur", "sigma", "solarize",
               "mirror")


def has_colour_twist(spec: ViewSpec) -> bool:
    """Whether a view's graph has the color_twist op (jitter with a non-zero strength, or grayscale)."""
    has_jitter = spec.jitter_p > 0 and any((spec.brightness, spec.contrast, spec.saturation, spec.hue))
    return has_jitter or spec.gray_p > 0


def view_param_names(spec: ViewSpec) -> list[str]:
    """The VIEW_PARAMS a view's graph reads: the ops whose probability is 0 are left out, and so are their
    inputs (`view_params` still draws them all, so the draws do not depend on which ops are on)."""
    names = ["roi_start", "roi_end"]
    names += ["brightness", "contrast", "saturation", "hue"] if has_colour_twist(spec) else []
    names += ["blur", "sigma"] if spec.blur_p > 0 else []
    names += ["solarize"] if spec.solarize_p > 0 else []
    names += ["mirror"] if spec.flip_p > 0 else []
    return names


def view_params(hw: torch.Tensor, spec: ViewSpec, generator: torch.Generator) -> dict[str, np.ndarray]:
    """Every random parameter of one view for a batch, drawn from `generator` in a fixed order and count (so
    they depend only on its seed and the batch size): the RandomResizedCrop box (`rrc_params` on each image's
    size, torchvision's semantics), the flip coin, then `augment._draw`'s colour draws (the ones
    `device_stage` makes; DALI's color_twist has a fixed op order, so the order keys go unused).

    hw: [n,2] (height, width) of the images the view is cut from. -> {name in VIEW_PARAMS: array with the batch
    as its outer dimension}: roi_start / roi_end float32 [n,2] (y, x: the image's axis order), colour factors
    float32 [n] (identity where the jitter coin is off; saturation 0 for the grayscale samples; hue in degrees),
    blur / solarize bool [n], sigma float32 [n], mirror int32 [n]."""
    n = hw.shape[0]
    box = rrc_params(n, hw[:, 0], hw[:, 1], spec, generator)  # [n,4] y0, x0, h, w
    flip = torch.rand(n, generator=generator) < spec.flip_p
    d = _draw(n, spec, generator)
    f = torch.where(d["jitter"][:, None], d["factors"], torch.tensor([1.0, 1.0, 1.0, 0.0]))
    # grayscale = saturation 0 (luma kept), applied after the jitter's own saturation
    saturation = f[:, 2] * (~d["gray"]).float()

    def f32(t):  # DALI takes densely packed arrays only
        return np.ascontiguousarray(t.to(torch.float32).numpy())

    return {"roi_start": f32(box[:, :2]), "roi_end": f32(box[:, :2] + box[:, 2:]), "brightness": f32(f[:, 0]),
            "contrast": f32(f[:, 1]), "saturation": f32(saturation),
            "hue": f32(360.0 * f[:, 3]),  # torchvision's hue factor is a fraction of the colour circle
            "blur": d["blur"].numpy(), "sigma": f32(d["sigma"]), "solarize": d["solarize"].numpy(),
            "mirror": flip.to(torch.int32).numpy()}


class _Plan(NamedTuple):
    """One epoch's input to the graph: batch i holds ids `batches[i]` and is local batch `start + i`."""
    epoch: int
    start: int
    batches: list[torch.Tensor]
    keys: list[torch.Tensor] | None  # SePP pair mode: key source ids per batch


class _Feed:
    """The callback of the graph's external source: batch i of the current `plan` -> a tuple of batches in
    `names` order (file bytes, ids, every view's parameters; key bytes and ids in pair mode). Past the plan's
    last batch, and while there is no plan, it raises StopIteration (DALI's end of epoch; DALI may call it a few
    times past the end while prefetching)."""

    def __init__(self, paths: list[str], views: list[ViewSpec], seed: int, rank: int, pair: bool, hw: np.ndarray):
        self.paths, self.views, self.seed, self.rank, self.pair = paths, views, seed, rank, pair
        self.hw = hw  # [N,2] int64 (height, width) by id from the file header, 0 until first read (shared cache)
        self.plan: _Plan | None = None
        self.names = ["jpegs", "ids"] + (["kjpegs", "kids"] if pair else []) + \
            [f"{p}{v}" for v, spec in enumerate(views) for p in view_param_names(spec)]

    def dtypes(self) -> list:
        from nvidia.dali import types

        kind = {"jpegs": types.UINT8, "kjpegs": types.UINT8, "ids": types.INT64, "kids": types.INT64,
                "blur": types.BOOL, "solarize": types.BOOL, "mirror": types.INT32}
        return [kind.get(n, kind.get(n.rstrip("0123456789"), types.FLOAT)) for n in self.names]

    def __call__(self, i: int):
        plan = self.plan
        if plan is None or i >= len(plan.batches):
            raise StopIteration
        inputs = self.batch_inputs(plan.epoch, plan.start + i, plan.batches[i],
                                   None if plan.keys is None else plan.keys[i])
        return tuple(inputs[n] for n in self.names)

    def read(self, ids: list[int], known: dict | None = None) -> tuple[list[np.ndarray], torch.Tensor]:
        """The encoded bytes (uint8 arrays) and the sizes [n,2] of `ids`. known: id -> bytes already read."""
        data = []
        for i in ids:
            if known is not None and i in known:
                data.append(known[i])
                continue
            path = self.paths[i]
            with open(path, "rb") as f:
                b = f.read()
            if not self.hw[i, 0]:  # the header only (PIL does not decode the pixels for .size)
                try:
                    with Image.open(io.BytesIO(b)) as im:
                        self.hw[i] = im.height, im.width
                except Exception as e:
                    raise RuntimeError(f"dali backend: cannot read the image header of {path}: {e}") from e
            data.append(np.frombuffer(b, np.uint8))
        return data, torch.from_numpy(self.hw[ids])

    def batch_inputs(self, epoch: int, k: int, ids: torch.Tensor, keys: torch.Tensor | None) -> dict:
        """Every graph input of local batch k of `epoch` (ids [n]; keys [n] in pair mode) by feed name."""
        g = torch.Generator().manual_seed(seed_for(self.seed, epoch, self.rank, k, DALI_STREAM))
        id_list = ids.tolist()
        jpegs, hw = self.read(id_list)
        out = {"jpegs": jpegs, "ids": np.asarray(id_list, np.int64)}
        key_hw = hw
        if keys is not None:
            key_list = keys.tolist()
            kjpegs, key_hw = self.read(key_list, dict(zip(id_list, jpegs)))  # a sample that is its own key: read once
            out.update(kjpegs=kjpegs, kids=np.asarray(key_list, np.int64))
        # the draws are small tensor ops: one intra-op thread, as augment's device stage (augment.CPU_THREADS),
        # since splitting them over OpenMP threads on cores busy with DALI's own threads costs far more than it
        # gains (measured: rrc_params of 256 samples 100 ms on 2 threads of a loaded 2-core machine, 1.3 ms on one)
        prev, threads = torch.get_num_threads(), augment.CPU_THREADS
        if threads is not None and prev != threads:
            torch.set_num_threads(threads)
        try:
            for v, spec in enumerate(self.views):  # every view draws all its parameters: a fixed count per batch
                for name, a in view_params(key_hw if v == 0 else hw, spec, g).items():
                    out[f"{name}{v}"] = a
        finally:
            if torch.get_num_threads() != prev:
                torch.set_num_threads(prev)
        return out


def blur_graph(x, spec: ViewSpec, fn, types, dmath, sigma=None, on=None):
    """Gaussian blur of the samples where `on` holds, with a per-sample `sigma` -> (blurred x, sigma) DataNodes.

    sigma / on: per-sample DataNodes (the loader feeds them from its seeded draws: `view_params`); None draws
    them with DALI's own RNG (sigma ~ U(blur_sigma), on with p=blur_p). The window is the sample's ceil(3 sigma)
    radius inside `augment.blur_kernel_size` (wide enough for the largest sigma at every image size, so the std
    of the blur is the sampled sigma, as PIL's GaussianBlur(radius=sigma) of the source recipes): the taps beyond
    hold 0.27% of the Gaussian's mass, and the CPU blur costs ~ linearly in the window. tests/test_augment.py
    measures the effective std."""
    if sigma is None:
        sigma = fn.random.uniform(range=list(spec.blur_sigma))
    radius = dmath.min(dmath.ceil(3.0 * sigma), float(blur_kernel_size(spec, spec.size) // 2))
    window = fn.cast(2.0 * radius + 1.0, dtype=types.INT32)
    if on is None:
        on = fn.random.coin_flip(probability=spec.blur_p)
    if on:  # per-sample branch: unblurred samples cost nothing
        x = fn.gaussian_blur(x, sigma=sigma, window_size=window)
    return x, sigma


def _view_graph(images, spec: ViewSpec, p: dict, mean, std, fn, types, dmath):
    """One augmented view of decoded HWC uint8 images -> normalized CHW float (a DataNode). p: the view's
    per-sample parameter nodes by name (`view_param_names(spec)`)."""
    # the crop box resized in one op (as fn.random_resized_crop does internally, but with our box): the ROI is
    # in pixel-edge coordinates, so output pixel j samples x0 + (j + 0.5) * w / size, as PIL's resize(box=)
    x = fn.resize(images, size=[spec.size, spec.size], roi_start=p["roi_start"], roi_end=p["roi_end"],
                  interp_type=types.INTERP_LINEAR, antialias=True)
    if has_colour_twist(spec):
        x = fn.color_twist(x, brightness=p["brightness"], contrast=p["contrast"], saturation=p["saturation"],
                           hue=p["hue"])
    if spec.blur_p > 0:
        x, _ = blur_graph(x, spec, fn, types, dmath, sigma=p["sigma"], on=p["blur"])
    if spec.solarize_p > 0:
        if p["solarize"]:
            xf = fn.cast(x, dtype=types.FLOAT)
            hit = fn.cast(xf >= 255.0 * spec.solarize_threshold, dtype=types.FLOAT)
            x = fn.cast(xf + hit * (255.0 - 2.0 * xf), dtype=types.UINT8)
    mirror = p["mirror"] if spec.flip_p > 0 else 0
    return fn.crop_mirror_normalize(x, dtype=types.FLOAT, output_layout="CHW", mirror=mirror,
                                    mean=[255.0 * m for m in mean], std=[255.0 * s for s in std])


def build_pipeline(feed: _Feed, mean, std, batch_size: int, device_id: int | None, num_threads: int = 2,
                   prefetch_queue_depth: int = 2):
    """The DALI graph over `feed` (built, not yet run). Outputs: one CHW float [B,3,S,S] per view, the ids
    int64 [B], the decoded shapes int64 [B,3] (`peek_image_shape`); with `feed.pair` also the key ids [B] and
    the key images' shapes [B,3]. B <= batch_size: the feed's batch size.

    device_id None: everything on the CPU (decoders.image device="cpu"); an int: "mixed" decoding and GPU ops
    on that device (the parameters stay CPU argument inputs). feed.pair (SePP pair mode): view 0 is cut from
    the key images, the other views from the anchors'."""
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath

    views = [as_view_spec(v) for v in feed.views]
    gpu = device_id is not None

    @pipeline_def(enable_conditionals=True)
    def graph():
        fed = dict(zip(feed.names, fn.external_source(source=feed, num_outputs=len(feed.names), batch=True,
                                                      dtype=feed.dtypes())))

        def decode(name):  # EXIF orientation ignored: the sizes are the file header's, as for PIL
            return (fn.decoders.image(fed[name], device="mixed" if gpu else "cpu", output_type=types.RGB,
                                      adjust_orientation=False),
                    fn.peek_image_shape(fed[name], adjust_orientation=False))

        images, shape = decode("jpegs")
        keys, key_shape = decode("kjpegs") if feed.pair else (images, shape)
        out = [_view_graph(keys if v == 0 else images, spec, {p: fed[f"{p}{v}"] for p in view_param_names(spec)},
                           mean, std, fn, types, dmath) for v, spec in enumerate(views)]
        out += [fed["ids"], shape]
        if feed.pair:
            out += [fed["kids"], key_shape]
        return tuple(out)

    pipe = graph(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=0,
                 prefetch_queue_depth=prefetch_queue_depth)
    pipe.build()
    return pipe


class DALILoader(ShardedLoader):  # length, epochs, mid-epoch resume
    """Loader protocol over an image folder with one DALI graph (see module docstring)."""

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
        self._hw = np.zeros((len(index), 2), np.int64)  # image sizes by id, filled as files are first read
        self._feed: _Feed | None = None  # the graph's input, its pipeline and iterator: built on the first epoch
        self._pipe = self._it = None
        self._scheduled = False  # the pipeline has run an epoch: the next one starts with a reset()
        self._active = None  # token of the pass whose epoch the pipeline is in, None at an epoch boundary

    last_key_ids: torch.Tensor | None = None  # SePP pair mode: source ids [B] of view 0 in the last batch

    def _pipeline(self):
        """The iterator over the graph, built on first use and again only if the pair mode changed."""
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        pair = self.key_partners is not None
        if self._it is None or self._feed.pair != pair:
            self._close()
            self._feed = _Feed(self.paths, self.views, self.seed, self.rank, pair, self._hw)
            self._pipe = build_pipeline(self._feed, self.mean, self.std, self.batch_size, self.device_id,
                                        num_threads=self.workers)
            names = [f"view{v}" for v in range(len(self.views))] + ["id", "shape"] + \
                (["key_id", "key_shape"] if pair else [])
            # no reader: the epoch ends when the feed raises StopIteration; batches keep their true size
            self._it = DALIGenericIterator(self._pipe, names, auto_reset=False, prepare_first_batch=False)
        return self._it

    def _close(self) -> None:
        """Drop the pipeline (its threads and buffers go with it); the next epoch builds a fresh one."""
        self._it = self._pipe = self._feed = None
        self._scheduled, self._active = False, None

    def _end_epoch(self) -> None:
        """After a pass stopped early: stop the feed and run out the batches DALI already queued (at most its
        prefetch depth), leaving the pipeline at the end of its epoch, ready for the next reset()."""
        self._active = None
        self._feed.plan = None
        try:
            while True:
                next(self._it)
        except StopIteration:
            pass
        except Exception:
            self._close()

    def _check_shapes(self, got: torch.Tensor, ids: torch.Tensor, k: int, what: str) -> None:
        want = torch.from_numpy(self._hw[ids.numpy()])
        if not torch.equal(got.view(len(ids), -1)[:, :2].cpu().to(torch.int64), want):
            raise RuntimeError(f"dali backend: decoded {what} sizes differ from the file headers the crop boxes "
                               f"were drawn for (batch {k}, {path_hint(self)})")

    def __iter__(self):
        start, batches = self.sampler.take_batches()
        self.batches_done = start
        if not batches:
            return
        if self._active is not None:  # an earlier pass stopped early and was not closed yet
            self._end_epoch()
        it = self._pipeline()
        pair = self.key_partners is not None
        keys = [self.key_source(b) for b in batches] if pair else None
        self._feed.plan = _Plan(self.sampler.epoch, start, batches, keys)
        token = self._active = object()
        dev = self.device
        try:
            if self._scheduled:
                it.reset()  # the previous epoch ran out: restart the external source (prefetches this epoch)
            self._scheduled = True
            for j, expect in enumerate(batches):
                k = start + j
                try:
                    d = next(it)[0]
                except StopIteration:
                    raise RuntimeError(f"dali backend: the pipeline ended after {j} of {len(batches)} batches "
                                       f"(epoch {self.sampler.epoch}, {path_hint(self)})") from None
                index = d["id"].view(-1).to(torch.int64).cpu()
                if not torch.equal(index, expect):
                    raise RuntimeError(f"dali backend: pipeline returned ids {index[:8].tolist()}... where "
                                       f"{expect[:8].tolist()}... were expected (batch {k}, {path_hint(self)})")
                self._check_shapes(d["shape"], index, k, "image")
                if pair:  # the key inputs must be in step with the anchors: their ids are the seeded draw
                    key = d["key_id"].view(-1).to(torch.int64).cpu()
                    if not torch.equal(key, keys[j]):
                        raise RuntimeError(f"dali backend: key images out of step with the anchors (batch {k})")
                    self._check_shapes(d["key_shape"], key, k, "key image")
                    self.last_key_ids = key
                views = tuple(d[f"view{v}"].to(dev, non_blocking=True) for v in range(len(self.views)))
                self.batches_done = k + 1
                yield Batch(views, index.to(dev, non_blocking=True), self.labels[expect].to(dev, non_blocking=True))
            try:
                next(it)
            except StopIteration:  # DALI's end of epoch: the next pass resets and feeds the same graph
                self._active = None
            else:
                raise RuntimeError(f"dali backend: the pipeline returned more than the epoch's {len(batches)} "
                                   f"batches ({path_hint(self)})")
        except GeneratorExit:  # the consumer stopped early
            if self._active is token:
                self._end_epoch()
            raise
        except BaseException:
            if self._active is token:  # the pipeline's state is unknown after an error
                self._close()
            raise


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
