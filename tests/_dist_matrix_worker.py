"""Matrix worker: several REAL `fastcl.train.train` runs (one config each) in one process group, recording what
tests/test_matrix.py checks. One launch serves a whole group of (method, backend) runs, so the process start
(torch, accelerate, gloo) is paid once per group, not once per run.

usage: torchrun --standalone --nproc_per_node N tests/_dist_matrix_worker.py SPEC.json OUT_DIR
SPEC.json: [{"name": str, "config": path, "overrides": [key=value, ...]}, ...]
writes OUT_DIR/<name>.rank<r>.pt per run and rank (see `record_run`).

tests/test_matrix.py also imports `record_run` to make its 1-process references in-process, so both sides
record the same things the same way.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys

import torch


def _method_state(method) -> dict:
    """Everything a method keeps that must agree across ranks (CPU copies)."""
    out = {}
    q = getattr(method, "queue", None)
    if q is not None:
        out["queue_keys"], out["queue_ids"] = q.keys.detach().cpu().clone(), q.ids.detach().cpu().clone()
    t = getattr(method, "table", None)
    if t is not None:
        out["table_feats"], out["table_seen"] = t.feats.detach().cpu().clone(), t.seen.detach().cpu().clone()
    miner = getattr(method, "miner", None)
    if miner is not None:
        out["miner"] = {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v)
                        for k, v in miner.state_dict().items()}
    labels = getattr(method, "labels", None)  # the oracle's label table (a buffer)
    if torch.is_tensor(labels):
        out["oracle_labels"] = labels.detach().cpu().clone()
    return out


@contextlib.contextmanager
def _recording(rec: dict):
    """Wrap fastcl.train.train_step: per step the GLOBAL batch ids (gathered in rank order), the loss averaged
    over ranks, and the method's label tables (IFND pseudo labels / oracle labels) as the step saw them."""
    import fastcl.train as T
    from fastcl import dist

    orig = T.train_step

    def step(parts, batch, sc, step_no):
        rec["parts"], rec["world"], rec["rank"] = parts, dist.world_size(), dist.rank()
        ids = dist.gather(batch.index).cpu()
        miner = getattr(parts.method, "miner", None)
        labels = getattr(miner, "labels", None) if miner is not None else getattr(parts.method, "labels", None)
        labels = labels.detach().cpu().clone() if torch.is_tensor(labels) else None
        logs = orig(parts, batch, sc, step_no)
        rec["steps"].append({"step": step_no, "ids": ids.tolist(), "labels": labels,
                             "loss": float(dist.all_reduce_mean(logs["loss"]))})  # host sync: test only
        return logs

    T.train_step = step
    try:
        yield
    finally:
        T.train_step = orig


def record_run(config: str, overrides: list[str]) -> dict:
    """Run fastcl.train.train(load_config(config, overrides)) and return
    {"world", "rank", "steps": [{step, ids, loss, labels}], "state": method state, "params": student weights}."""
    from fastcl.config import load_config
    from fastcl.train import train

    rec = {"steps": []}
    with _recording(rec):
        result = train(load_config(config, overrides))
    parts = rec.pop("parts")
    student = parts.accelerator.unwrap_model(parts.student)
    return {"world": rec["world"], "rank": rec["rank"], "result": result, "steps": rec["steps"],
            "state": _method_state(parts.method),
            "params": {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}}


def main() -> None:
    from accelerate.state import PartialState

    from fastcl import dist

    with open(sys.argv[1]) as f:
        spec = json.load(f)
    out = sys.argv[2]
    # accelerator.end_training() destroys the process group; the next run's Accelerator would find accelerate's
    # shared state still "initialised" and never make a new one. Keep ONE group for all runs of the launch
    # (re-initialising under torchrun's agent store can also hang), torn down at the end.
    PartialState.destroy_process_group = lambda self, group=None: None
    for run in spec:
        rec = record_run(run["config"], run["overrides"])
        torch.save(rec, os.path.join(out, f"{run['name']}.rank{rec['rank']}.pt"))
    dist.shutdown()  # barrier + destroy: no rank exits while its peer still talks to it
    dist.exit_now(0)  # no C++ teardown: see fastcl.dist.exit_now


if __name__ == "__main__":
    main()
