"""ffcv decode-once multi-view decoder (`data.ffcv_decode=once`): each image is decoded ONCE per sample and
every view (any number, each at its own size, scale/ratio and flip probability: 2 x 224, 2 x 224 + 6 x 96 ...)
is cut from that one decode inside ffcv's compiled numba stage.

ffcv's stock path builds one pipeline per view on the same `image` field, so each JPEG is decoded once per view
(FFCV-SSL does the same); decoding dominates the CPU cost per image at 224 px.

Output of the decoder, one flat uint8 row per sample (`Layout`):
    view 0 pixels [S0,S0,3] | view 1 pixels [S1,S1,3] | ... | meta int32 little-endian [META_HEAD + 6 V]
meta = (decodes, key_row, then per view: y0, x0, h, w, flipped, dct_num), boxes in FULL-resolution pixel
coordinates of that view's source image; `dct_num`/8 is the libjpeg-turbo scale the view was cut from (8 = full
decode). `decodes` counts the imdecode calls made for the sample: 1, or 2 when view 0 comes from a SePP partner.

Crop geometry: torchvision's RandomResizedCrop semantics (`augment.rrc_box`: 10 attempts of area ~ U(scale) and
log-uniform aspect, first fitting box at a uniform integer position, else the ratio-clamped center crop), then
OpenCV INTER_AREA resize (ffcv's `resize_crop`), then a horizontal flip with probability flip_p. The draws are a
splitmix64 hash of (seed, epoch, sample id, view, FFCV_STREAM) (`augment.seed_for`), not numba's per-thread
np.random: the crops are reproducible for any thread count, run to run and after a resume.

Per-epoch inputs reach the compiled code through a control block (`Control`): a small int64 array at a fixed
address that the decoder copies with libffcv's memcpy at the start of each batch (numba freezes captured arrays
as compile-time constants, and ffcv passes a decoder nothing but the rows of the batch).

DCT scaling (`dct_scale=True`): when every crop of an image stays at least its output size after a reduced
libjpeg-turbo decode at n/8 (n = 1..7), the image is decoded at the smallest such n (no crop is ever upsampled
because of it). docs/BENCHMARKS.md reports how often that applies and whether it pays.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from types import SimpleNamespace

import numpy as np
import torch
from numba import njit
from torch import Tensor

FFCV_STREAM = 0xFC  # salt of the crop/flip hash (separates these draws from every other seed_for stream)
META_HEAD = 2  # decodes, key source row
META_PER_VIEW = 6  # y0, x0, h, w, flipped, dct numerator (of 8)
CTRL_LEN = 4  # seed, epoch, address of id_of_row [rows] int64, address of key_row [rows] int64 (0 = no partners)

_H0 = np.uint64(0x9E3779B97F4A7C15)
_K1 = np.uint64(0xBF58476D1CE4E5B9)
_K2 = np.uint64(0x94D049BB133111EB)
_S11, _S29, _S31 = np.uint64(11), np.uint64(29), np.uint64(31)
_INV53 = 1.0 / 9007199254740992.0  # 2**-53


@dataclass(frozen=True)
class Layout:
    """Byte layout of one output row: view v's pixels at offsets[v] (sizes[v]^2 * 3 bytes), then the meta."""
    sizes: tuple[int, ...]
    offsets: tuple[int, ...]
    meta_offset: int
    total: int


def layout(sizes) -> Layout:
    """Layout for views of the given output sides (pixels); meta 4-byte aligned."""
    offs, pos = [], 0
    for s in sizes:
        offs.append(pos)
        pos += int(s) * int(s) * 3
    meta = -(-pos // 4) * 4
    return Layout(tuple(int(s) for s in sizes), tuple(offs), meta, meta + 4 * (META_HEAD + META_PER_VIEW * len(sizes)))


def split_views(buf: Tensor, lay: Layout) -> list[Tensor]:
    """Packed rows [B, total] uint8 -> per view a channels-last uint8 [B,S,S,3] VIEW of `buf` (no copy)."""
    B = buf.shape[0]
    return [buf[:, o:o + s * s * 3].view(B, s, s, 3) if buf.is_contiguous() else
            buf[:, o:o + s * s * 3].reshape(B, s, s, 3) for o, s in zip(lay.offsets, lay.sizes)]


def read_meta(buf: Tensor, lay: Layout) -> Tensor:
    """Packed rows [B, total] uint8 -> meta int32 [B, META_HEAD + 6 V] (a copy, on buf's device)."""
    return buf[:, lay.meta_offset:lay.total].contiguous().view(torch.int32)


def view_boxes(meta: Tensor) -> Tensor:
    """meta [B, META_HEAD + 6 V] -> [B, V, 6] (y0, x0, h, w, flipped, dct_num)."""
    return meta[:, META_HEAD:].reshape(meta.shape[0], -1, META_PER_VIEW)


class Control:
    """The per-epoch inputs of the compiled decoder, in one int64 array whose address is baked into the code.

    Owns the arrays the block points at, allocated once and rewritten in place: a producer thread of an epoch
    that is being closed may still read them, so they must never be freed or moved while the loader lives.
    """

    def __init__(self, id_of_row: np.ndarray):
        self.block = np.zeros(CTRL_LEN, dtype=np.int64)
        self.id_of_row = np.ascontiguousarray(id_of_row, dtype=np.int64)  # [rows]
        self.key_row = np.arange(len(id_of_row), dtype=np.int64)  # [rows] source row of view 0
        self.block[2] = self.id_of_row.ctypes.data

    @property
    def address(self) -> int:
        return int(self.block.ctypes.data)

    def set_epoch(self, seed: int, epoch: int) -> None:
        self.block[0], self.block[1] = int(seed), int(epoch)

    def set_key_rows(self, key_row: np.ndarray | None) -> None:
        """key_row [rows]: the row view 0 of each row is cut from this epoch; None: every view from the row."""
        if key_row is None:
            self.block[3] = 0
            return
        self.key_row[:] = key_row
        self.block[3] = self.key_row.ctypes.data


# ---------------------------------------------------------------- numba helpers

def compile_helpers() -> SimpleNamespace:
    """A FRESH set of the numba helpers below (mix64, view_key, uniform, rrc_hashed, dct_numerator, flip_lr,
    put_i32). Each ffcv Loader compiles its decoder against its own set: numba dispatchers shared by two
    decoders compiled in different producer threads failed type inference (a KeyError in the dispatcher's
    overload table) when the second Loader compiled."""
    def jit(fn):
        return njit(nogil=True, cache=False)(fn)


    @jit
    def mix64(h, p):
        """One splitmix64 round of `augment.seed_for` (uint64 in, uint64 out)."""
        h = (h ^ p) * _K1
        h = (h ^ (h >> _S31)) * _K2
        return h ^ (h >> _S29)


    @jit
    def view_key(seed, epoch, sid, view):
        """uint64 key of one view of one sample = augment.seed_for(seed, epoch, sid, view, FFCV_STREAM)."""
        h = _H0
        h = mix64(h, np.uint64(seed))
        h = mix64(h, np.uint64(epoch))
        h = mix64(h, np.uint64(sid))
        h = mix64(h, np.uint64(view))
        return mix64(h, np.uint64(FFCV_STREAM))


    @jit
    def uniform(key, j):
        """The j-th uniform [0,1) double of a key's stream."""
        return float(mix64(key, np.uint64(j)) >> _S11) * _INV53


    @jit
    def rrc_hashed(H, W, s0, s1, lr0, lr1, flip_p, key):
        """(y0, x0, h, w, flipped) of one view: `augment.rrc_box` semantics with hashed uniforms. H, W: source size."""
        area = float(H) * float(W)
        flip = 1 if uniform(key, 40) < flip_p else 0
        for t in range(10):
            a = area * (s0 + (s1 - s0) * uniform(key, 4 * t))
            asp = np.exp(lr0 + (lr1 - lr0) * uniform(key, 4 * t + 1))
            w = int(round(np.sqrt(a * asp)))
            h = int(round(np.sqrt(a / asp)))
            if 0 < w <= W and 0 < h <= H:
                y0 = min(int(uniform(key, 4 * t + 2) * (H - h + 1)), H - h)
                x0 = min(int(uniform(key, 4 * t + 3) * (W - w + 1)), W - w)
                return y0, x0, h, w, flip
        in_ratio = float(W) / float(H)
        if in_ratio < np.exp(lr0):
            w, h = W, int(round(W / np.exp(lr0)))
        elif in_ratio > np.exp(lr1):
            w, h = int(round(H * np.exp(lr1))), H
        else:
            w, h = W, H
        return (H - h) // 2, (W - w) // 2, h, w, flip


    @jit
    def center_box(H, W, size, ratio):
        """(y0, x0, h, w, 0): the eval transform's crop (`eval_data`: shorter side resized to round(size /
        ratio), center size x size) as a box on the source: side round(min(H, W) size / round(size / ratio))."""
        short = min(H, W)
        c = min(short, max(1, int(round(short * size / round(size / ratio)))))
        return (H - c) // 2, (W - c) // 2, c, c, 0

    @jit
    def dct_numerator(boxes, sizes, lo, hi):
        """Smallest n in 1..8 such that every crop v in [lo, hi) keeps >= its output side after scaling by n/8.
        boxes [V,5] int64 (y0, x0, h, w, flip); sizes [V] int64."""
        n = 1
        for v in range(lo, hi):
            side = min(boxes[v, 2], boxes[v, 3])
            need = (8 * sizes[v] + side - 1) // side  # ceil(8 S / side)
            if need > n:
                n = need
        return min(n, 8)


    @jit
    def flip_lr(img):
        """Mirror an [S,S,3] uint8 image in place (left <-> right)."""
        S = img.shape[1]
        for y in range(img.shape[0]):
            for x in range(S // 2):
                for c in range(3):
                    t = img[y, x, c]
                    img[y, x, c] = img[y, S - 1 - x, c]
                    img[y, S - 1 - x, c] = t


    @jit
    def put_i32(out, pos, val):
        """Write a non-negative int as 4 little-endian bytes at out[pos:pos+4]."""
        for b in range(4):
            out[pos + b] = (val >> (8 * b)) & 255

    return SimpleNamespace(mix64=mix64, view_key=view_key, uniform=uniform, rrc_hashed=rrc_hashed,
                           center_box=center_box, dct_numerator=dct_numerator, flip_lr=flip_lr, put_i32=put_i32)


_PY = compile_helpers()  # the set Python callers (tests) use
view_key, rrc_hashed = _PY.view_key, _PY.rrc_hashed


def _make_operation_class():
    """The ffcv Operation (imported lazily: ffcv is an optional dependency)."""
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.libffcv import imdecode, lib, resize_crop
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler
    from ffcv.pipeline.operation import Operation

    class MultiViewDecoder(Operation):
        """Decode once, cut every view (see the module docstring). Output [B, layout.total] uint8."""

        def __init__(self, views, control: Control, dct_scale: bool = False, center_ratio: float = 0.0):
            super().__init__()
            # center_ratio > 0: eval mode, every view is the eval transform's center crop (no randomness, no flip)
            self.center_ratio = float(center_ratio)
            self.lay = layout([v.size for v in views])
            self.sizes = np.array([v.size for v in views], dtype=np.int64)
            self.geom = np.array([[v.scale[0], v.scale[1], np.log(v.ratio[0]), np.log(v.ratio[1]), v.flip_p]
                                  for v in views], dtype=np.float64)  # [V, 5]
            self.control, self.dct_scale = control, bool(dct_scale)

        def declare_state_and_memory(self, previous_state):
            h = np.uint64(self.metadata["height"].max())
            w = np.uint64(self.metadata["width"].max())
            u8 = np.dtype("<u1")
            return (replace(previous_state, jit_mode=True, shape=(self.lay.total,), dtype=u8),
                    (AllocationQuery((self.lay.total,), u8), AllocationQuery((int(h * w * np.uint64(3)),), u8)))

        def generate_code(self):
            jpg = IMAGE_MODES["jpg"]
            mem_read = self.memory_read
            my_range = Compiler.get_iterator()
            imdecode_c = Compiler.compile(imdecode)
            resize_c = Compiler.compile(resize_crop)
            hp = compile_helpers()
            rrc_c, key_c, dct_c, flip_c, put_c = hp.rrc_hashed, hp.view_key, hp.dct_numerator, hp.flip_lr, hp.put_i32
            center_c, center_ratio = hp.center_box, self.center_ratio
            memcpy = lib.my_memcpy  # ctypes: numba calls it natively
            ctrl_addr, ctrl_bytes = self.control.address, CTRL_LEN * 8
            sizes, geom, offsets = self.sizes, self.geom, np.array(self.lay.offsets, dtype=np.int64)
            n_views, dct_scale = len(self.sizes), self.dct_scale
            # constants read from an array are typed int64, not Literal[int]: numba's dispatcher finalizer
            # raised KeyErrors at exit over overloads typed with literal arguments
            consts = np.array([0, 8, self.lay.meta_offset], dtype=np.int64)

            def decode(batch_indices, my_storage, metadata, storage_state):
                destination, temp_storage = my_storage
                zero, eight, meta_off = consts[0], consts[1], consts[2]
                no = zero != zero
                ctrl = np.empty(CTRL_LEN, dtype=np.int64)
                memcpy(ctrl_addr, ctrl.ctypes.data, ctrl_bytes)
                seed, epoch, ids_addr, key_addr = ctrl[0], ctrl[1], ctrl[2], ctrl[3]
                for k in my_range(len(batch_indices)):
                    row = np.int64(batch_indices[k])
                    cell = np.empty(1, dtype=np.int64)
                    memcpy(ids_addr + 8 * row, cell.ctypes.data, 8)
                    sid = cell[0]
                    src0 = row
                    if key_addr != 0:
                        memcpy(key_addr + 8 * row, cell.ctypes.data, 8)
                        src0 = cell[0]
                    out = destination[k]
                    temp = temp_storage[k]
                    # boxes on the full-resolution source of each view (view 0: the partner's, if any)
                    boxes = np.empty((n_views, 5), dtype=np.int64)
                    for v in range(n_views):
                        f = metadata[src0 if v == 0 else row]
                        if center_ratio > 0:
                            y0, x0, h, w, fl = center_c(np.int64(f["height"]), np.int64(f["width"]), sizes[v],
                                                        center_ratio)
                        else:
                            y0, x0, h, w, fl = rrc_c(np.int64(f["height"]), np.int64(f["width"]), geom[v, 0],
                                                     geom[v, 1], geom[v, 2], geom[v, 3], geom[v, 4],
                                                     key_c(seed, epoch, sid, v))
                        boxes[v, 0], boxes[v, 1], boxes[v, 2], boxes[v, 3], boxes[v, 4] = y0, x0, h, w, fl
                    nums = np.full(n_views, 8, dtype=np.int64)
                    decodes = 0
                    # group 0: the sample's own image, all views (or 1.. when view 0 has a partner source);
                    # group 1: the partner image for view 0. ONE decode per group.
                    first = 1 if src0 != row else 0
                    for g in range(1 + first):
                        src, lo, hi = (row, first, n_views) if g == 0 else (src0, 0, 1)
                        f = metadata[src]
                        H, W = np.int64(f["height"]), np.int64(f["width"])
                        data = mem_read(f["data_ptr"], storage_state)
                        num = eight
                        if f["mode"] == jpg:
                            if dct_scale:
                                num = dct_c(boxes, sizes, lo, hi)
                            Hs, Ws = (H * num + 7) // 8, (W * num + 7) // 8
                            buf = temp[:Hs * Ws * 3]
                            imdecode_c(data, buf, H, W, H, W, zero, zero, num, eight, no, no)
                            decodes += 1
                            img = buf.reshape(Hs, Ws, 3)
                        else:
                            Hs, Ws = H, W
                            img = data.reshape(H, W, 3)
                        for v in range(lo, hi):
                            y0, x0, h, w = boxes[v, 0], boxes[v, 1], boxes[v, 2], boxes[v, 3]
                            if num < 8:  # the same box on the n/8-scaled image, edges rounded
                                ya, xa = (y0 * num + 4) // 8, (x0 * num + 4) // 8
                                yb = max(min(((y0 + h) * num + 4) // 8, Hs), ya + 1)
                                xb = max(min(((x0 + w) * num + 4) // 8, Ws), xa + 1)
                            else:
                                ya, xa, yb, xb = y0, x0, y0 + h, x0 + w
                            S = sizes[v]
                            view = out[offsets[v]:offsets[v] + S * S * 3].reshape(S, S, 3)
                            resize_c(img, ya, yb, xa, xb, view)
                            if boxes[v, 4] == 1:
                                flip_c(view)
                            nums[v] = num
                    put_c(out, meta_off, decodes)
                    put_c(out, meta_off + 4, src0)
                    for v in range(n_views):
                        p = meta_off + 4 * (META_HEAD + META_PER_VIEW * v)
                        for j in range(5):
                            put_c(out, p + 4 * j, boxes[v, j])
                        put_c(out, p + 20, nums[v])
                return destination[:len(batch_indices)]

            decode.is_parallel = True
            return decode

    return MultiViewDecoder


_OP_CLASS = None


def multi_view_decoder(views, control: Control, dct_scale: bool = False, center_ratio: float = 0.0):
    """An ffcv decoder Operation for the `image` field: decode once, all `views` (ViewSpecs) cut from it.
    center_ratio > 0: the eval transform's center crop instead of RandomResizedCrop (embedding passes)."""
    global _OP_CLASS
    if _OP_CLASS is None:
        _OP_CLASS = _make_operation_class()
    return _OP_CLASS(views, control, dct_scale, center_ratio)
