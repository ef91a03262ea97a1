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

from dataclasses import dataclass, field

import torch
from torch import Tensor

import numpy as np

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
        from fastcl.mining.miner import ClusterMiner  # faiss / k-means: loaded when an IFND run is built

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
