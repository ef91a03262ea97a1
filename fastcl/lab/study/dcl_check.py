"""How often DCL's negative estimate hits its lower bound at a MoCo-v2 checkpoint (a rung of the ladder).

DCL (fastcl/methods/dcl.py) estimates the true negatives' term as (sum_neg exp - tau+ * M * exp(pos)) / (1 - tau+)
and bounds it below by M exp(-1/tau). On a queue (M = 4,096) at MoCo's low temperature the positive's term
tau+ * M * exp(s_pos / tau) can outweigh the negatives' whole sum; the estimate is then clamped, the row's
negatives get no gradient and only its positive is pulled, which lets the encoder collapse. This measures, on
training batches of the checkpoint's own run, the share of rows clamped at each temperature, and the mean of
tau+ * M * exp(s_pos / tau) / sum_neg exp (above 1: clamped).

Approximations (it is a diagnostic, not the training step): both encoders in eval mode (BatchNorm running
statistics, no key shuffle), the student's first view against the teacher's second view and the checkpoint's
queue, no update of anything.

    python -m fastcl.lab.study.dcl_check --checkpoint RUN_OR_CHECKPOINT [--tau 0.1 0.5] [--tau-plus 0.1]
        [--batches 4] [--out result.json]
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F


@torch.no_grad()
def clamp_share(checkpoint: str, taus: list[float], tau_plus: float = 0.1, batches: int = 4) -> dict:
    """{"rows": n, "queue": M, "tau": {str(tau): {"clamped": share of rows, "pos_over_neg": mean ratio}}}."""
    from fastcl.checkpoint import open_run
    from fastcl.methods.dcl import negative_estimate
    from fastcl.pipelines import build_loader

    run = open_run(checkpoint)
    state = torch.load(run.file("method"), map_location="cpu", weights_only=True)
    if "queue.keys" not in state:
        raise ValueError(f"{run.path}: its method state holds no queue (method {run.meta.get('method')!r}); "
                         f"the check needs a MoCo-v2-layout checkpoint")
    student, teacher = run.encoder("student"), run.encoder("teacher")
    keys, ids = state["queue.keys"].float(), state["queue.ids"]
    loader = build_loader(run.cfg, 0, 1, "cpu")
    loader.set_epoch(0)
    sums = {t: [0, 0.0] for t in taus}
    rows = 0
    for i, batch in enumerate(loader):
        if i == batches:
            break
        q = F.normalize(student(batch.views[0]).float(), dim=1)
        k = F.normalize(teacher(batch.views[1]).float(), dim=1)
        sims = torch.cat([(q * k).sum(1, keepdim=True), q @ keys.T], dim=1)  # [B, 1 + K]: own key, then queue
        pos = torch.zeros(len(q), dtype=torch.long)
        valid = torch.cat([torch.ones(len(q), 1, dtype=torch.bool), (ids >= 0)[None].expand(len(q), -1)], dim=1)
        for t in taus:
            pos_logit, ng, bound = negative_estimate(sims, pos, valid, t, tau_plus)
            m = valid[:, 1:].sum(1).float()
            neg_sum = ng * (1 - tau_plus) + tau_plus * m * pos_logit.exp()
            sums[t][0] += int((ng < bound).sum())
            sums[t][1] += float((tau_plus * m * pos_logit.exp() / neg_sum).sum())
        rows += len(q)
    if rows == 0:
        raise ValueError(f"{run.path}: the run's loader gave no batch")
    return {"checkpoint": run.path, "rows": rows, "queue": int((ids >= 0).sum()), "tau_plus": tau_plus,
            "tau": {str(t): {"clamped": c / rows, "pos_over_neg": r / rows} for t, (c, r) in sums.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastcl.lab.study.dcl_check", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="a MoCo-v2 run directory or checkpoint directory")
    p.add_argument("--tau", type=float, nargs="+", default=[0.1, 0.5],
                   help="temperatures (0.1: the ladder's MoCo recipe; 0.5: DCL's official SimCLR setting)")
    p.add_argument("--tau-plus", type=float, default=0.1, help="DCL's class prior (official default 0.1)")
    p.add_argument("--batches", type=int, default=4, help="training batches to measure (default 4)")
    p.add_argument("--out", default="", help="also write the result to this JSON file")
    a = p.parse_args(argv)
    try:
        res = clamp_share(a.checkpoint, a.tau, a.tau_plus, a.batches)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
