"""Worker of tests/test_eval_stream.py (a fresh process per measurement or per rank).

    _eval_stream_worker.py mem MODE BANK TEST BATCH OUT_JSON    peak host memory of one kNN evaluation
    torchrun --nproc_per_node=2 _eval_stream_worker.py dist BANK TEST OUT_DIR    KnnMonitor on 2 gloo ranks

mem: MODE `stream` runs `KnnMonitor` (bank folder BANK, held-out folder TEST, BATCH images per batch); MODE `whole`
runs what the monitor did before (each split decoded into one float tensor, then embedded). The peak is
measured from just before the evaluation (peak RSS reset through /proc/self/clear_refs, else the RSS then) to the
high-water mark after it: {"peak_mb", "result"} -> OUT_JSON.
dist: every rank runs the monitor and saves {"result", "test_feats", "embedded": number of bank ids this rank
decoded} to OUT_DIR/rank{r}.pt.
"""
from __future__ import annotations

import json
import os
import resource
import sys

import torch

from _dist_embed_worker import tiny_net  # the same seeded backbone (this folder is the script's sys.path[0])

EVAL = ["data.backend=torch", "data.workers=1", "trainer.knn_every=1", "trainer.knn_k=20"]


def monitor_cfg(bank: str, test: str, size: int):
    from fastcl.config import load_config

    tiny = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "configs", "test", "tiny.yaml")
    return load_config(tiny, EVAL + [f"data.path={bank}", f"data.eval_path={test}", f"data.aug.eval_size={size}",
                                     "data.aug.eval_resize_ratio=1.0"])


def image_size(folder: str) -> int:
    from PIL import Image

    from fastcl.pipelines.folder import scan_folder

    with Image.open(scan_folder(folder).paths[0]) as im:
        return im.size[0]


def decode_whole(path: str, aug) -> tuple[torch.Tensor, torch.Tensor]:
    """What the monitor did before streaming (the removed `eval_tensors`): a folder through the eval transform
    as ONE tensor. -> (x float [N,3,S,S] normalized, labels [N] int64)."""
    from fastcl.pipelines.augment import normalize
    from fastcl.pipelines.folder import decode_uint8, resize_center_crop, scan_folder

    index = scan_folder(path)
    s = int(aug.eval_size)
    r = int(round(s / float(aug.eval_resize_ratio)))
    x = decode_uint8(index.paths, lambda im: resize_center_crop(im, r, s), (s, s), 1)
    return normalize(x.float().div_(255.0), aug.mean, aug.std), torch.tensor(index.labels, dtype=torch.int64)


@torch.no_grad()
def embed_whole(net: torch.nn.Module, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """The removed `extract_features`: L2-normalised eval-mode features [N, D] of x [N,3,S,S]."""
    import torch.nn.functional as F

    net.eval()
    return torch.cat([F.normalize(net(c).float(), dim=1) for c in x.split(batch)])


def whole_split_eval(net: torch.nn.Module, cfg) -> tuple[dict, torch.Tensor]:
    """The monitor before streaming: both splits decoded whole, embedded, kNN top-1 and effective rank.
    -> ({"knn_top1", "feature_rank"}, held-out features [M, D])."""
    from fastcl.eval.diagnostics import effective_rank
    from fastcl.eval.knn import knn_top1

    (xb, yb), (xt, yt) = decode_whole(cfg.data.path, cfg.data.aug), decode_whole(cfg.data.eval_path, cfg.data.aug)
    fb, ft = embed_whole(net, xb), embed_whole(net, xt)
    return {"knn_top1": knn_top1(fb, yb, ft, yt, cfg.trainer.knn_k, cfg.trainer.knn_t),
            "feature_rank": effective_rank(ft)}, ft


def reset_peak() -> float:
    """Start a peak measurement: MB of the baseline the peak is compared with."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
    except OSError:
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def peak_mb() -> float:
    """High-water RSS in MB (VmHWM, which reset_peak lowered; else ru_maxrss)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(mode: str, bank: str, test: str, batch: int, out: str) -> None:
    from fastcl.eval.monitor import KnnMonitor

    torch.set_num_threads(1)
    cfg = monitor_cfg(bank, test, image_size(bank))
    net = tiny_net()
    warm = monitor_cfg(test, test, image_size(bank))
    KnnMonitor(warm, batch_size=batch)(net) if mode == "stream" else whole_split_eval(net, warm)  # imports, kernels
    base = reset_peak()
    result = KnnMonitor(cfg, batch_size=batch)(net) if mode == "stream" else whole_split_eval(net, cfg)[0]
    with open(out, "w") as f:
        json.dump({"peak_mb": peak_mb() - base, "result": result}, f)


def distributed(bank: str, test: str, out: str) -> None:
    import fastcl.eval.features as features
    from fastcl.eval.monitor import KnnMonitor

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    embedded = {}
    source = features._source

    def counting_source(cfg, loader, path, *args, **kw):  # counts the ids this rank decodes, per split
        n, it = source(cfg, loader, path, *args, **kw)

        def count():
            for x, ids in it:
                embedded[path] = embedded.get(path, 0) + len(ids)
                yield x, ids
        return n, count()

    features._source = counting_source
    knn = KnnMonitor(monitor_cfg(bank, test, image_size(bank)), is_main=rank == 0, batch_size=64)
    net = tiny_net()
    torch.save({"result": knn(net), "test_feats": knn.test_features(net), "embedded": embedded},
               os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    if sys.argv[1] == "mem":
        measure(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6])
    else:
        distributed(*sys.argv[2:5])
