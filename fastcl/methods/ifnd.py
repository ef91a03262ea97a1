"""IFND: Incremental False Negative Detection (METHODS.md §3).

Every `ifnd.refresh_every` epochs rank 0 runs spherical faiss k-means at each cluster count in `ifnd.levels`
over the SampleTable of EMA keys (`source=table`, no extra pass) or over a fresh embedding pass of the training
images with the eval transform (`source=pass`, sharded over all ranks), and broadcasts the result. Each epoch only
the most confident fraction a(e) of each cluster keeps its pseudo-label (acceptance grows linearly after a warm-up: our choice,
the paper's schedule was not retrievable). A candidate sharing an accepted label with the anchor is a detected
false negative: eliminated from the denominator (`mode=elim`, the paper's main results) or attracted as an extra
positive (`mode=attr`). The positive is never masked. How the levels combine (`ifnd.hierarchy`, the paper's
rule was not retrievable):
  per_level (default, our choice): one loss term per level, each with that level's false negatives only,
             averaged (PCL's ProtoNCE averages its M clusterings the same way: `level_targets` below, the
             one implementation of the rule). The k-means levels {C, 2C, 4C} are nearly nested, so under
             `union` the coarsest level decides alone and the finer ones add nothing; per_level keeps every
             granularity in the loss and eliminates less aggressively where the coarse clusters are wrong.
  union:     FN at ANY level, one term (objectives.targets.ifnd_valid): the rule of the earlier results.
Works on either baseline (`method.base=mocov2`: queue candidates looked up by their stored ids; `simclr`: in-batch
views), both rules (per_level through `pair_loss`, which the step calls in both layouts).
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fastcl import dist
from fastcl.memory import SampleTable
from fastcl.methods.base import ContrastiveMethod, Layout, Pair, Services, Sims
from fastcl.objectives import Target, label_target, mean_soft_cross_entropy


def level_targets(sims: Sims, labels: Tensor, mode: str, backend: str = "auto") -> list[Target]:
    """IFND's per_level hierarchy rule (PCL-style): one `label_target` per clustering level (labels [L, N] -> L
    Targets), target l built from level l's labels only (elim: a candidate leaves level l's denominator iff it
    shares the anchor's accepted level-l label; attr: uniform over the positive and the level-l false negatives).
    The loss is the mean over levels of the soft CE under each target (`objectives.loss.mean_soft_cross_entropy`),
    as PCL's ProtoNCE averages its M clusterings. The `union` rule is instead ONE target, `label_target` over all
    levels: with L identical levels both rules give the same loss; with nested levels (fine within coarse) union =
    the coarse level alone, per_level averages the coarse and the fine terms."""
    return [label_target(sims.pos, sims.valid, sims.row_ids, sims.col_ids, labels[lv:lv + 1], mode, backend)
            for lv in range(labels.shape[0])]


def acceptance_schedule(epochs: int, warmup_epochs: int = 0, start: float = 0.0, end: float = 1.0) -> np.ndarray:
    """Per-epoch acceptance rate a [epochs] float64 [U: METHODS.md §3.1 default a(e) ~ e/E].

    a[e] = 0 for e < warmup_epochs, then linear from `start` (at e = warmup_epochs) to `end` (at e = epochs-1);
    a single post-warm-up epoch gets `end`. Needs 0 <= start <= end <= 1, so a is monotone with a[-1] = end.
    """
    if not 0.0 <= start <= end <= 1.0:
        raise ValueError(f"need 0 <= start <= end <= 1, got start={start}, end={end}")
    if not 0 <= warmup_epochs < epochs:
        raise ValueError(f"need 0 <= warmup_epochs < epochs, got warmup_epochs={warmup_epochs}, epochs={epochs}")
    a = np.zeros(epochs, dtype=np.float64)
    ramp = epochs - warmup_epochs
    a[warmup_epochs:] = np.linspace(start, end, ramp) if ramp > 1 else end
    assert a.shape == (epochs,) and a[-1] == end
    return a


# ---- spherical k-means: the pseudo-label source -------------------------------------------------------------
# Spherical k-means (METHODS.md §3.3) with a faiss and a torch implementation.
#
# One algorithm, two engines for its Lloyd iterations. Shared torch code normalises the rows, draws the training
# subsample (at most k·max_points_per_centroid points, faiss' rule) and the initial centroids of every restart from
# one seeded CPU generator; faiss (faiss.Clustering, spherical=True, IndexFlatIP / GpuIndexFlatIP) or torch then
# runs at most `niter` iterations (cosine assignment, centroid = normalised mean; both stop early only once an
# iteration changes nothing: faiss when the objective repeats, torch when the assignment repeats, which leaves the
# result as it is); the restart with the largest summed cosine wins; finally EVERY point is assigned by an exact
# 2-NN inner-product search against the centroids. Because both engines start from the same points on the same data
# they agree up to float rounding and their handling of empty clusters (faiss splits a big cluster, torch moves the
# centroid onto the worst-fitting point), which the tests check on planted clusters.

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

    niter: Lloyd iterations per restart (fewer once converged, see the section comment above); nredo: restarts from
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
    from fastcl.mining.engine import as_f32_numpy, choose_engine  # faiss: loaded at the first clustering

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
    from fastcl.mining.engine import as_f32_numpy, faiss_module, flat_ip_index

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
    from fastcl.mining.engine import as_f32_numpy, flat_ip_index

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


# ---- pseudo-labels: confidence, incremental acceptance and the miner that holds them ------------------------

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


class ClusterMiner:
    """IFND pseudo labels at several k-means granularities (METHODS.md §3.1–3.3).

    State (on `device`, identical on every rank after refresh): assign [L, N] int64 cluster of each sample per
    level (-1 before the first refresh), conf [L, N] float32 its confidence, labels [L, N] int64 the accepted
    pseudo labels (-1 = not accepted: never a detected false negative), epoch_mined (-1 = never), rate (the
    acceptance rate labels were made with) and last_seconds (wall time of the last refresh on this rank; on
    rank 0 that is the clustering plus the broadcast).
    Clustering is costly and acceptance cheap: refresh() clusters (every `every` epochs, see due()), relabel()
    only re-applies a new acceptance rate to the stored assignment, so acceptance can grow every epoch.
    Level l clusters with seed + l, so levels differ even when two share a k.
    init: the k-means initialisation ("kmeans++" | "random", INITS), always given by the caller: the miner
    has no default of its own, IFND passes method.ifnd.init (IFNDConfig.init holds the one default).
    """

    def __init__(self, num_samples: int, levels: list[int] | tuple[int, ...], *, init: str, niter: int = 20,
                 nredo: int = 1, seed: int = 0, confidence: str = "centroid", per_cluster: bool = True,
                 backend: str = "auto", every: int = 1, max_points_per_centroid: int = 1000,
                 min_points_per_centroid: int = 10, device: str | torch.device = "cpu"):
        if not levels or any(k < 1 for k in levels):
            raise ValueError(f"levels must be a non-empty list of cluster counts >= 1, got {levels}")
        if confidence not in CONFIDENCES:
            raise ValueError(f"confidence must be one of {CONFIDENCES}, got {confidence!r}")
        self.num_samples, self.levels = int(num_samples), [int(k) for k in levels]
        self.niter, self.nredo, self.seed, self.init = niter, nredo, seed, init
        self.confidence, self.per_cluster, self.backend, self.every = confidence, per_cluster, backend, every
        self.max_points_per_centroid, self.min_points_per_centroid = max_points_per_centroid, min_points_per_centroid
        shape = (len(self.levels), self.num_samples)
        self.assign = torch.full(shape, -1, dtype=torch.long, device=device)
        self.conf = torch.zeros(shape, dtype=torch.float32, device=device)
        self.labels = torch.full(shape, -1, dtype=torch.long, device=device)
        self.epoch_mined, self.rate, self.last_seconds = -1, 0.0, 0.0

    def due(self, epoch: int) -> bool:
        """True when refresh() should run at this epoch (never mined, or `every` epochs since the last)."""
        return self.epoch_mined < 0 or epoch - self.epoch_mined >= self.every

    def refresh(self, features: Tensor | None, rate: float, epoch: int | None = None) -> Tensor:
        """Re-cluster and re-accept. features [N, D] on rank 0 (any device; None/ignored elsewhere); rate in
        [0, 1]; epoch recorded as epoch_mined (default: epoch_mined + 1). Returns labels [L, N]. Collective."""
        t0 = time.perf_counter()

        def work():
            if features is None or tuple(features.shape[:1]) != (self.num_samples,):
                raise ValueError(f"rank 0 needs features of shape [{self.num_samples}, D], got "
                                 f"{None if features is None else tuple(features.shape)}")
            assign, conf = torch.empty_like(self.assign), torch.empty_like(self.conf)
            for lvl, k in enumerate(self.levels):
                res = spherical_kmeans(features, k, niter=self.niter, nredo=self.nredo, seed=self.seed + lvl,
                                       backend=self.backend, max_points_per_centroid=self.max_points_per_centroid,
                                       min_points_per_centroid=self.min_points_per_centroid, init=self.init)
                assign[lvl] = res.assign.to(assign.device)
                conf[lvl] = confidence(res, self.confidence).to(conf.device)
            return assign, conf

        out = dist.run_on_rank0(work)          # state changes only once every level succeeded
        if out is not None:
            self.assign.copy_(out[0])
            self.conf.copy_(out[1])
        dist.broadcast_state_(self.assign)
        dist.broadcast_state_(self.conf)
        # every rank derives the labels from the same broadcast assign/conf with a deterministic rule, but the
        # contract is "rank 0's result everywhere", so the labels travel too (cheap next to the clustering)
        self._accept(rate)
        dist.broadcast_state_(self.labels)
        self.epoch_mined = self.epoch_mined + 1 if epoch is None else int(epoch)
        self.last_seconds = dist.synced_seconds(t0)
        return self.labels

    def relabel(self, rate: float) -> Tensor:
        """Apply a new acceptance rate to the stored assignment (no clustering, no communication: assign/conf
        are identical on all ranks and accept() is deterministic). Returns labels [L, N]; all -1 if never mined."""
        if self.epoch_mined >= 0:
            self._accept(rate)
        return self.labels

    def _accept(self, rate: float) -> None:
        for lvl in range(len(self.levels)):
            self.labels[lvl] = accept(self.assign[lvl], self.conf[lvl], rate, self.per_cluster)
        self.rate = float(rate)

    def to(self, device: str | torch.device) -> "ClusterMiner":
        self.assign, self.conf, self.labels = (t.to(device) for t in (self.assign, self.conf, self.labels))
        return self

    def state_dict(self) -> dict:
        return {"levels": list(self.levels), "num_samples": self.num_samples, "assign": self.assign.cpu(),
                "conf": self.conf.cpu(), "labels": self.labels.cpu(), "epoch_mined": int(self.epoch_mined),
                "rate": float(self.rate)}

    def load_state_dict(self, state: dict) -> None:
        if list(state["levels"]) != self.levels or int(state["num_samples"]) != self.num_samples:
            raise ValueError(f"checkpoint miner has levels={state['levels']}, N={state['num_samples']}; "
                             f"this one levels={self.levels}, N={self.num_samples}")
        for name in ("assign", "conf", "labels"):
            getattr(self, name).copy_(state[name])
        self.epoch_mined, self.rate = int(state["epoch_mined"]), float(state["rate"])


@dataclass
class IFNDConfig:
    """method.ifnd"""
    levels: list[int] = field(default_factory=lambda: [10, 20, 40])  # k-means cluster counts K_m [U]
    refresh_every: int = 1  # re-cluster every R epochs [U]
    source: str = "table"  # table: SampleTable of EMA keys | pass: full embedding pass (eval transform)
    mode: str = "elim"  # elim (paper main results) | attr
    warmup_epochs: int = 0  # epochs with acceptance 0 (instance discrimination only)
    accept_start: float = 0.0  # acceptance after warm-up, rising linearly to accept_end at the last epoch [U]
    accept_end: float = 1.0
    per_cluster: bool = True  # top-a fraction per cluster [U] (False: globally)
    confidence: str = "centroid"  # centroid: cos to own centroid | margin: nearest - second nearest [U]
    hierarchy: str = "per_level"  # per_level: mean over levels of each level's loss (PCL-style) | union: FN at ANY level [U]
    niter: int = 20
    nredo: int = 1
    # k-means init, kmeans++ | random: THE default (ClusterMiner and spherical_kmeans take it from here, they have
    # none). Our choice: IFND's source is silent on it (paper body not retrievable, METHODS.md §3.3); PCL used
    # faiss' random, which merges clusters at small k. kmeans++ is what IFND has always run with here.
    init: str = "kmeans++"
    seed: int = 0

    @staticmethod
    def checks(c) -> list[tuple[str, bool, str]]:
        return [
            ("levels", len(c.levels) > 0 and all(k > 1 for k in c.levels),
             f"need >= 1 cluster count, each > 1, got {list(c.levels)}"),
            ("mode", c.mode in ("elim", "attr"), f"{c.mode!r} not in elim|attr"),
            ("source", c.source in ("table", "pass"), f"{c.source!r} not in table|pass"),
            ("confidence", c.confidence in ("centroid", "margin"), f"{c.confidence!r} not in centroid|margin"),
            ("hierarchy", c.hierarchy in ("per_level", "union"), f"{c.hierarchy!r} not in per_level|union"),
            ("init", c.init in ("kmeans++", "random"), f"{c.init!r} not in kmeans++|random"),
            ("accept_start", 0 <= c.accept_start <= c.accept_end <= 1,
             f"need 0 <= accept_start <= accept_end <= 1, got {c.accept_start}, {c.accept_end}"),
            ("refresh_every", c.refresh_every >= 1, "must be >= 1"),
        ]


class IFND(ContrastiveMethod):
    section, Config = "ifnd", IFNDConfig
    follows_base = True
    needs = frozenset({"embed_pass"})  # source=pass clusters a fresh eval-transform pass

    def __init__(self, c: IFNDConfig, layout: Layout):
        super().__init__(c, layout)
        n = layout.num_samples
        if max(c.levels) > n:  # bad-input fix (test_bad_input): fail at setup, not at the first refresh
            raise ValueError(f"method.ifnd.levels={list(c.levels)}: a cluster count exceeds the dataset ({n} samples)")
        self.table = SampleTable(n, layout.dim) if c.source == "table" else None
        self.miner = ClusterMiner(n, list(c.levels), niter=c.niter, nredo=c.nredo, seed=c.seed,
                                  confidence=c.confidence, per_cluster=c.per_cluster, init=c.init,
                                  every=c.refresh_every)
        self.rates = None  # per-epoch acceptance, set by schedules() (it needs the run's length)

    def schedules(self, total_steps: int, steps_per_epoch: int) -> dict:
        c = self.c
        epochs = total_steps // steps_per_epoch
        try:
            self.rates = acceptance_schedule(epochs, c.warmup_epochs, c.accept_start, c.accept_end)
        except ValueError as e:
            raise ValueError(f"method.ifnd.warmup_epochs={c.warmup_epochs} with trainer.epochs={epochs}: {e}") from None
        return {}

    def prepare(self, svc: Services) -> None:
        super().prepare(svc)
        if self.c.source == "pass" and svc.embed_pass is None:
            raise ValueError("method.ifnd.source=pass needs the trainer's embedding pass (Services.embed_pass), "
                             "which was not lent here: use method.ifnd.source=table")
        self.embed_pass = svc.embed_pass

    @torch.no_grad()
    def _features(self) -> torch.Tensor:
        """[N, D] features to cluster (rank 0). Table rows never filled yet get a fixed random direction
        (they are clustered but their labels are dropped below)."""
        if self.table is not None:
            f = self.table.feats.float()
            unseen = ~self.table.seen
            g = torch.Generator().manual_seed(self.c.seed)
            f[unseen] = torch.randn(int(unseen.sum()), f.shape[1], generator=g).to(f.device)
            return f
        return self.embed_pass()  # the eval-transform pass (teacher if there is one)

    def on_epoch_start(self, epoch: int, svc: Services) -> dict:
        rate = float(self.rates[epoch])
        if rate <= 0 or (self.table is not None and not bool(self.table.seen.any())):
            self.miner.labels.fill_(-1)  # warm-up: plain instance discrimination
            return {"ifnd_rate": 0.0}
        if self.miner.due(epoch):
            # source=pass: embed_dataset is sharded over all ranks (a collective); the table is rank 0's alone
            feats = self._features() if dist.rank() == 0 or self.table is None else None
            self.miner.refresh(feats, rate, epoch)
        else:
            self.miner.relabel(rate)
        if self.table is not None:
            self.miner.labels[:, ~self.table.seen] = -1  # never-seen samples carry no usable feature
        accepted = float((self.miner.labels >= 0).float().mean())  # host sync (epoch level)
        return {"ifnd_rate": rate, "ifnd_accepted": accepted, "ifnd_mine_s": self.miner.last_seconds}

    def assign(self, sims: Sims, sc: dict) -> Target:
        """The union target (also what the diagnostics read under per_level: a candidate eliminated at any level)."""
        return label_target(sims.pos, sims.valid, sims.row_ids, sims.col_ids, self.miner.labels, self.c.mode,
                            self.layout.kernel)

    def pair_loss(self, pair: Pair, extras: list, sc: dict, step: int) -> torch.Tensor:
        """per_level: the pair's loss is the mean over levels of each level's loss (PCL-style), not the union's."""
        if self.c.hierarchy != "per_level" or self.miner.labels.shape[0] == 1:
            return pair.loss  # one level: both rules are the same loss
        sims = pair.sims
        return mean_soft_cross_entropy(sims.student / self.tau,
                                       level_targets(sims, self.miner.labels, self.c.mode, self.layout.kernel))

    @torch.no_grad()
    def diagnostics(self, sims: Sims, target: Target, labels: torch.Tensor) -> dict:
        from fastcl.eval.diagnostics import fn_diagnostics

        pseudo = self.miner.labels
        # host sync (log steps only): before the first clustering (warm-up) there is nothing to measure
        return fn_diagnostics(sims, target, labels, pseudo if bool((pseudo >= 0).any()) else None)
