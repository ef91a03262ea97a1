"""NeighbourMiner: SePP's semantic positive pairs, the table of partners the trainer holds.

(IFND's ClusterMiner follows the same contract and lives in methods/ifnd.py.)
DESIGN.md "State contract": a miner computes on rank 0 only (faiss GPU, faiss CPU or torch: fastcl/mining/engine.py)
and broadcasts its tables to every rank; the other ranks pass features=None (anything they pass is ignored, so
they need not hold the full feature table). Every rank must call refresh/mine together: they are collectives.
If rank 0 fails, the error is broadcast first so the other ranks raise too instead of hanging in a broadcast.
Miners have state_dict/load_state_dict made of plain tensors and numbers (loadable with
torch.load(weights_only=True)), so accelerator.register_for_checkpointing can save them.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from torch import Tensor

from fastcl.dist import broadcast_state_, run_on_rank0, synced_seconds
from fastcl.mining.knn import semantic_pairs


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

        out = run_on_rank0(work)
        if out is not None:
            self.nbr_ids.copy_(out[0])
            self.nbr_sims.copy_(out[1])
        broadcast_state_(self.nbr_ids)
        broadcast_state_(self.nbr_sims)
        self.mined = True
        self.last_seconds = synced_seconds(t0)
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
