"""2-process worker (torchrun): run the real setup + train_step loop, record gathered ids, losses and queue.

usage: torchrun --standalone --nproc_per_node N tests/_dist_train_worker.py CONFIG OUT_DIR [key=value ...]
"""
import sys

import torch

from fastcl import dist
from fastcl.config import load_config
from fastcl.optim import set_lr_wd
from fastcl.step import train_step
from fastcl.train import make_accelerator, setup

cfg = load_config(sys.argv[1], sys.argv[3:])
out = sys.argv[2]
acc = make_accelerator(cfg)
parts, loader, sched, state, _, _ = setup(cfg, acc)
calls = {"student": 0, "teacher": 0}  # module calls (the DDP wrapper itself on 2 processes)
parts.student.register_forward_hook(lambda *a: calls.__setitem__("student", calls["student"] + 1))
if parts.teacher is not None:
    parts.teacher.register_forward_hook(lambda *a: calls.__setitem__("teacher", calls["teacher"] + 1))
ids, losses = {}, []
for epoch in range(cfg.trainer.epochs):
    loader.set_epoch(epoch)
    ids[epoch] = []
    for batch in loader:
        ids[epoch] += dist.gather(batch.index).tolist()
        sc = {k: v[state.step] for k, v in sched.items()}
        set_lr_wd(parts.optimizer, float(sc["lr"]), float(sc["wd"]))
        logs = train_step(parts, batch, sc, state.step)
        state.step += 1
        losses.append(float(dist.all_reduce_mean(logs["loss"])))
q = parts.method.queue
torch.save({"ids": ids, "losses": losses, "world": dist.world_size(), "calls": calls, "steps": state.step,
            "queue_keys": None if q is None else q.keys.cpu(), "queue_ids": None if q is None else q.ids.cpu()},
           f"{out}/rank{dist.rank()}.pt")
dist.shutdown()
dist.exit_now(0)  # no C++ teardown: see fastcl.dist.exit_now
