"""What a method is: a candidate layout plus a target assignment (DESIGN.md rule 1).

A method object owns its state (queue, SampleTable, miner, schedules) and answers four questions for the
step: which view pairs act as (query, key); which columns are candidates; what target distribution each row
gets over them (`assign`); what to do with the keys after the loss (`after_step`). Methods compose these
parts; `ContrastiveMethod` only supplies defaults (one level, no deep hierarchy).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastcl.memory import FeatureQueue, SampleTable
from fastcl.objectives import Target, one_hot_target


@dataclass
class Sims:
    """Everything an assigner may look at for one (query view, key view) pair.

    student: [B, C] cosines q·cols (carries the gradient)
    teacher: [B, C] cosines k·cols (no grad) or None when the method does not ask for them
    pos:     [B] int64 column of each row's positive
    valid:   [B, C] bool candidate mask (False: empty queue slot, self pair, excluded batch key)
    row_ids: [B] int64 global sample ids of the rows;  col_ids: [C] int64 ids of the columns (-1 empty)
    """

    student: Tensor
    teacher: Tensor | None
    pos: Tensor
    valid: Tensor
    row_ids: Tensor
    col_ids: Tensor


class ContrastiveMethod(nn.Module):
    """Defaults shared by all methods: MoCo-style layout [gathered batch keys ; queue], one-hot target."""

    section, Config = "", None  # the method's own config section (method.<section>) and its dataclass
    inbatch = False  # True: SimCLR layout (2B in-batch views, no EMA teacher)
    needs_teacher_sims = False  # assign() reads Sims.teacher

    def __init__(self, cfg, num_samples: int, dim: int):
        super().__init__()
        if cfg.method.name in ("ifnd", "sepp", "oracle"):  # label-assignment add-ons on either baseline
            self.inbatch = cfg.method.base == "simclr"
        self.cfg = cfg
        self.num_samples = num_samples
        m = cfg.method
        self.tau = m.tau
        self.queue = FeatureQueue(m.queue_size, dim) if (m.queue_size > 0 and not self.inbatch) else None
        self.table: SampleTable | None = None  # created by methods that need it (IFND)

    # -- schedules ---------------------------------------------------------------------------------
    def schedules(self, total_steps: int, steps_per_epoch: int) -> dict:
        """Extra per-step arrays this method needs (SANE's mu, IFND's acceptance); merged into the trainer's."""
        return {}

    # -- layout -------------------------------------------------------------------------------------
    def pairs(self, n_views: int) -> list[tuple[int, int]]:
        """(query view, key view) pairs whose losses are averaged.

        Views 0 and 1 are the global crops, views >= 2 local crops (multi-crop), which are queries only.
        Asymmetric (default): view 0 is the key/target (SCE's weak view), every other view a query.
        Symmetric: each global crop is the key of every other crop (SCE sym: 2 crops -> 2 terms,
        2 + 4 local crops -> 10 terms).
        """
        keys = (0, 1) if self.cfg.method.symmetric else (0,)
        return [(qv, kv) for kv in keys for qv in range(n_views) if qv != kv]

    # -- targets ------------------------------------------------------------------------------------
    def assign(self, sims: Sims, sc: dict) -> Target:
        return one_hot_target(sims.pos, sims.student.shape[1], sims.valid)

    def extra_loss(self, ctx: dict) -> Tensor | None:
        """An additional loss term computed from the step context (SANE's momentum mixup)."""
        return None

    # -- state updates ------------------------------------------------------------------------------
    @torch.no_grad()
    def after_step(self, keys: Tensor, ids: Tensor) -> None:
        """keys [n,D] gathered from all ranks (all key views of the step) with their ids [n]."""
        if self.queue is not None:
            self.queue.push(keys, ids)
        if self.table is not None:
            self.table.update(ids, keys)

    # Miners are plain objects (not nn.Modules): their state rides in the module's extra state so that
    # accelerate's register_for_checkpointing(method) saves and restores it with the queue and table.
    miner = None

    def get_extra_state(self):
        return {"miner": self.miner.state_dict()} if self.miner is not None else {}

    def set_extra_state(self, state) -> None:
        if self.miner is not None and state.get("miner") is not None:
            self.miner.load_state_dict(state["miner"])

    def prepare(self, parts, loader) -> None:
        """Called once after setup (fresh or resumed run): attach data-side state (SePP's partner table,
        the oracle's labels) and move plain-object state to the training device."""
        if self.miner is not None:
            self.miner.to(parts.accelerator.device)

    def on_epoch_start(self, epoch: int, parts, loader) -> dict:
        """Epoch-level work (IFND re-clustering). `parts`: the trainer's StepParts; `loader`: the training
        Loader. Returns metrics to log."""
        return {}
