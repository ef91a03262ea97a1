"""What a method is: a candidate layout plus a target assignment (docs/DESIGN.md, rule 1).

A method object owns its state (queue, SampleTable, miner, schedules) and answers, for the step
(fastcl/step.py), a few questions: which view pairs act as (query, key) (`pairs`); what target distribution each
row gets over the candidates (`assign`); whether its loss adds a term to the pair's soft cross-entropy
(`student_extras` + `pair_loss`: SANE's mixup); what to do with the keys after the update (`after_step`); and
how to measure its label assignment against true labels (`diagnostics`, logging only).

A method never reads the global config: it gets its own section (`Config`, declared in its file) and a `Layout`
built once from the shared keys. `ContrastiveMethod` supplies defaults and knows no subclass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from fastcl.memory import FeatureQueue, SampleTable
from fastcl.objectives import Target, one_hot_target


@dataclass(frozen=True)
class Layout:
    """The candidate layout and run facts a method may rely on; built once by `build_method`."""

    inbatch: bool  # SimCLR layout: rows = 2B in-batch views, no teacher (else MoCo: [gathered keys ; queue])
    batch_negatives: bool  # queue layout: the other gathered batch keys are candidates too (SANE Eq. 4)
    queue_size: int  # 0 = no queue (always 0 in the in-batch layout)
    symmetric: bool  # both global views act as key in turn
    tau: float  # student temperature
    kernel: str  # target kernels: auto | torch | numba
    num_samples: int  # N: sizes the SampleTable, miners and per-sample label tables
    dim: int  # embedding dimension D
    seed: int  # trainer.seed: per-step random draws are functions of (seed, step)


@dataclass
class Services:
    """What the trainer lends a method outside the step (`prepare`, `on_epoch_start`). Only the services named in
    the method's `needs` are filled in; every other field is None, so a method can use nothing it did not declare."""

    device: torch.device
    # "embed_pass": [N, D] eval-transform features of every training image (the teacher if there is one, else the
    # student's encoder); a collective, sharded over every rank
    embed_pass: Callable[[], Tensor] | None = None
    # "key_partners": key_partners(nbr_ids [N, k], rho) makes the loader draw the key view from a partner image
    key_partners: Callable[[Tensor, float], None] | None = None
    # "dataset_labels": [N] TRUE class labels in id order. Only the oracle (a marked research upper bound) asks
    dataset_labels: Callable[[], Tensor] | None = None


@dataclass
class Sims:
    """Everything an assigner may look at for one (query view, key view) pair.

    student: [B, C] cosines q·cols (carries the gradient); None inside assign() of the queue layout
    teacher: [B, C] cosines k·cols (no grad) or None when the method does not ask for them
    pos:     [B] int64 column of each row's positive
    valid:   [B, C] bool candidate mask (False: empty queue slot, self pair, excluded batch key)
    row_ids: [B] int64 global sample ids of the rows;  col_ids: [C] int64 ids of the columns (-1 empty)
    """

    student: Tensor | None
    teacher: Tensor | None
    pos: Tensor
    valid: Tensor
    row_ids: Tensor
    col_ids: Tensor


@dataclass
class Pair:
    """One (query view, key view) term of the step, after its soft cross-entropy (input of `pair_loss`)."""

    index: int  # position in method.pairs(n_views)
    n_views: int  # views in the batch
    qv: int
    kv: int
    sims: Sims
    cols: Tensor  # [C, D] candidate embeddings: [gathered keys of kv ; queue] (no grad)
    target: Target
    loss: Tensor  # [] soft CE of the student logits against target


class ContrastiveMethod(nn.Module):
    """Defaults: MoCo-style layout [gathered batch keys ; queue], one-hot target, keys pushed to the queue."""

    section, Config = "", None  # the method's own config section (method.<section>) and its dataclass
    needs_teacher_sims = False  # assign() reads Sims.teacher
    inbatch_only = False  # SimCLR: always the in-batch layout
    follows_base = False  # label-assignment add-ons (IFND, SePP, oracle): layout of `method.base`
    needs: frozenset[str] = frozenset()  # the Services fields this method uses

    def __init__(self, c, layout: Layout):
        super().__init__()
        self.c = c  # this method's config section (None for the baselines)
        self.layout = layout
        self.inbatch = layout.inbatch
        self.tau = layout.tau
        self.queue = FeatureQueue(layout.queue_size, layout.dim) if layout.queue_size > 0 and not layout.inbatch \
            else None
        self.table: SampleTable | None = None  # created by methods that need it (IFND)

    # -- schedules ---------------------------------------------------------------------------------
    def schedules(self, total_steps: int, steps_per_epoch: int) -> dict:
        """Extra per-step arrays this method needs (SANE's mu); merged into the trainer's."""
        return {}

    # -- layout -------------------------------------------------------------------------------------
    def pairs(self, n_views: int) -> list[tuple[int, int]]:
        """(query view, key view) pairs whose losses are averaged (queue layout).

        Views 0 and 1 are the global crops, views >= 2 local crops (multi-crop), which are queries only.
        Asymmetric (default): view 0 is the key/target (SCE's weak view), every other view a query.
        Symmetric: each global crop is the key of every other crop (SCE sym: 2 crops -> 2 terms,
        2 + 4 local crops -> 10 terms). Each view is still ENCODED once per step (fastcl/step.py).
        """
        keys = (0, 1) if self.layout.symmetric else (0,)
        return [(qv, kv) for kv in keys for qv in range(n_views) if qv != kv]

    # -- targets ------------------------------------------------------------------------------------
    def assign(self, sims: Sims, sc: dict) -> Target:
        """Target over the candidates. Queue layout: called once per KEY view and shared by every pair with
        that key, so it must not read `sims.student` (no method's target does)."""
        return one_hot_target(sims.pos, sims.valid.shape[1], sims.valid)

    def student_extras(self, views: tuple[Tensor, ...], step: int) -> list[list[Tensor]]:
        """Extra input groups for the student's one call (SANE's mixed images); each group is one forward."""
        return []

    def pair_loss(self, pair: Pair, extras: list[Tensor], sc: dict, step: int) -> Tensor:
        """The pair's loss. extras: the L2-normalised embeddings [B, D] of `student_extras`, in order."""
        return pair.loss

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

    def prepare(self, svc: Services) -> None:
        """Called once after setup (fresh or resumed run): attach data-side state (SePP's partner table,
        the oracle's labels) and move plain-object state to the training device."""
        if self.miner is not None:
            self.miner.to(svc.device)

    def on_epoch_start(self, epoch: int, svc: Services) -> dict:
        """Epoch-level work (IFND re-clustering). Returns metrics to log."""
        return {}

    # -- diagnostics (READ TRUE LABELS; logging only, never fed back) -------------------------------
    @torch.no_grad()
    def diagnostics(self, sims: Sims, target: Target, labels: Tensor) -> dict:
        """False-negative diagnostics of one pair against the true labels [N] (-1 unknown)."""
        from fastcl.eval.diagnostics import fn_diagnostics

        return fn_diagnostics(sims, target, labels)
