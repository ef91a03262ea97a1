"""Stateful miners the trainer holds: ClusterMiner (IFND pseudo labels) and NeighbourMiner (SePP pairs).

DESIGN.md "State contract": a miner computes on rank 0 only (faiss GPU, faiss CPU or torch: fastcl/mining/engine.py)
and broadcasts its tables to every rank; the other ranks pass features=None (anything they pass is ignored, so
they need not hold the full feature table). Every rank must call refresh/mine together: they are collectives.
If rank 0 fails, the error is broadcast first so the other ranks raise too instead of hanging in a broadcast.
Both miners have state_dict/load_state_dict made of plain tensors and numbers (loadable with
torch.load(weights_only=True)), so accelerator.register_for_checkpointing can save them.
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.distributed as tdist
from torch import Tensor

from fastcl.dist import broadcast, broadcast_object, is_dist, rank
from fastcl.mining.kmeans import spherical_kmeans
from fastcl.mining.knn import semantic_pairs
from fastcl.mining.kmeans import CONFIDENCES, accept, confidence


def _broadcast_(t: Tensor) -> Tensor:
    """In-place broadcast from rank 0 of a state tensor; NCCL only moves CUDA tensors, so stage through one."""
    if is_dist() and tdist.get_backend() == "nccl" and t.device.type != "cuda":
        staged = t.to(torch.device("cuda", torch.cuda.current_device()))
        broadcast(staged)
        t.copy_(staged)
    else:
        broadcast(t)
    return t


def _run_on_rank0(fn):
    """fn() on rank 0 (None elsewhere), then tell every rank whether it raised, so that nobody waits forever
    on the broadcast that would have followed."""
    out, err = None, None
    if rank() == 0:
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below on every rank
            err = e
    status = broadcast_object(None if err is None else f"{type(err).__name__}: {err}")
    if err is not None:
        raise err
    if status is not None:
        raise RuntimeError(f"mining failed on rank 0: {status}")
    return out


def _sync_time(t0: float) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


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
    init: the k-means initialisation ("kmeans++" | "random", kmeans.INITS), always given by the caller: the miner
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

        out = _run_on_rank0(work)          # state changes only once every level succeeded
        if out is not None:
            self.assign.copy_(out[0])
            self.conf.copy_(out[1])
        _broadcast_(self.assign)
        _broadcast_(self.conf)
        # every rank derives the labels from the same broadcast assign/conf with a deterministic rule, but the
        # contract is "rank 0's result everywhere", so the labels travel too (cheap next to the clustering)
        self._accept(rate)
        _broadcast_(self.labels)
        self.epoch_mined = self.epoch_mined + 1 if epoch is None else int(epoch)
        self.last_seconds = _sync_time(t0)
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


class NeighbourMiner:
    """SePP semantic positive pairs (METHODS.md §4.2–4.3): per image at most k other images with cosine >= t.

    State (on `device`, identical on every rank after mine/load): nbr_ids [N, k] int64 (-1 = empty slot),
    nbr_sims [N, k] float32 (-inf in empty slots), mined (bool), last_seconds (wall time of the last mine on
    this rank). Search options (backend, batch, ivf_nlist, nprobe, pca_dim, seed): see knn.semantic_pairs.
    The table is mined once before training from a frozen encoder, so save()/load() keep it next to the data.
    features: the space the cosines live in, recorded in the table ("centered": the search centres the
    features first, `knn.center_features`; "backbone" / "projector": as given; "": not recorded).
    """

    def __init__(self, num_samples: int, k: int, threshold: float, backend: str = "auto", batch: int = 16384,
                 ivf_nlist: int = 0, nprobe: int = 16, pca_dim: int = 0, seed: int = 0,
                 device: str | torch.device = "cpu", features: str = ""):
        if k < 1:
            raise ValueError("k must be >= 1")
        self.num_samples, self.k, self.threshold = int(num_samples), int(k), float(threshold)
        self.features = str(features)
        self.search_kw = dict(backend=backend, batch=batch, ivf_nlist=ivf_nlist, nprobe=nprobe, pca_dim=pca_dim,
                              seed=seed, center=self.features == "centered")
        self.nbr_ids = torch.full((self.num_samples, self.k), -1, dtype=torch.long, device=device)
        self.nbr_sims = torch.full((self.num_samples, self.k), -float("inf"), dtype=torch.float32, device=device)
        self.mined, self.last_seconds = False, 0.0

    def mine(self, emb: Tensor | None) -> tuple[Tensor, Tensor]:
        """Mine from emb [N, D] on rank 0 (None/ignored elsewhere) and broadcast. -> (nbr_ids, nbr_sims).
        Collective."""
        t0 = time.perf_counter()

        def work():
            if emb is None or tuple(emb.shape[:1]) != (self.num_samples,):
                raise ValueError(f"rank 0 needs embeddings of shape [{self.num_samples}, D], got "
                                 f"{None if emb is None else tuple(emb.shape)}")
            return semantic_pairs(emb, self.k, self.threshold, **self.search_kw)

        out = _run_on_rank0(work)
        if out is not None:
            self.nbr_ids.copy_(out[0])
            self.nbr_sims.copy_(out[1])
        _broadcast_(self.nbr_ids)
        _broadcast_(self.nbr_sims)
        self.mined = True
        self.last_seconds = _sync_time(t0)
        return self.nbr_ids, self.nbr_sims

    def to(self, device: str | torch.device) -> "NeighbourMiner":
        self.nbr_ids, self.nbr_sims = self.nbr_ids.to(device), self.nbr_sims.to(device)
        return self

    def save(self, path: str) -> None:
        """Write the table to an .npz (nbr_ids int64, nbr_sims float32, k, threshold, num_samples, features)."""
        np.savez(path, nbr_ids=self.nbr_ids.cpu().numpy(), nbr_sims=self.nbr_sims.cpu().numpy(),
                 k=self.k, threshold=self.threshold, num_samples=self.num_samples, features=self.features)

    def load(self, path: str) -> None:
        """Read a table written by save(); every rank reads the file itself (no communication)."""
        with np.load(path) as f:
            self.features = str(f["features"]) if "features" in f.files else ""
            self._set(int(f["num_samples"]), int(f["k"]), torch.from_numpy(f["nbr_ids"]),
                      torch.from_numpy(f["nbr_sims"]))

    def state_dict(self) -> dict:
        return {"num_samples": self.num_samples, "k": self.k, "threshold": self.threshold, "mined": self.mined,
                "nbr_ids": self.nbr_ids.cpu(), "nbr_sims": self.nbr_sims.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self._set(int(state["num_samples"]), int(state["k"]), state["nbr_ids"], state["nbr_sims"],
                  bool(state.get("mined", True)))

    def _set(self, n: int, k: int, ids: Tensor, sims: Tensor, mined: bool = True) -> None:
        if (n, k) != (self.num_samples, self.k) or tuple(ids.shape) != (n, k) or tuple(sims.shape) != (n, k):
            raise ValueError(f"neighbour table of N={n}, k={k} (ids {tuple(ids.shape)}) does not fit this miner "
                             f"(N={self.num_samples}, k={self.k})")
        self.nbr_ids.copy_(ids)
        self.nbr_sims.copy_(sims)
        self.mined = mined
