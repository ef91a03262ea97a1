"""SePP: Semantic Positive Pairs (METHODS.md §4), on the MoCo-v2 (or SimCLR) base.

Before training, `python -m fastcl.mining.sepp` embeds the un-augmented training images with a frozen
pretrained fastcl checkpoint and stores, per image, at most k neighbours with cosine >= threshold (never
itself). Training then uses them:
  pair mode  (default [U]): the key view of sample i comes from a random partner of i with probability rho
             (data side, see pipelines/pairs.py); the loss is the base loss, unchanged.
  multi mode [U]: the usual pair, plus every partner present among the candidates (batch keys / queue,
             matched by sample id) as an extra positive; target uniform over the positives.
  mask_partners [U]: known partners never act as negatives (pair mode).
rho = 0 or an empty table gives exactly the base method.
"""
from __future__ import annotations

from dataclasses import dataclass

import os

import numpy as np
import torch
from torch import Tensor

from fastcl.methods.base import ContrastiveMethod, Layout, Services, Sims
from fastcl.objectives import Target, one_hot_target
from fastcl.objectives.targets import multi_positive_target


@dataclass
class SePPConfig:
    """method.sepp"""
    table_path: str = ""  # neighbour table written by `python -m fastcl.mining.sepp`
    k: int = 5  # neighbours kept per image (at most)
    # Minimum cosine [U], in the table's feature space. Default space `centered` (backbone features minus their
    # mean): an unrelated pair is ~0 there, so 0.5 keeps only pairs much closer than average; on the raw post-ReLU
    # features every cosine is >= 0 and 0.5 filtered little. Or calibrate it on a labelled subset:
    # `python -m fastcl.mining.sepp --target-precision P` (docs/METHODS.md, SePP).
    threshold: float = 0.5
    features: str = "centered"  # centered | backbone | projector: must match the table's (mining --features)
    rho: float = 0.5  # pair mode: probability that the key view comes from a semantic partner [U]
    mode: str = "pair"  # pair | multi
    mask_partners: bool = True  # known partners never act as negatives [U]

    @staticmethod
    def checks(c) -> list[tuple[str, bool, str]]:
        return [("mode", c.mode in ("pair", "multi"), f"{c.mode!r} not in pair|multi"),
                ("rho", 0 <= c.rho <= 1, f"must lie in [0, 1], got {c.rho}"),
                ("features", c.features in ("centered", "backbone", "projector"),
                 f"{c.features!r} not in centered|backbone|projector"),
                ("threshold", -1 <= c.threshold <= 1, f"a cosine in [-1, 1], got {c.threshold}")]


def partner_mask(partners: Tensor, col_ids: Tensor) -> Tensor:
    """partners [B, k] (-1 padded), col_ids [C] -> [B, C] bool: column j holds a partner of row i."""
    out = torch.zeros(partners.shape[0], col_ids.shape[0], dtype=torch.bool, device=col_ids.device)
    for t in range(partners.shape[1]):  # k passes of [B, C] instead of one [B, C, k] tensor
        p = partners[:, t:t + 1]
        out |= (col_ids[None, :] == p) & (p >= 0)
    return out


class SePP(ContrastiveMethod):
    section, Config = "sepp", SePPConfig
    follows_base = True
    needs = frozenset({"key_partners"})  # mode=pair: the loader draws key views from partner images

    def __init__(self, c: SePPConfig, layout: Layout):
        super().__init__(c, layout)
        num_samples = layout.num_samples
        if not c.table_path or not os.path.isfile(c.table_path):
            raise FileNotFoundError(f"method.sepp.table_path={c.table_path!r}: no neighbour table; mine one with "
                                    f"`python -m fastcl.mining.sepp --checkpoint RUN --data TRAIN_DATA --out T.npz`")
        with np.load(c.table_path) as f:  # the table may hold more partners than the config keeps (k cap below)
            mined_k = int(f["k"])
        from fastcl.mining.miner import NeighbourMiner  # faiss / kNN: loaded when a SePP run is built

        self.miner = NeighbourMiner(num_samples, mined_k, c.threshold)
        try:  # bad-input fix (tests/test_bad_input.py): name the key and the file when the table does not fit
            self.miner.load(c.table_path)
        except (ValueError, KeyError) as e:
            raise ValueError(f"method.sepp.table_path={c.table_path}: {e} (the dataset has {num_samples} samples; "
                             f"mine the table over the same images)") from None
        if self.miner.features and self.miner.features != c.features:  # a threshold means nothing in another space
            raise ValueError(f"method.sepp.table_path={c.table_path} was mined on {self.miner.features!r} features "
                             f"but method.sepp.features={c.features!r} (method.sepp.threshold={c.threshold} is a "
                             f"cosine in that space): re-mine with --features {c.features} or set "
                             f"method.sepp.features={self.miner.features}")
        if self.miner.nbr_ids.shape[0] != num_samples:
            raise ValueError(f"method.sepp.table_path={c.table_path}: table has {self.miner.nbr_ids.shape[0]} rows "
                             f"but the dataset has {num_samples} samples")
        keep = (self.miner.nbr_ids >= 0) & (self.miner.nbr_sims >= c.threshold)
        keep[:, c.k:] = False  # the config may ask for fewer / stricter partners than were mined
        self.miner.nbr_ids = torch.where(keep, self.miner.nbr_ids, torch.full_like(self.miner.nbr_ids, -1))

    def prepare(self, svc: Services) -> None:
        super().prepare(svc)
        if self.c.mode != "pair":
            return
        if svc.key_partners is None:
            raise ValueError("method.sepp.mode=pair needs a backend that can draw the key view from a partner "
                             "image (torch, gpu_tensor, synthetic); this data.backend cannot: use method.sepp.mode=multi")
        svc.key_partners(self.miner.nbr_ids, self.c.rho)

    def assign(self, sims: Sims, sc: dict) -> Target:
        c = self.c
        partners = self.miner.nbr_ids[sims.row_ids]  # [B, k]
        is_partner = partner_mask(partners, sims.col_ids) & sims.valid
        b = sims.pos.shape[0]
        if c.mode == "multi":
            pos_mask = is_partner.clone()
            pos_mask[torch.arange(b, device=pos_mask.device), sims.pos] = True
            return Target(multi_positive_target(pos_mask, sims.valid), sims.valid)
        valid = sims.valid
        if c.mask_partners:
            valid = valid & ~is_partner
            valid[torch.arange(b, device=valid.device), sims.pos] = True
        return one_hot_target(sims.pos, sims.valid.shape[1], valid)

    @torch.no_grad()
    def diagnostics(self, sims: Sims, target: Target, labels: Tensor) -> dict:
        from fastcl.eval.diagnostics import fn_diagnostics
        from fastcl.mining.knn import pair_precision

        out = fn_diagnostics(sims, target, labels)
        out["partner_precision"] = pair_precision(self.miner.nbr_ids.cpu(), labels.cpu())
        return out
