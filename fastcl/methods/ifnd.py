"""IFND: Incremental False Negative Detection (METHODS.md §3).

Every `ifnd.refresh_every` epochs rank 0 runs spherical faiss k-means at each cluster count in `ifnd.levels`
over the SampleTable of EMA keys (`source=table`, no extra pass) or over a fresh embedding pass of the training
images with the eval transform (`source=pass`, sharded over all ranks), and broadcasts the result. Each epoch only the most confident
fraction a(e) of each cluster keeps its pseudo-label (acceptance grows linearly after a warm-up: our choice,
the paper's schedule was not retrievable). A candidate sharing an accepted label with the anchor at ANY level
is a detected false negative: eliminated from the denominator (`mode=elim`, the paper's main results) or
attracted as an extra positive (`mode=attr`). The positive is never masked. Works on either baseline
(`method.base=mocov2`: queue candidates looked up by their stored ids; `simclr`: in-batch views).
"""
from __future__ import annotations

import torch

from fastcl import dist
from fastcl.memory import SampleTable
from fastcl.methods.base import ContrastiveMethod, Sims
from fastcl.methods.label_masks import label_target
from fastcl.mining.miner import ClusterMiner
from fastcl.mining.pseudo import acceptance_schedule
from fastcl.objectives import Target


class IFND(ContrastiveMethod):
    def __init__(self, cfg, num_samples: int, dim: int):
        super().__init__(cfg, num_samples, dim)
        c = cfg.method.ifnd
        if c.source == "pass" and cfg.data.backend not in ("torch", "gpu_tensor", "dali", "synthetic", "ffcv"):
            raise ValueError(f"method.ifnd.source=pass re-reads the training images as a folder; data.backend="
                             f"{cfg.data.backend!r} has none: use method.ifnd.source=table")
        if max(c.levels) > num_samples:  # bad-input fix (test_bad_input): fail at setup, not at the first refresh
            raise ValueError(f"method.ifnd.levels={list(c.levels)}: a cluster count exceeds the dataset "
                             f"({num_samples} samples)")
        self.table = SampleTable(num_samples, dim) if c.source == "table" else None
        self.miner = ClusterMiner(num_samples, list(c.levels), niter=c.niter, nredo=c.nredo, seed=c.seed,
                                  confidence=c.confidence, per_cluster=c.per_cluster, init=c.init,
                                  every=c.refresh_every)
        self.rates = acceptance_schedule(cfg.trainer.epochs, c.warmup_epochs, c.accept_start, c.accept_end)

    @torch.no_grad()
    def _features(self, parts, loader) -> torch.Tensor:
        """[N, D] features to cluster (rank 0). Table rows never filled yet get a fixed random direction
        (they are clustered but their labels are dropped below)."""
        if self.table is not None:
            f = self.table.feats.float()
            unseen = ~self.table.seen
            g = torch.Generator().manual_seed(self.cfg.method.ifnd.seed)
            f[unseen] = torch.randn(int(unseen.sum()), f.shape[1], generator=g).to(f.device)
            return f
        from fastcl.eval.features import embed_dataset  # the eval-transform pass (teacher if there is one)
        net = parts.teacher if parts.teacher is not None else parts.accelerator.unwrap_model(parts.student).encoder
        return embed_dataset(net, self.cfg, loader)

    def on_epoch_start(self, epoch: int, parts, loader) -> dict:
        rate = float(self.rates[epoch])
        if rate <= 0 or (self.table is not None and not bool(self.table.seen.any())):
            self.miner.labels.fill_(-1)  # warm-up: plain instance discrimination
            return {"ifnd_rate": 0.0}
        if self.miner.due(epoch):
            # source=pass: embed_dataset is sharded over all ranks (a collective); the table is rank 0's alone
            feats = self._features(parts, loader) if dist.rank() == 0 or self.table is None else None
            self.miner.refresh(feats, rate, epoch)
        else:
            self.miner.relabel(rate)
        if self.table is not None:
            self.miner.labels[:, ~self.table.seen] = -1  # never-seen samples carry no usable feature
        accepted = float((self.miner.labels >= 0).float().mean())  # host sync (epoch level)
        return {"ifnd_rate": rate, "ifnd_accepted": accepted, "ifnd_mine_s": self.miner.last_seconds}

    def assign(self, sims: Sims, sc: dict) -> Target:
        return label_target(sims, self.miner.labels, self.cfg.method.ifnd.mode, self.cfg.method.kernel)
