"""Spherical k-means (IFND's pseudo-label source, METHODS.md §3.3) with a faiss and a torch implementation, and the
pseudo-labels drawn from it (confidence and incremental acceptance, at the end of this file).

One algorithm, two engines for its Lloyd iterations. Shared torch code normalises the rows, draws the training
subsample (at most k·max_points_per_centroid points, faiss' rule) and the initial centroids of every restart from
one seeded CPU generator; faiss (faiss.Clustering, spherical=True, IndexFlatIP / GpuIndexFlatIP) or torch then
runs at most `niter` iterations (cosine assignment, centroid = normalised mean; both stop early only once an
iteration changes nothing: faiss when the objective repeats, torch when the assignment repeats, which leaves the
result as it is); the restart with the largest summed cosine wins; finally EVERY point is assigned by an exact
2-NN inner-product search against the centroids. Because both engines start from the same points on the same data
they agree up to float rounding and their handling of empty clusters (faiss splits a big cluster, torch moves the
centroid onto the worst-fitting point), which the tests check on planted clusters.
"""
from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fastcl.mining.engine import as_f32_numpy, choose_engine, faiss_module, flat_ip_index

INITS = ("random", "kmeans++")
_CHUNK_ELEMS = 1 << 24   # similarity-matrix elements per chunk in the torch path (64 MiB fp32)


class KMeansResult(NamedTuple):
    """centroids [k, D] float32 unit rows; assign [N] int64 in [0, k); sims [N, 2] float32 cosine to the
    nearest and second-nearest centroid (column 1 is -1, the lowest cosine, when k == 1). All on x's device."""
    centroids: Tensor
    assign: Tensor
    sims: Tensor


def spherical_kmeans(x: Tensor, k: int, niter: int = 20, nredo: int = 1, seed: int = 0, backend: str = "auto",
                     max_points_per_centroid: int = 1000, min_points_per_centroid: int = 10, *,
                     init: str) -> KMeansResult:
    """Spherical k-means of the rows of x [N, D] (normalised here; any dtype/device) into k clusters.

    niter: Lloyd iterations per restart (fewer once converged, see the module doc); nredo: restarts from
    different initial centroids (all drawn from the generator seeded with `seed`), the one with the largest summed
    cosine of its last assignment wins;
    max_points_per_centroid: train on a seeded random subset of k·max_points_per_centroid points when N is larger
    (every point is still assigned); min_points_per_centroid: below k·this many points the clustering is poorly
    determined and a warning is given (PCL passes 1000 / 10: our defaults).
    init (required, no default here: IFND's one default is IFNDConfig.init): "random" (k distinct random points:
    faiss' default, what PCL used; cheap at any k) or "kmeans++" (greedy k-means++, D² = 1 - cos, 2 + ln k
    candidates per pick: far more reliable for small k, but k sequential steps each costing ~(2 + ln k)·N·D, so
    keep it for k up to a few thousand).
    backend: see fastcl.mining.engine.choose_engine; the torch engine runs on x's device.
    """
    n, d = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= N, got k={k}, N={n}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if niter < 1 or nredo < 1:
        raise ValueError("niter and nredo must be >= 1")
    if n < k * min_points_per_centroid:
        warnings.warn(f"k-means of {n} points into {k} clusters: fewer than {min_points_per_centroid} points "
                      "per centroid", stacklevel=2)
    backend = choose_engine(backend, x.device)
    xn = F.normalize(x.detach().float(), dim=1).contiguous()
    g = torch.Generator().manual_seed(seed)     # CPU generator: CPU and CUDA runs draw the same points
    xt = xn
    if n > k * max_points_per_centroid:
        xt = xn[torch.randperm(n, generator=g)[:k * max_points_per_centroid].to(xn.device)]
    if backend == "torch":
        lloyd, data = _lloyd_torch, xt
    else:
        lloyd, data = _lloyd_faiss, (as_f32_numpy(xt), backend)   # one host copy, reused by every restart
    best_c, best_obj = None, -math.inf
    for _ in range(nredo):
        c, obj = lloyd(data, _init_centroids(xt, k, init, g), niter)
        if obj > best_obj:
            best_c, best_obj = c, obj
    if backend == "torch":
        sims, ids = _top_sims(xn, best_c, min(2, k))
    else:
        sims, ids = _search_faiss(as_f32_numpy(xn) if xt is not xn else data[0], best_c, min(2, k), backend)
    return _package(best_c.to(x.device), ids.to(x.device), sims.to(x.device), k)


# ---------------------------------------------------------------------------------------------------- init
def _init_centroids(x: Tensor, k: int, init: str, g: torch.Generator) -> Tensor:
    """k initial unit centroids [k, D] picked among the rows of x [n, D]; randomness from the CPU generator g."""
    n = x.shape[0]
    if init == "random":
        return x[torch.randperm(n, generator=g)[:k].to(x.device)].clone()
    # greedy k-means++ (Arthur & Vassilvitskii; the "greedy" variant scikit-learn uses): plain D² sampling misses
    # whole clusters once the covered clusters' summed spread outweighs one far cluster, so draw 2 + ln k
    # candidates and keep the one that lowers the potential most.
    trials = 2 + int(math.log(k))
    u = torch.rand(k, trials, generator=g, dtype=torch.float64).to(x.device)
    c = torch.empty(k, x.shape[1], device=x.device, dtype=x.dtype)
    c[0] = x[int(torch.randint(n, (1,), generator=g))]
    mind = (1 - x @ c[0]).clamp_min_(0)
    for j in range(1, k):
        cum = mind.double().cumsum(0)
        # inverse-CDF sampling on the device: no host sync per step
        cand = torch.searchsorted(cum, u[j] * cum[-1]).clamp_max_(n - 1)            # [trials]
        dc = torch.minimum(mind[:, None], (1 - x @ x[cand].T).clamp_min_(0))       # [n, trials]
        best = dc.sum(0).argmin().view(1)
        c[j] = x.index_select(0, cand.index_select(0, best))[0]
        mind = dc.index_select(1, best)[:, 0]
    return c


# ---------------------------------------------------------------------------------------------------- torch
def _top_sims(x: Tensor, c: Tensor, top: int) -> tuple[Tensor, Tensor]:
    """Chunked cosine top-`top` of rows x [N, D] against unit centroids c [k, D] -> (vals [N, top], ids [N, top])."""
    rows = max(1, _CHUNK_ELEMS // c.shape[0])
    vals, ids = [], []
    for xc in x.split(rows):
        s = xc @ c.T
        v, i = s.topk(top, dim=1) if top > 1 else s.max(dim=1, keepdim=True)
        vals.append(v)
        ids.append(i)
    return torch.cat(vals), torch.cat(ids)


def _lloyd_torch(x: Tensor, c: Tensor, niter: int) -> tuple[Tensor, float]:
    """At most niter spherical Lloyd iterations of x [n, D] from unit centroids c [k, D] -> (centroids, summed
    cosine of the last assignment, faiss' objective). An empty cluster moves onto the worst-fitting point
    (deterministic). Stops when an assignment repeats: the centroids would then repeat too."""
    k = c.shape[0]
    obj, prev = 0.0, None
    for _ in range(niter):
        best, a = _top_sims(x, c, 1)
        best, a = best[:, 0], a[:, 0]
        obj = float(best.sum())
        if prev is not None and torch.equal(a, prev):
            break
        prev = a
        sums = torch.zeros_like(c).index_add_(0, a, x)
        counts = torch.bincount(a, minlength=k)
        empty = (counts == 0).nonzero().flatten()      # host sync once per iteration (not the training hot path)
        if empty.numel():
            sums[empty] = x[best.topk(empty.numel(), largest=False).indices]
        c = F.normalize(sums, dim=1)
    return c, obj


# ---------------------------------------------------------------------------------------------------- faiss
def _lloyd_faiss(data: tuple[np.ndarray, str], c0: Tensor, niter: int) -> tuple[Tensor, float]:
    """niter spherical Lloyd iterations in faiss.Clustering from the given centroids c0 [k, D]."""
    faiss = faiss_module()
    xt, backend = data
    k, d = c0.shape
    cp = faiss.ClusteringParameters()
    cp.niter, cp.nredo, cp.spherical, cp.verbose = niter, 1, True, False
    # the subsample was drawn by the caller: stop faiss from drawing (and warning about) its own
    cp.max_points_per_centroid = max(1, -(-xt.shape[0] // k))
    cp.min_points_per_centroid = 1
    clus = faiss.Clustering(d, k, cp)
    # faiss keeps input centroids and only draws the missing ones, so giving all k fixes the initialisation
    faiss.copy_array_to_vector(as_f32_numpy(c0).ravel(), clus.centroids)
    clus.train(xt, flat_ip_index(d, backend))
    obj = clus.iteration_stats.at(clus.iteration_stats.size() - 1).obj   # summed IP of the last assignment
    return torch.from_numpy(faiss.vector_to_array(clus.centroids).reshape(k, d)), float(obj)


def _search_faiss(xn: np.ndarray, cent: Tensor, top: int, backend: str) -> tuple[Tensor, Tensor]:
    """Exact top-`top` inner product of xn [N, D] against cent [k, D] -> (sims [N, top], ids [N, top])."""
    index = flat_ip_index(cent.shape[1], backend)
    index.add(as_f32_numpy(cent))
    sims, ids = index.search(xn, top)
    return torch.from_numpy(sims), torch.from_numpy(ids)


def _package(cent: Tensor, ids: Tensor, sims: Tensor, k: int) -> KMeansResult:
    """Shape the 2-NN answer into KMeansResult (pads the second column with cos -1 when k == 1)."""
    sims = sims.float()
    if k == 1:
        sims = torch.cat([sims, torch.full_like(sims, -1.0)], dim=1)
    return KMeansResult(cent.float().contiguous(), ids[:, 0].long().contiguous(), sims.contiguous())


# ---------------------------------------------------------------------------------------------------------------
# Pseudo-labels from a clustering.
# IFND pseudo labels: confidence, incremental acceptance and its schedule (METHODS.md §3.1, §3.7).
#
# The paper's exact confidence score and acceptance rule were not retrievable (METHODS.md §0, §3.6), so
# everything here is one of our [U] defaults, each selectable:
# * confidence "centroid": cosine of a sample to its own centroid (the teaser's per-centroid radius) [U default];
#   "margin": nearest minus second-nearest centroid cosine (how unambiguous the assignment is) [U option].
# * acceptance per cluster: the ⌈rate·n_c⌉ most confident members of every cluster c keep their label [U default],
#   so small clusters are not starved; or globally: the ⌈rate·N⌉ most confident samples overall [U option].
# * schedule: zeros during warm-up, then linear from `start` to `end`, reaching `end` at the last epoch [U].
# Rejected samples get label -1, which never matches anything (fastcl.objectives.ifnd_valid).

CONFIDENCES = ("centroid", "margin")
_EPS = 1e-9   # ⌈rate·n⌉ of decimal rates: 0.3·10 is 3.0000000000000004 in binary floating point, which is 3


def confidence(result: KMeansResult, kind: str = "centroid") -> Tensor:
    """Per-sample confidence [N] float32 of a k-means result: "centroid" = sims[:, 0] (cos to own centroid),
    "margin" = sims[:, 0] - sims[:, 1] (nearest minus second-nearest centroid). Higher = more confident."""
    if kind == "centroid":
        return result.sims[:, 0].clone()
    if kind == "margin":
        return result.sims[:, 0] - result.sims[:, 1]
    raise ValueError(f"confidence kind must be one of {CONFIDENCES}, got {kind!r}")


def quota(count: Tensor, rate: float) -> Tensor:
    """⌈rate·count⌉ as int64, exact for decimal rates (see _EPS). count: any int tensor."""
    return torch.ceil(count.double() * rate - _EPS).clamp_min_(0).long()


def accept(assign: Tensor, conf: Tensor, rate: float, per_cluster: bool = True) -> Tensor:
    """Incremental acceptance: labels [N] int64 = assign where accepted, -1 elsewhere.

    assign [N] int64 cluster ids >= 0; conf [N] confidences; rate in [0, 1].
    per_cluster: accept the ⌈rate·n_c⌉ most confident members of each cluster c; else the ⌈rate·N⌉ most
    confident samples overall. rate 0 accepts nothing, rate 1 everything. Equal confidences are broken by the
    lower sample index (stable sort), so every rank computes the same labels from the same inputs.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"acceptance rate must be in [0, 1], got {rate}")
    n = assign.shape[0]
    order = torch.sort(conf, descending=True, stable=True).indices      # most confident first
    if per_cluster:
        # regroup by cluster keeping the confidence order inside each cluster
        order = order[torch.sort(assign[order], stable=True).indices]
        counts = torch.bincount(assign, minlength=int(assign.max()) + 1 if n else 0)
        starts = torch.cumsum(counts, 0) - counts
        a_sorted = assign[order]
        rank_in_cluster = torch.arange(n, device=assign.device) - starts[a_sorted]
        take = rank_in_cluster < quota(counts, rate)[a_sorted]
    else:
        take = torch.arange(n, device=assign.device) < quota(torch.tensor(n), rate)
    labels = torch.full_like(assign, -1)
    labels[order[take]] = assign[order[take]]
    return labels
