"""Per-rank memory and mining / monitor time at ImageNet-1k scale, backed by CPU measurements at a scaled N.

    python -m fastcl.bench scaling [--n 65536] [--out docs/benchmarks] [--name scaling_cpu]
                                   [--levels 1000 2000 4000] [--queue 65536] [--engines torch faiss-cpu] ...

At the scaled N and at N/4 it builds the objects a run keeps and measures their bytes (sum of the tensors'
nbytes): the MoCo queue (FeatureQueue, filled), the SampleTable (every row written), the IFND miner state
(ClusterMiner after a real refresh of the table at the IFND levels), the SePP neighbour table (NeighbourMiner after
a real mine) and the kNN monitor's buffers: fastcl.eval.monitor.KnnMonitor.__call__ runs as rank 0 of `--world`
ranks simulated in this process (the other ranks' shards searched by the real shard_topk, their all-gathers
stood in for by allocating what torch.distributed.all_gather does), and its bank shard (kept on the network's
device, never all-gathered), the similarity block of shard_topk, the held-out features (their all-gather, the
device copy, the host copy) and the all-gather of the [M, k] candidates are measured. It times the mining refresh
(the ClusterMiner refresh = spherical k-means at every level, and the NeighbourMiner mine = the exact kNN table)
per engine, and the monitor's vote (shard_topk + vote) with one rank (W = 1) and rank 0's part with the bank
split over 2 and `--world` ranks, whose merged vote must equal the W = 1 vote. Features are random unit vectors:
byte counts do not depend on them and the k-means cost only through its iteration count, which is counted.

Every item has a formula (bytes; FLOPs and bytes moved for the timed work). The formula is checked against the
measurement at both sizes (bytes: equal; time: the measured exponent of N against the formula's), then evaluated
at ImageNet-1k (N = 1,281,167, 50,000 held-out images, 8 ranks). The H100 and host times at ImageNet are an
explicit model: FLOPs / an assumed throughput + bytes moved / an assumed bandwidth + kernel launches x an assumed
overhead; every assumed number is in ASSUMPTIONS, and the JSON records it next to what was measured and how.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import time
import warnings
from unittest import mock

import torch
import torch.nn.functional as F

from fastcl.lab.benchmarks.common import write_evidence
# the kNN monitor's shard_topk compares min(4096, SIMS_BLOCK // n) held-out queries at a time with a rank's n bank
# rows, so at ImageNet (n = 160,146 per rank at W = 8) a block holds 104 queries
from fastcl.eval.monitor import SIMS_BLOCK
from fastcl.mining.engine import faiss_module

IMAGENET_N = 1_281_167
IMAGENET_VAL = 50_000  # the held-out split of the kNN monitor at ImageNet scale (the official val set)
IMAGENET_WORLD = 8

# Assumed numbers (value, what it stands for). Nothing here was measured on the hardware it describes.
ASSUMPTIONS = {
    "h100_fp32_flops": (50e12, "sustained fp32 GEMM on one H100 SXM (cuBLAS SGEMM; peak 67 TFLOP/s). torch leaves "
                               "TF32 off for float32 matmuls by default and fastcl does not turn it on; faiss-gpu's "
                               "flat inner-product search is an SGEMM too, assumed at the same rate"),
    "h100_hbm_bytes_s": (2.5e12, "sustained HBM3 bandwidth of one H100 SXM (peak 3.35 TB/s)"),
    "h100_kernel_s": (5e-6, "launch + tail of one small CUDA kernel"),
    "pcie_bytes_s": (20e9, "host <-> device copies of pageable memory over PCIe Gen5 x16 (faiss-gpu reads its "
                           "training set from the host every k-means iteration)"),
    "host_flops_per_thread": (50e9, "fp32 GEMM per CPU thread of a server core (AVX-512)"),
    "host_threads": (8, "torch / faiss threads of a host-side search (python -m fastcl.mining.sepp on faiss-cpu): "
                        "OMP_NUM_THREADS=8 as configs/slurm/pretrain.sbatch exports (accelerate launch and torchrun "
                        "default to 1 on GPU runs)"),
    "nccl_allgather_bytes_s": (100e9, "all-gather bandwidth per receiving GPU within an 8-GPU NVLink node (NVLink 4 "
                                      "peaks at 450 GB/s per direction; taken low): the kNN monitor's [M, k] "
                                      "candidates"),
    "eval_img_s_per_gpu": (3000, "kNN monitor / IFND source=pass embedding pass per H100 at 224 px: bound by JPEG "
                                 "decode, ~12 cores per GPU x ~250 img/s per core for a full-size ImageNet JPEG "
                                 "(ffcv's centre-crop decode took 1.52 CPU ms on 224 px Imagenette JPEGs, "
                                 "docs/benchmarks/loader13_imagenette_embed_pass.json); ResNet-50's bf16 forward "
                                 "on an H100 is faster than that"),
    "train_img_s_per_gpu": (2600, "ResNet-50 2x224 training throughput per GPU: the repo's target "
                                  "(docs/RESULTS.md), not a measurement; the GPU step benchmark is pending a GPU"),
}
KPP_KERNELS = 15      # CUDA kernels per k-means++ step (matmul, clamp, minimum, sum, argmin, cumsum, searchsorted, ...)
LLOYD_KERNELS = 8     # CUDA kernels per Lloyd iteration outside the similarity chunks (index_add, bincount, ...)
CHUNK_KERNELS = 3     # per similarity chunk (matmul, max/topk, copy)
KNN_BLOCK_KERNELS = 6  # per (query chunk x bank chunk) block of the torch kNN search (matmul, topk, cat, topk, ...)
VOTE_BLOCK_KERNELS = 5  # per query block of the monitor's shard_topk (matmul, topk, label gather, 2 copies)
VOTE_MERGE_KERNELS = 10  # the monitor's merge (2 all-gathers, their cats and permutes, topk, exp, scatter, argmax)


def A(name: str) -> float:
    return ASSUMPTIONS[name][0]


# ------------------------------------------------------------------------------------------------ formulas
def queue_bytes(k: int, d: int) -> int:
    """FeatureQueue: keys fp32 [K, D] + ids int64 [K] + the int64 pointer."""
    return k * d * 4 + k * 8 + 8


def table_bytes(n: int, d: int) -> int:
    """SampleTable: feats fp16 [N, D] + seen bool [N]."""
    return n * d * 2 + n


def ifnd_state_bytes(n: int, levels: int) -> int:
    """ClusterMiner: assign int64 + conf float32 + labels int64, each [L, N]."""
    return levels * n * (8 + 4 + 8)


def sepp_state_bytes(n: int, k: int) -> int:
    """NeighbourMiner: nbr_ids int64 + nbr_sims float32, each [N, k]."""
    return n * k * (8 + 4)


def shard_rows(n: int, world: int) -> int:
    """Rows of the largest shard of arange(n).tensor_split(world) (rank 0's): ceil(n / world)."""
    return -(-n // world)


def knn_shard_bytes(n: int, d: int, world: int) -> int:
    """Rank 0's shard of the monitor's bank: fp32 [ceil(N/W), D], embedded and kept on the network's device
    through the vote (embed_dataset(gather=False)); the bank is never all-gathered."""
    return shard_rows(n, world) * d * 4


def knn_allgather_bytes(n: int, d: int, world: int) -> int:
    """gather_by_id of an n-row split on every rank (the monitor's held-out features): the padded shard (features +
    ids), W receive buffers of it and their torch.cat, i.e. (1 + 2W) x ceil(n/W) x (4D + 8) bytes. On the GPU when
    the network is (then a host copy of the cat too, while it is sorted by id)."""
    return (1 + 2 * world) * shard_rows(n, world) * (4 * d + 8)


def knn_features_bytes(n: int, d: int) -> int:
    """L2-normalised features fp32 [n, D] (the monitor's held-out split: host copy, and device copy)."""
    return n * d * 4


def vote_block_rows(shard: int) -> int:
    """Held-out queries per similarity block of fastcl.eval.monitor.shard_topk against `shard` bank rows."""
    return max(1, min(4096, SIMS_BLOCK // max(1, shard)))


def knn_sims_block_bytes(n: int, m: int, world: int) -> int:
    """shard_topk's similarity block: fp32 [min(M, q), ceil(N/W)], q = vote_block_rows (at most SIMS_BLOCK
    elements, 64 MiB); one at a time, transient."""
    shard = shard_rows(n, world)
    return min(m, vote_block_rows(shard)) * shard * 4


def knn_candidates_bytes(m: int, k: int, world: int) -> int:
    """The all-gather of the monitor's candidates, sims fp32 and labels int64 [M, k] each: this rank's, W receive
    buffers and their torch.cat ([W, M, k]), i.e. (1 + 2W) x M x k x (4 + 8) bytes, transient, on the network's
    device. It bounds the merge's peak: the [M, W k] permuted copy is made after the receive buffers are freed."""
    return (1 + 2 * world) * m * k * (4 + 8)


def val_size(n: int) -> int:
    """Held-out images at the scaled N: ImageNet's 50,000 : 1,281,167 ratio."""
    return max(1, round(n * IMAGENET_VAL / IMAGENET_N))


def kmeans_transient_bytes(n: int, d: int, levels: list[int], max_ppc: int = 1000) -> int:
    """Approximate peak of a ClusterMiner refresh on rank 0 (torch engine), on top of the table: the fp32 copy
    IFND._features makes, spherical_kmeans' normalised rows, the refresh's assign/conf scratch [L, N], and the
    largest per-level scratch (training subsample when N > k*max_ppc, k-means++'s [n, trials] blocks or a Lloyd
    iteration's similarity chunk (at most 64 MiB) and assignment lists, the final top-2 lists and their
    concatenation)."""
    per_level = []
    for k in levels:
        nt = min(n, k * max_ppc)
        trials = 2 + int(math.log(k))
        sub = nt * d * 4 if nt < n else 0
        kpp = 3 * nt * trials * 4 + nt * (4 + 8)
        lloyd = min(nt, max(1, (1 << 24) // k)) * k * 4 + 2 * nt * (4 + 8) + nt * 8 + 2 * k * d * 4
        final = 2 * n * (2 * 4 + 2 * 8)
        per_level.append(sub + max(kpp, lloyd) + final)
    return 2 * n * d * 4 + len(levels) * n * (8 + 4) + max(per_level)


def kmeans_cost(n: int, d: int, levels: list[int], niter: int, init: str, max_ppc: int = 1000,
                lloyd_iters: list[int] | None = None) -> dict:
    """FLOPs and the model's time on one H100 of a ClusterMiner refresh (spherical_kmeans per level).

    Per level with n_t = min(N, k*max_ppc) training rows, T = 2 + floor(ln k) k-means++ candidates:
    k-means++ 2*n_t*D*(1 + (k-1)*T) (k-1 sequential steps), Lloyd iters*2*n_t*k*D, final assignment 2*N*k*D.
    lloyd_iters: iterations per level (measured); default niter, the most a refresh runs.
    torch-CUDA: GEMM FLOPs at h100_fp32_flops, plus the bytes each step streams at h100_hbm_bytes_s (rows read,
    similarities written and read back), plus kernel launches. faiss-gpu: the same k-means++ (shared torch code on
    the features' device), the Lloyd GEMMs at the same rate, plus PCIe: faiss reads the training rows from the host
    in every iteration, and the rows are copied to the host once (and back once for the final assignment).
    """
    flops, torch_s, faiss_s, kpp_total, steps = 0.0, 0.0, 0.0, 0.0, 0
    F_, BW, OVH, PCIE = A("h100_fp32_flops"), A("h100_hbm_bytes_s"), A("h100_kernel_s"), A("pcie_bytes_s")
    for lvl, k in enumerate(levels):
        it = niter if lloyd_iters is None else lloyd_iters[lvl]
        nt = min(n, k * max_ppc)
        trials = 2 + int(math.log(k))
        kpp_f = 2 * nt * d * (1 + (k - 1) * trials) if init == "kmeans++" else 0
        kpp_b = (k - 1) * (4 * nt * d + 24 * nt * trials + 32 * nt) if init == "kmeans++" else 0
        kpp_s = kpp_f / F_ + kpp_b / BW + (k - 1) * KPP_KERNELS * OVH if init == "kmeans++" else 0.0
        rows = max(1, (1 << 24) // k)
        lloyd_f = it * 2 * nt * k * d
        lloyd_b = it * (4 * nt * d + 8 * nt * k)
        final_f, final_b = 2 * n * k * d, 4 * n * d + 8 * n * k
        chunks = -(-nt // rows) * it + -(-n // rows)
        gemm_s = (lloyd_f + final_f) / F_ + (lloyd_b + final_b) / BW
        torch_s += kpp_s + gemm_s + (chunks * CHUNK_KERNELS + it * LLOYD_KERNELS) * OVH
        pcie = nt * d * 4 * (it + 1) + n * d * 4 * (2 if nt < n else 1)
        faiss_s += kpp_s + gemm_s + pcie / PCIE
        kpp_total += kpp_s
        flops += kpp_f + lloyd_f + final_f
        steps += (k - 1 if init == "kmeans++" else 0) + it
    return {"flops": flops, "sequential_steps": steps, "h100_torch_s": torch_s, "h100_faiss_gpu_s": faiss_s,
            "h100_kmeanspp_s": kpp_total,
            "lloyd_iters": [niter] * len(levels) if lloyd_iters is None else list(lloyd_iters)}


def knn_table_cost(n: int, d: int, k: int, batch: int = 16384) -> dict:
    """FLOPs and the model's H100 time of NeighbourMiner.mine (exact self-search, knn.semantic_pairs): 2*N^2*D.
    torch-CUDA (knn._search_torch): the bank is re-read per query chunk of `batch` rows and every [chunk, block]
    similarity written and read back by topk, kernels per block. faiss-gpu: the same GEMM and similarity traffic,
    plus the bank and the queries over PCIe once (the miner hands faiss host arrays)."""
    F_, BW, OVH, PCIE = A("h100_fp32_flops"), A("h100_hbm_bytes_s"), A("h100_kernel_s"), A("pcie_bytes_s")
    flops = 2.0 * n * n * d
    qb = max(1, min(batch, n))
    bb = max(k + 1, (1 << 24) // qb)
    qchunks, bchunks = -(-n // qb), -(-n // bb)
    sims_b = 8.0 * n * n
    torch_s = flops / F_ + (qchunks * n * d * 4 + sims_b) / BW + qchunks * bchunks * KNN_BLOCK_KERNELS * OVH
    faiss_s = flops / F_ + sims_b / BW + 3 * n * d * 4 / PCIE
    return {"flops": flops, "h100_torch_s": torch_s, "h100_faiss_gpu_s": faiss_s}


def vote_cost(n: int, m: int, d: int, world: int, k: int = 200) -> dict:
    """The monitor's sharded kNN vote per rank (fastcl.eval.monitor.KnnMonitor.__call__), on the network's device.
    shard_topk: 2*M*ceil(N/W)*D FLOPs in blocks of q = vote_block_rows queries; each block re-reads the shard,
    writes its similarities and topk reads them back (8 bytes per similarity), VOTE_BLOCK_KERNELS kernels per
    block. The merge: the all-gather of the [M, k] candidates (W*M*k*12 bytes received at nccl_allgather_bytes_s;
    the cat, the [M, W k] permute and the vote's topk move about 5x that on the GPU) and the vote's kernels.
    H100 time: FLOPs at h100_fp32_flops + bytes at h100_hbm_bytes_s + kernels x h100_kernel_s."""
    F_, BW, OVH = A("h100_fp32_flops"), A("h100_hbm_bytes_s"), A("h100_kernel_s")
    shard = shard_rows(n, world)
    rows = vote_block_rows(shard)
    blocks = -(-m // rows)
    flops = 2.0 * m * shard * d
    streamed = blocks * shard * d * 4.0 + m * d * 4.0 + 8.0 * m * shard
    topk_s = flops / F_ + streamed / BW + blocks * VOTE_BLOCK_KERNELS * OVH
    cand = float(world * m * k * (4 + 8))
    merge_s = cand / A("nccl_allgather_bytes_s") + 5 * cand / BW + VOTE_MERGE_KERNELS * OVH
    return {"flops": flops, "flops_all_ranks": 2.0 * m * n * d, "shard_rows": shard, "block_rows": rows,
            "blocks": blocks, "bytes_streamed": streamed, "candidate_bytes": cand, "h100_shard_topk_s": topk_s,
            "h100_merge_s": merge_s, "h100_s": topk_s + merge_s}


# --------------------------------------------------------------------------------------------- measurement
def nbytes(*tensors: torch.Tensor) -> int:
    return int(sum(t.nbytes for t in tensors))


def unit(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=g), dim=1)


def _rss() -> tuple[int, int] | None:
    """(VmRSS, VmHWM) of this process in bytes, or None where /proc is not readable."""
    try:
        with open("/proc/self/status") as f:
            kv = dict(ln.split(":", 1) for ln in f if ln.startswith(("VmRSS", "VmHWM")))
        return int(kv["VmRSS"].split()[0]) * 1024, int(kv["VmHWM"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


@contextlib.contextmanager
def peak_rss(out: dict):
    """out["peak_rss_delta"] = the rise of this process's peak resident memory over its resident memory at entry
    (Linux: the peak is reset through /proc/self/clear_refs). None where that is not available. Host memory
    includes allocator slack and pages reused from earlier frees, so it is a measurement, not an exact count."""
    base = None
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _rss()
    except OSError:
        pass
    try:
        yield out
    finally:
        end = _rss()
        out["peak_rss_delta"] = None if base is None or end is None else max(0, end[1] - base[0])


@contextlib.contextmanager
def instrument_kmeans(calls: list, seconds: dict, clusterings: list):
    """Count and time the parts of spherical_kmeans (fastcl.methods.ifnd): calls gets (rows, k, D, top) of every
    similarity pass of the torch engine (_top_sims: one per Lloyd iteration, one final top-2 per level);
    clusterings gets every faiss.Clustering the faiss engine builds (one per level; its iteration_stats count the
    iterations it ran: faiss stops early once the objective repeats); seconds accumulates the wall time of the
    initialisation (_init_centroids, shared by both engines: k-means++ is k-1 sequential steps) and of the Lloyd
    iterations (_lloyd_torch / _lloyd_faiss)."""
    from fastcl.methods import ifnd as kmeans

    real_top, real_init = kmeans._top_sims, kmeans._init_centroids
    real_lloyd = {"_lloyd_torch": kmeans._lloyd_torch, "_lloyd_faiss": kmeans._lloyd_faiss}

    def top(x, c, k):
        calls.append((x.shape[0], c.shape[0], x.shape[1], k))
        return real_top(x, c, k)

    def timed(key, fn):
        def wrapper(*args):
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - t0
        return wrapper

    with contextlib.ExitStack() as stack:
        faiss = faiss_module()
        if faiss is not None:
            real_clustering = faiss.Clustering

            def clustering(*args):
                clusterings.append(real_clustering(*args))
                return clusterings[-1]
            stack.enter_context(mock.patch.object(faiss, "Clustering", clustering))
        stack.enter_context(mock.patch.object(kmeans, "_top_sims", top))
        stack.enter_context(mock.patch.object(kmeans, "_init_centroids", timed("init_s", real_init)))
        for name, fn in real_lloyd.items():
            stack.enter_context(mock.patch.object(kmeans, name, timed("lloyd_s", fn)))
        yield


def _timed(fn, repeats: int) -> tuple[object, dict]:
    """fn() `repeats` times; (last result, {"median_s", "times_s", "method"})."""
    out, times = None, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    times_sorted = sorted(times)
    return out, {"median_s": times_sorted[len(times) // 2], "times_s": times, "repeats": repeats,
                 "method": "time.perf_counter around the call; libraries warmed up on tiny inputs first (warm_up), "
                      "the measured call itself is not run before it is timed (one refresh is what a run pays)"}


def simulated_gather(world: int, test: torch.Tensor, cands: list, record: list):
    """Stand-in for fastcl.dist.gather with `world` ranks simulated in this process (this process is rank 0):
    allocates what torch.distributed.all_gather does (one receive buffer per rank, then torch.cat) and fills rank
    r's buffer with what rank r sends: for gather_by_id (the held-out features: padded shard 2-D, ids 1-D) the rows
    of `test` in rank r's shard; for the monitor's candidates ([1, M, k] sims, then labels) cands[r], the
    (sims, labels) of rank r's own shard_topk. record gets (kind, bytes of the input + the buffers + the cat)."""
    from fastcl.eval.features import shard_ids

    def gather(x: torch.Tensor) -> torch.Tensor:
        bufs = [torch.empty_like(x) for _ in range(world)]
        for r, b in enumerate(bufs):
            if r == 0:
                b.copy_(x)
            elif x.dim() == 3:
                b.copy_(cands[r][0 if x.is_floating_point() else 1][None])
            else:
                ids = shard_ids(test.shape[0], r, world)
                b.fill_(-1 if x.dtype == torch.int64 else 0)
                b[:len(ids)] = ids if x.dtype == torch.int64 else test[ids]
        out = torch.cat(bufs)
        record.append(("candidates" if x.dim() == 3 else "features", x.nbytes + nbytes(*bufs) + out.nbytes))
        return out
    return gather


def monitor_call(bank: torch.Tensor, bank_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
                 world: int, k: int, t: float = 0.1) -> dict:
    """One call of the kNN monitor (fastcl.eval.monitor.KnnMonitor.__call__, the real code) as rank 0 of `world`
    ranks, on this process's device. The embedding passes are replaced by the features given (rank 0's shard of
    `bank` as embed_dataset(gather=False) returns it; `test` through the real gather_by_id), the effective rank
    is skipped; with world > 1 the all-gathers are simulated (simulated_gather) and the other ranks' candidates
    come from the real shard_topk on their shards (computed before the call, not timed: other ranks run them).
    Returns the bytes of the buffers, the seconds of rank 0's shard_topk and vote, its predictions [M] and the
    sims of the k neighbours that voted [M, k]."""
    from types import SimpleNamespace

    from fastcl import dist
    from fastcl.eval import diagnostics, features, monitor
    from fastcl.eval.features import gather_by_id, shard_ids

    n, m = bank.shape[0], test.shape[0]
    shards = [shard_ids(n, r, world) for r in range(world)]
    cands = [None] + [monitor.shard_topk(test, bank[i], bank_labels[i], k) for i in shards[1:]]
    rec: dict = {"sims_block": 0}
    record: list = []
    real_topk, real_vote, real_tensor_topk = monitor.shard_topk, monitor.vote, torch.Tensor.topk

    def embed_dataset(net, cfg, path=None, gather=True, **kw):
        if path == "bank":
            return bank[shards[0]], shards[0]            # what _embed_shard writes on rank 0, kept on its device
        ids = shard_ids(m, 0, world)
        return gather_by_id(test[ids], ids, m, world)

    def block_topk(self, *args, **kwargs):               # the [queries, n] similarity blocks of shard_topk
        rec["sims_block"] = max(rec["sims_block"], self.nbytes)
        return real_tensor_topk(self, *args, **kwargs)

    def shard_topk(q, b, labels, kk):
        rec["test_device"], rec["shard"] = q.nbytes, b.nbytes
        with mock.patch.object(torch.Tensor, "topk", block_topk):
            t0 = time.perf_counter()
            out = real_topk(q, b, labels, kk)
            rec["shard_topk_s"] = time.perf_counter() - t0
        return out

    def vote(sims, labels, kk, tt, classes):
        t0 = time.perf_counter()
        pred = real_vote(sims, labels, kk, tt, classes)
        rec["vote_s"] = time.perf_counter() - t0
        rec["pred"], rec["top_sims"] = pred, sims.topk(min(kk, sims.shape[1]), dim=1).values
        return pred

    cfg = SimpleNamespace(data=SimpleNamespace(eval_path=""),
                          trainer=SimpleNamespace(knn_every=0, knn_k=k, knn_t=t))
    mon = monitor.KnnMonitor(cfg)
    mon.enabled = True
    mon.bank, mon.test = monitor.Split("path", "bank", bank_labels), monitor.Split("eval_path", "test", test_labels)
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(features, "embed_dataset", embed_dataset))
        stack.enter_context(mock.patch.object(monitor, "shard_topk", shard_topk))
        stack.enter_context(mock.patch.object(monitor, "vote", vote))
        stack.enter_context(mock.patch.object(diagnostics, "effective_rank", lambda f: float("nan")))
        if world > 1:
            stack.enter_context(mock.patch.object(dist, "gather", simulated_gather(world, test, cands, record)))
        res = mon(torch.nn.Identity())
    rec["test_host"] = mon._test_feats.nbytes
    rec["test_allgather"] = sum(b for kind, b in record if kind == "features")
    rec["candidates"] = sum(b for kind, b in record if kind == "candidates")
    rec["knn_top1"] = res["knn_top1"]
    return rec


def warm_up(engines: list[str]) -> None:
    """One tiny k-means and search per engine before anything is timed, so that library start-up (thread pools,
    faiss) is not charged to the first measured size."""
    from fastcl.methods.ifnd import spherical_kmeans
    from fastcl.mining.knn import knn_search

    x = unit(512, 16, torch.Generator().manual_seed(1))
    for eng in engines:
        spherical_kmeans(x, 4, niter=2, backend=eng, init="kmeans++")
        knn_search(x, x, 3, backend=eng)


def measure(n: int, a, engines: list[str]) -> dict:
    """Every item at one scaled size n: measured bytes (and formula), timed refreshes and vote."""
    from fastcl.memory import FeatureQueue, SampleTable
    from fastcl.methods.ifnd import ClusterMiner
    from fastcl.mining.miner import NeighbourMiner

    g = torch.Generator().manual_seed(a.seed)
    out: dict = {"n": n}

    queue = FeatureQueue(a.queue, a.dim)
    queue.push(unit(a.queue, a.dim, g), torch.arange(a.queue))   # a full queue (it never grows past K)
    out["queue"] = {"bytes": nbytes(*queue.buffers()), "formula_bytes": queue_bytes(a.queue, a.dim)}

    table = SampleTable(n, a.dim)
    table.update(torch.arange(n), unit(n, a.dim, g))             # every row written once
    out["sample_table"] = {"bytes": nbytes(*table.buffers()), "formula_bytes": table_bytes(n, a.dim)}

    # IFND refresh: the ClusterMiner clusters the table's fp32 copy (IFND._features) at every level, per engine
    refresh = {}
    for eng in engines:
        miner = ClusterMiner(n, a.levels, niter=a.niter, init=a.init, backend=eng, seed=a.seed)
        calls: list = []
        mem: dict = {}
        parts: dict = {}
        clusterings: list = []

        def run():
            return miner.refresh(table.feats.float(), rate=0.5, epoch=0)
        with warnings.catch_warnings(record=True) as caught, instrument_kmeans(calls, parts, clusterings), \
                peak_rss(mem):
            warnings.simplefilter("always")
            _, timing = _timed(run, a.repeats)
        st = miner.state_dict()
        r = {"bytes": nbytes(st["assign"], st["conf"], st["labels"]),
             "formula_bytes": ifnd_state_bytes(n, len(a.levels)), "timing": timing,
             "accepted_share": float((miner.labels >= 0).float().mean()),
             "warnings": sorted({str(w.message) for w in caught}),
             "transient_peak_rss_delta": mem["peak_rss_delta"],
             "transient_formula_bytes": kmeans_transient_bytes(n, a.dim, a.levels)}
        if eng == "torch":  # iterations counted through the torch engine's similarity passes
            per_run = len(calls) // a.repeats
            lv_calls = calls[:per_run]
            # per level: Lloyd passes (top=1) then one final top-2 assignment
            iters, cur = [], 0
            for rows, k, d, top in lv_calls:
                if top == 1:
                    cur += 1
                else:
                    iters.append(cur)
                    cur = 0
            r["lloyd_iters"] = iters
            r["model"] = kmeans_cost(n, a.dim, a.levels, a.niter, a.init, lloyd_iters=iters)
        else:  # faiss: the iterations each level's faiss.Clustering recorded (last run)
            iters = [int(c.iteration_stats.size()) for c in clusterings[-len(a.levels):]]
            r["lloyd_iters"] = iters
            r["model"] = kmeans_cost(n, a.dim, a.levels, a.niter, a.init, lloyd_iters=iters)
        r["achieved_gflop_s"] = r["model"]["flops"] / timing["median_s"] / 1e9
        # the two parts of a refresh, per run: k-means++ (sequential steps) and the Lloyd GEMMs
        steps = sum(k - 1 for k in a.levels) if a.init == "kmeans++" else 0
        init_s, lloyd_s = parts.get("init_s", 0.0) / a.repeats, parts.get("lloyd_s", 0.0) / a.repeats
        lloyd_f = sum(2 * min(n, k * 1000) * k * a.dim * it for k, it in zip(a.levels, r["lloyd_iters"]))
        r["parts"] = {"init_s": init_s, "init_steps": steps, "init_s_per_step": init_s / steps if steps else None,
                      "lloyd_s": lloyd_s, "lloyd_flops": lloyd_f,
                      "lloyd_gflop_s": lloyd_f / lloyd_s / 1e9 if lloyd_s > 0 else None,
                      "rest_s": timing["median_s"] - init_s - lloyd_s,
                      "rest_is": "normalisation, final assignment, confidences, acceptance, broadcast"}
        refresh[eng] = r
    out["ifnd_refresh"] = refresh
    first = refresh[engines[0]]
    out["ifnd_state"] = {"bytes": first["bytes"], "formula_bytes": first["formula_bytes"]}
    out["kmeans_transient"] = {"bytes": refresh["torch"]["transient_peak_rss_delta"] if "torch" in refresh else
                               first["transient_peak_rss_delta"], "formula_bytes": first["transient_formula_bytes"],
                               "exact": False}

    # SePP: an exact self-search of every row, k partners with cosine >= threshold (centred features, the default)
    emb = unit(n, a.sepp_dim, g)
    sepp = {}
    for eng in engines:
        nm = NeighbourMiner(n, a.sepp_k, a.sepp_threshold, backend=eng, features="centered")
        (ids, _), timing = _timed(lambda: nm.mine(emb), a.repeats)
        model = knn_table_cost(n, a.sepp_dim, a.sepp_k)
        sepp[eng] = {"bytes": nbytes(nm.nbr_ids, nm.nbr_sims), "formula_bytes": sepp_state_bytes(n, a.sepp_k),
                     "timing": timing, "pairs": int((ids >= 0).sum()), "model": model,
                     "achieved_gflop_s": model["flops"] / timing["median_s"] / 1e9}
    out["sepp_mine"] = sepp
    out["sepp_table"] = {"bytes": sepp[engines[0]]["bytes"], "formula_bytes": sepp[engines[0]]["formula_bytes"]}

    # kNN monitor: bank = the training split, sharded and kept per rank; test = the held-out split, all-gathered
    m = val_size(n)
    bank, test = unit(n, a.backbone_dim, g), unit(m, a.backbone_dim, g)
    bank_labels, test_labels = torch.randint(1000, (n,), generator=g), torch.randint(1000, (m,), generator=g)
    ones = [monitor_call(bank, bank_labels, test, test_labels, 1, a.knn_k) for _ in range(a.repeats)]
    times = [r["shard_topk_s"] + r["vote_s"] for r in ones]
    one = ones[sorted(range(len(times)), key=times.__getitem__)[len(times) // 2]]
    split = {}
    for w in sorted({2, a.world}):  # the bank split over w ranks: rank 0's part, and the merged vote against W = 1
        r = monitor_call(bank, bank_labels, test, test_labels, w, a.knn_k)
        split[w] = {"shard_rows": shard_rows(n, w), "shard_topk_s": r["shard_topk_s"], "vote_s": r["vote_s"],
                    "pred_mismatches": int((r["pred"] != one["pred"]).sum()),
                    "top_sims_max_abs_diff": float((r["top_sims"] - one["top_sims"]).abs().max()),
                    "knn_top1": r["knn_top1"]}
        if w == a.world:
            mem = r
    W, Db = a.world, a.backbone_dim
    out["knn_shard"] = {"bytes": mem["shard"], "formula_bytes": knn_shard_bytes(n, Db, W)}
    out["knn_sims_block"] = {"bytes": mem["sims_block"], "formula_bytes": knn_sims_block_bytes(n, m, W)}
    out["knn_test_allgather"] = {"bytes": mem["test_allgather"], "formula_bytes": knn_allgather_bytes(m, Db, W)}
    out["knn_test_device"] = {"bytes": mem["test_device"], "formula_bytes": knn_features_bytes(m, Db), "m": m,
                              "note": "on a CPU run .to(device) returns the host tensor itself; on a GPU it is "
                                      "a copy: counted from the tensor shard_topk receives"}
    out["knn_test"] = {"bytes": mem["test_host"], "formula_bytes": knn_features_bytes(m, Db), "m": m}
    out["knn_candidates"] = {"bytes": mem["candidates"], "formula_bytes": knn_candidates_bytes(m, a.knn_k, W)}
    cost = vote_cost(n, m, Db, 1, a.knn_k)
    timing = {"median_s": sorted(times)[len(times) // 2], "times_s": times, "repeats": a.repeats,
              "method": "time.perf_counter around rank 0's shard_topk and vote inside the real "
                        "KnnMonitor.__call__ (W = 1: no all-gather), summed; the embedding passes are not timed"}
    out["knn_vote"] = {"m": m, "k": a.knn_k, "block_rows": cost["block_rows"], "timing": timing, "model": cost,
                       "shard_topk_s": one["shard_topk_s"], "vote_s": one["vote_s"], "knn_top1": one["knn_top1"],
                       "achieved_gflop_s": cost["flops"] / timing["median_s"] / 1e9, "split": split}
    return out


# ------------------------------------------------------------------------------------------------ reporting
MEMORY_ITEMS = [  # key, label, where it lives (per rank), formula text
    ("queue", "MoCo queue", "replicated: every rank, GPU", "K*D*4 + K*8 + 8"),
    ("sample_table", "SampleTable (IFND source=table, fp16)", "replicated: every rank, GPU", "N*D*2 + N"),
    ("ifnd_state", "IFND miner state (L levels)", "replicated: every rank, GPU (rank 0 computes, broadcast)",
     "L*N*(8 + 4 + 8)"),
    ("sepp_table", "SePP neighbour table", "replicated: every rank, GPU (each rank loads the .npz)", "N*k*(8 + 4)"),
    ("knn_shard", "kNN monitor: rank's shard of the bank (never all-gathered)",
     "sharded: 1/W per rank, GPU, kept through the vote", "ceil(N/W)*Db*4"),
    ("knn_sims_block", "kNN monitor: shard_topk similarity block", "every rank, GPU, transient",
     "min(M, q)*ceil(N/W)*4, q = min(4096, SIMS_BLOCK // ceil(N/W))"),
    ("knn_test_allgather", "kNN monitor: all-gather of the held-out features", "every rank, GPU, transient",
     "(1 + 2W)*ceil(M/W)*(Db*4 + 8)"),
    ("knn_test_device", "kNN monitor: held-out features, device copy", "replicated: every rank, GPU, during the call",
     "M*Db*4"),
    ("knn_test", "kNN monitor: held-out features, host copy", "replicated: every rank, host (kept between calls)",
     "M*Db*4"),
    ("knn_candidates", "kNN monitor: all-gather of the candidates (sims fp32 + labels int64)",
     "every rank, GPU, transient", "(1 + 2W)*M*k*(4 + 8)"),
    ("kmeans_transient", "IFND refresh scratch (torch engine)", "rank 0 only, GPU, transient",
     "~2*N*D*4 + L*N*12 + level scratch"),
]


def formula_at(key: str, n: int, a, world: int) -> int:
    m = IMAGENET_VAL if n == IMAGENET_N else val_size(n)
    return {"queue": lambda: queue_bytes(a.queue, a.dim), "sample_table": lambda: table_bytes(n, a.dim),
            "ifnd_state": lambda: ifnd_state_bytes(n, len(a.levels)),
            "sepp_table": lambda: sepp_state_bytes(n, a.sepp_k),
            "knn_shard": lambda: knn_shard_bytes(n, a.backbone_dim, world),
            "knn_sims_block": lambda: knn_sims_block_bytes(n, m, world),
            "knn_test_allgather": lambda: knn_allgather_bytes(m, a.backbone_dim, world),
            "knn_test_device": lambda: knn_features_bytes(m, a.backbone_dim),
            "knn_test": lambda: knn_features_bytes(m, a.backbone_dim),
            "knn_candidates": lambda: knn_candidates_bytes(m, a.knn_k, world),
            "kmeans_transient": lambda: kmeans_transient_bytes(n, a.dim, a.levels)}[key]()


def human(b: float | None) -> str:
    """Decimal units (MB = 1e6 bytes), as docs/SCALING.md writes them."""
    if b is None:
        return "n/a"
    for unit_, f in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(b) >= f:
            return f"{b / f:.3g} {unit_}"
    return f"{int(b)} B"


def secs(s: float) -> str:
    return f"{s:.3g} s" if s < 120 else f"{s:.3g} s ({s / 60:.1f} min)"


def exponent(big: float, small: float, ratio: float) -> float | None:
    return math.log(big / small) / math.log(ratio) if big > 0 and small > 0 else None


def step_fit(big: dict, small: dict, n_big: int, n_small: int, a) -> dict | None:
    """k-means++ seconds per step = fixed + per_row * n, fitted through the two sizes (every level trains on all
    rows at the scaled sizes when k * 1000 >= N). bytes_per_row_step: what the H100 model streams per row and step
    (4D + 24T + 32, T = candidates of the largest level), so effective_bytes_s is this CPU's rate on it."""
    tb, ts = big.get("init_s_per_step"), small.get("init_s_per_step")
    if not tb or not ts or n_big == n_small:
        return None
    per_row = (tb - ts) / (n_big - n_small)
    trials = 2 + int(math.log(max(a.levels)))
    row_bytes = 4 * a.dim + 24 * trials + 32
    return {"fixed_s": tb - per_row * n_big, "per_row_s": per_row, "bytes_per_row_step": row_bytes,
            "effective_bytes_s": row_bytes / per_row if per_row > 0 else None}


def summarize(a, big: dict, small: dict, engines: list[str]) -> dict:
    """Memory and time rows: measured at N, formula at N, formula at ImageNet-1k, per-rank share, exponents."""
    ratio = big["n"] / small["n"]
    mem_rows = []
    for key, label, where, text in MEMORY_ITEMS:
        mb, ms = big[key]["bytes"], small[key]["bytes"]
        mem_rows.append({"item": key, "label": label, "where": where, "formula": text,
                         "measured_bytes": mb, "formula_bytes": big[key]["formula_bytes"],
                         "exact": big[key].get("exact", True),
                         "equal": mb == big[key]["formula_bytes"] and ms == small[key]["formula_bytes"],
                         "measured_bytes_small": ms,
                         "exponent_measured": None if not mb or not ms else exponent(mb, ms, ratio),
                         "exponent_formula": exponent(big[key]["formula_bytes"], small[key]["formula_bytes"], ratio),
                         "imagenet_bytes": formula_at(key, IMAGENET_N, a, IMAGENET_WORLD)})
    time_rows = []
    lv = a.levels
    for eng in engines:
        rb, rs = big["ifnd_refresh"][eng], small["ifnd_refresh"][eng]
        model_in = kmeans_cost(IMAGENET_N, a.dim, lv, a.niter, a.init)
        time_rows.append({"item": "ifnd_refresh", "engine": eng, "label": f"IFND refresh, k-means at {lv}",
                          "where": "rank 0 only (others wait at the broadcast)",
                          "measured_s": rb["timing"]["median_s"], "measured_s_small": rs["timing"]["median_s"],
                          "flops": rb["model"]["flops"], "flops_small": rs["model"]["flops"],
                          "achieved_gflop_s": rb["achieved_gflop_s"], "lloyd_iters": rb["lloyd_iters"],
                          "exponent_measured": exponent(rb["timing"]["median_s"], rs["timing"]["median_s"], ratio),
                          "exponent_formula": exponent(rb["model"]["flops"], rs["model"]["flops"], ratio),
                          "imagenet_flops": model_in["flops"],
                          "imagenet_sequential_steps": model_in["sequential_steps"],
                          "h100_torch_s": model_in["h100_torch_s"], "h100_faiss_gpu_s": model_in["h100_faiss_gpu_s"],
                          "h100_kmeanspp_s": model_in["h100_kmeanspp_s"], "parts": rb["parts"],
                          "parts_small": rs["parts"], "init_step_fit": step_fit(rb["parts"], rs["parts"],
                                                                                big["n"], small["n"], a)})
    for eng in engines:
        rb, rs = big["sepp_mine"][eng], small["sepp_mine"][eng]
        models = {f"d{d}": knn_table_cost(IMAGENET_N, d, a.sepp_k) for d in (a.imagenet_sepp_dim, 256)}
        time_rows.append({"item": "sepp_mine", "engine": eng,
                          "label": f"SePP table, exact kNN k={a.sepp_k} (measured at D={a.sepp_dim})",
                          "where": "offline before training (python -m fastcl.mining.sepp); rank 0 in a launch",
                          "measured_s": rb["timing"]["median_s"], "measured_s_small": rs["timing"]["median_s"],
                          "flops": rb["model"]["flops"], "flops_small": rs["model"]["flops"],
                          "achieved_gflop_s": rb["achieved_gflop_s"],
                          "exponent_measured": exponent(rb["timing"]["median_s"], rs["timing"]["median_s"], ratio),
                          "exponent_formula": exponent(rb["model"]["flops"], rs["model"]["flops"], ratio),
                          "imagenet": models, "imagenet_flops": models[f"d{a.imagenet_sepp_dim}"]["flops"],
                          "h100_torch_s": models[f"d{a.imagenet_sepp_dim}"]["h100_torch_s"],
                          "h100_faiss_gpu_s": models[f"d{a.imagenet_sepp_dim}"]["h100_faiss_gpu_s"]})
    vb, vs = big["knn_vote"], small["knn_vote"]
    vote_in = vote_cost(IMAGENET_N, IMAGENET_VAL, a.backbone_dim, IMAGENET_WORLD, a.knn_k)
    time_rows.append({"item": "knn_vote", "engine": "torch on the network's device (GPU at ImageNet; CPU here)",
                      "label": f"kNN monitor vote, k={a.knn_k} over Db={a.backbone_dim} "
                               f"(shard_topk + candidate merge + vote)",
                      "where": "every rank on its own bank shard, on its GPU; then an all-gather of the [M, k] "
                               "candidates, the same vote on every rank",
                      "measured_s": vb["timing"]["median_s"], "measured_s_small": vs["timing"]["median_s"],
                      "flops": vb["model"]["flops"], "flops_small": vs["model"]["flops"],
                      "achieved_gflop_s": vb["achieved_gflop_s"],
                      "shard_topk_s": vb["shard_topk_s"], "vote_s": vb["vote_s"],
                      "shard_topk_s_small": vs["shard_topk_s"], "vote_s_small": vs["vote_s"],
                      "block_rows_measured": vb["block_rows"], "split": vb["split"], "split_small": vs["split"],
                      "exponent_measured": exponent(vb["timing"]["median_s"], vs["timing"]["median_s"], ratio),
                      "exponent_formula": exponent(vb["model"]["flops"], vs["model"]["flops"], ratio),
                      "imagenet_flops": vote_in["flops"], "imagenet_flops_all_ranks": vote_in["flops_all_ranks"],
                      "imagenet_shard_rows": vote_in["shard_rows"], "imagenet_block_rows": vote_in["block_rows"],
                      "imagenet_bytes_streamed": vote_in["bytes_streamed"],
                      "imagenet_candidate_bytes": vote_in["candidate_bytes"],
                      "h100_torch_s": vote_in["h100_s"], "h100_shard_topk_s": vote_in["h100_shard_topk_s"],
                      "h100_merge_s": vote_in["h100_merge_s"],
                      "this_cpu_per_rank_at_imagenet_s": vote_in["flops"] / (vb["achieved_gflop_s"] * 1e9)})
    embed_s = (IMAGENET_N + IMAGENET_VAL) / (IMAGENET_WORLD * A("eval_img_s_per_gpu"))
    epoch_s = IMAGENET_N / (IMAGENET_WORLD * A("train_img_s_per_gpu"))
    return {"memory": mem_rows, "time": time_rows,
            "imagenet": {"n": IMAGENET_N, "val": IMAGENET_VAL, "world": IMAGENET_WORLD,
                         "knn_embed_pass_s": embed_s, "knn_vote_h100_s": vote_in["h100_s"],
                         "knn_call_s": embed_s + vote_in["h100_s"], "train_epoch_s_at_target": epoch_s,
                         "collective_timeout_s": 1800}}


def print_tables(a, summary: dict, n: int) -> None:
    print(f"\nscaling: measured at N = {n:,} (and N/4 for the exponents) on this CPU; formulas at ImageNet-1k "
          f"N = {IMAGENET_N:,}, M = {IMAGENET_VAL:,} held-out, W = {IMAGENET_WORLD} ranks; K = {a.queue}, D = {a.dim}, "
          f"L = {len(a.levels)} levels {a.levels}, SePP k = {a.sepp_k}, Db = {a.backbone_dim}")
    print("\n| item | measured at N | formula at N | exponent (measured / formula) | ImageNet-1k per rank | "
          "where (per rank) | formula |")
    print("|---|---|---|---|---|---|---|")
    for r in summary["memory"]:
        em = "n/a" if r["exponent_measured"] is None else f"{r['exponent_measured']:.2f}"
        tag = "" if r["exact"] else " (approx.)"
        print(f"| {r['label']} | {human(r['measured_bytes'])} | {human(r['formula_bytes'])}{tag} | "
              f"{em} / {r['exponent_formula']:.2f} | {human(r['imagenet_bytes'])} | {r['where']} | {r['formula']} |")
    print("\n| work | engine | measured at N (N/4) | GFLOP at N | achieved GFLOP/s | parts at N | "
          "exponent (measured / formula) | ImageNet-1k TFLOP | H100 torch-CUDA (model) | H100 faiss-gpu (model) | "
          "where |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in summary["time"]:
        em = "n/a" if r["exponent_measured"] is None else f"{r['exponent_measured']:.2f}"
        parts = ""
        if r["item"] == "knn_vote":
            gpu = (f"{secs(r['h100_torch_s'])} per rank: shard_topk {secs(r['h100_shard_topk_s'])} "
                   f"({r['imagenet_block_rows']}-query blocks of the {r['imagenet_shard_rows']:,}-row shard), "
                   f"merge {secs(r['h100_merge_s'])}")
            fg = "n/a"
            split = "; ".join(f"W = {w}: rank 0 {secs(v['shard_topk_s'])} + {secs(v['vote_s'])}, "
                              f"{v['pred_mismatches']} of the predictions differ from W = 1"
                              for w, v in r["split"].items())
            parts = (f"W = 1: shard_topk {secs(r['shard_topk_s'])} ({r['block_rows_measured']}-query blocks) + "
                     f"vote {secs(r['vote_s'])}; {split}")
        else:
            gpu, fg = secs(r["h100_torch_s"]), secs(r["h100_faiss_gpu_s"])
        if r["item"] == "ifnd_refresh":
            p = r["parts"]
            lg = "n/a" if p["lloyd_gflop_s"] is None else f"{p['lloyd_gflop_s']:.3g}"
            per = "n/a" if p["init_s_per_step"] is None else f"{p['init_s_per_step'] * 1e3:.3g} ms/step"
            parts = (f"k-means++ {p['init_steps']} steps {secs(p['init_s'])} ({per}); Lloyd {r['lloyd_iters']} "
                     f"iters {secs(p['lloyd_s'])} at {lg} GFLOP/s; rest {secs(p['rest_s'])}")
            gpu += f" (k-means++ {secs(r['h100_kmeanspp_s'])})"
        print(f"| {r['label']} | {r['engine']} | {secs(r['measured_s'])} ({secs(r['measured_s_small'])}) | "
              f"{r['flops'] / 1e9:.4g} | {r['achieved_gflop_s']:.3g} | {parts} | {em} / {r['exponent_formula']:.2f} | "
              f"{r['imagenet_flops'] / 1e12:.4g} | {gpu} | {fg} | {r['where']} |")
    im = summary["imagenet"]
    print(f"\nkNN monitor call at ImageNet (model): embedding pass {secs(im['knn_embed_pass_s'])} on {IMAGENET_WORLD} "
          f"ranks + vote {secs(im['knn_vote_h100_s'])} = {secs(im['knn_call_s'])} (collective timeout "
          f"{im['collective_timeout_s']} s); training epoch at the {A('train_img_s_per_gpu'):.0f} img/s/GPU target (not a measurement): "
          f"{secs(im['train_epoch_s_at_target'])}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m fastcl.bench scaling", description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=65536, help="scaled dataset size (N/4 is measured too)")
    p.add_argument("--queue", type=int, default=65536, help="MoCo queue size K")
    p.add_argument("--dim", type=int, default=128, help="projection dim D (queue, SampleTable, IFND k-means)")
    p.add_argument("--levels", type=int, nargs="+", default=[1000, 2000, 4000],
                   help="IFND k-means levels (configs/exp/imagenet_ifnd.yaml)")
    p.add_argument("--niter", type=int, default=20)
    p.add_argument("--init", default="kmeans++", choices=["kmeans++", "random"])
    p.add_argument("--sepp-k", type=int, default=5)
    p.add_argument("--sepp-threshold", type=float, default=0.5)
    p.add_argument("--sepp-dim", type=int, default=128,
                   help="feature dim of the measured SePP search (the time model is linear in D)")
    p.add_argument("--imagenet-sepp-dim", type=int, default=2048,
                   help="feature dim of the SePP search at ImageNet (pooled ResNet-50 features, centred)")
    p.add_argument("--backbone-dim", type=int, default=2048, help="kNN monitor feature dim Db (ResNet-50)")
    p.add_argument("--world", type=int, default=IMAGENET_WORLD,
                   help="ranks the kNN monitor is sharded over (simulated in this process; >= 2)")
    p.add_argument("--knn-k", type=int, default=200, help="neighbours of the kNN monitor's vote (trainer.knn_k)")
    p.add_argument("--engines", nargs="+", default=None, choices=["torch", "faiss-cpu"],
                   help="mining engines (default: torch, and faiss-cpu when importable)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch and faiss threads; 0 keeps the libraries' defaults")
    p.add_argument("--out", default="docs/benchmarks")
    p.add_argument("--name", default="scaling_cpu")
    a = p.parse_args(argv)
    small_n = a.n // 4
    if min(a.levels) < 2 or max(a.levels) > small_n:
        raise ValueError(f"--levels must lie in [2, N/4 = {small_n}], got {a.levels}")
    if a.queue < 1 or a.world < 2 or a.knn_k < 1 or val_size(small_n) < a.world or a.repeats < 1:
        raise ValueError("--queue, --knn-k, --repeats >= 1, --world >= 2 and N/4's held-out split "
                         f"({val_size(small_n)} images) >= --world are needed")
    engines = a.engines or (["torch"] + (["faiss-cpu"] if faiss_module() is not None else []))
    if a.threads > 0:
        torch.set_num_threads(a.threads)
        if faiss_module() is not None:
            faiss_module().omp_set_num_threads(a.threads)
    load_before = os.getloadavg()
    warm_up(engines)
    small = measure(small_n, a, engines)
    big = measure(a.n, a, engines)
    load_after = os.getloadavg()
    summary = summarize(a, big, small, engines)
    print_tables(a, summary, a.n)
    command = "python -m fastcl.bench scaling " + " ".join(argv if argv is not None else [])
    payload = {"command": command.strip(), "config": vars(a), "engines": engines, "torch_threads":
               torch.get_num_threads(), "load_average_before": load_before, "load_average_after": load_after,
               "assumptions": {k: {"value": v, "meaning": m} for k, (v, m) in ASSUMPTIONS.items()},
               "model_constants": {"KPP_KERNELS": KPP_KERNELS, "LLOYD_KERNELS": LLOYD_KERNELS,
                                   "CHUNK_KERNELS": CHUNK_KERNELS, "KNN_BLOCK_KERNELS": KNN_BLOCK_KERNELS,
                                   "VOTE_BLOCK_KERNELS": VOTE_BLOCK_KERNELS,
                                   "VOTE_MERGE_KERNELS": VOTE_MERGE_KERNELS, "SIMS_BLOCK": SIMS_BLOCK},
               "measured": {"n": _strip(big), "n_over_4": _strip(small)}, "summary": summary}
    write_evidence(a.name, payload, out_dir=a.out)
    return payload


def _strip(d):
    """The measurement without its tensors (JSON)."""
    if isinstance(d, dict):
        return {k: _strip(v) for k, v in d.items() if not isinstance(v, torch.Tensor)}
    return d


if __name__ == "__main__":
    main()
