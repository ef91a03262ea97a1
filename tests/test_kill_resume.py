"""Hard kills, for every method: SIGKILL a training process in the middle of a checkpoint write (a real kill
inside the write, tests/_kill_worker.py) and once more during training after a checkpoint, resume each time with
`--resume auto`, and require the trajectory of an uninterrupted run: losses to 1e-6, the same queue, sample
table, miner state (IFND's clustering and acceptance schedule), teacher and optimizer state."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastcl.checkpoint import object_path
from fastcl.config import load_config
from fastcl.methods import METHODS as REGISTRY
from fastcl.train import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs/test/tiny.yaml")
# 64 samples (the SePP table's dataset), 8 epochs of 4 steps, a checkpoint every 3 steps and at each epoch end.
# lr 0.002: a stable trajectory (the tiny net at lr 0.05 amplifies rounding noise between processes)
BASE = ["trainer.epochs=8", "trainer.ckpt_every=3", "trainer.log_every=1", "optim.lr=0.002"]
STEPS = 32
# every registered method; the ones listed need settings to exercise their state at this size, any other runs
# with its own defaults (a new method is covered without editing this file)
_SETTINGS = {
    "mocov2": [],
    "simclr": ["method.name=simclr", "method.queue_size=0"],
    "ifnd": ["method.name=ifnd", "method.ifnd.levels=[4,8]", "method.ifnd.warmup_epochs=2"],
    "sepp": ["method.name=sepp", "method.sepp.table_path={table}"],
    "sane": ["method.name=sane", "method.batch_negatives=true"],
}
METHODS = {name: _SETTINGS.get(name, [f"method.name={name}"]) for name in ["mocov2", *REGISTRY]}


def _losses(run):
    return {r["step"]: r["loss"] for r in map(json.loads, open(os.path.join(run, "metrics.jsonl"))) if "loss" in r}


def _start(run, over, env, kill_in_write=0):
    cmd = [os.path.join(REPO, "tests/_kill_worker.py"), str(kill_in_write)] if kill_in_write else \
        [os.path.join(REPO, "fastcl/train.py")]
    return subprocess.Popen([sys.executable, *cmd, "--config", TINY, f"trainer.run_dir={run}", "--resume", "auto",
                             *BASE, *over], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def _ckpt_dir(run):
    return os.path.join(run, "checkpoints")


def _ckpts(run, prefix="step_"):
    d = _ckpt_dir(run)
    return sorted(n for n in os.listdir(d) if n.startswith(prefix)) if os.path.isdir(d) else []


def _state(run, step):
    return torch.load(object_path(os.path.join(_ckpt_dir(run), f"step_{step:08d}"), "method"), weights_only=True)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_sigkill_in_checkpoint_write_and_in_training_then_resume(tmp_path, method, sepp_table):
    over = [o.format(table=sepp_table[0]) for o in METHODS[method]]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    run = str(tmp_path / "killed")

    # 1. killed inside the write of its 2nd checkpoint (step 3 is complete; step 4, the end of epoch 0, torn)
    p = _start(run, over, env, kill_in_write=2)
    _, err = p.communicate(timeout=300)
    assert p.returncode == -signal.SIGKILL, err[-3000:]
    assert _ckpts(run) == ["step_00000003"] and _ckpts(run, ".tmp-") == [".tmp-step_00000004"]
    torn = os.path.join(_ckpt_dir(run), ".tmp-step_00000004")
    assert os.path.isfile(os.path.join(torn, "model.safetensors"))  # the kill came after the weights, mid-state

    # 2. resumed from step 3 (the torn write ignored), SIGKILLed while training once a newer checkpoint exists
    p = _start(run, over, env)
    deadline = time.time() + 240
    while len(_ckpts(run)) < 2 and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    p.send_signal(signal.SIGKILL)
    _, err = p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {err[-3000:]}"
    assert not os.path.exists(torn)  # the next checkpoint write swept the torn directory

    # 3. resumed to the end
    p = _start(run, over, env)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]

    full = str(tmp_path / "full")
    train(load_config(TINY, BASE + over + [f"trainer.run_dir={full}"]))
    a, b = _losses(full), _losses(run)
    assert sorted(b) == sorted(a) == list(range(1, STEPS + 1))
    assert max(abs(a[s] - b[s]) for s in a) < 1e-6, {s: (a[s], b[s]) for s in a if abs(a[s] - b[s]) >= 1e-6}
    sa, sb = _state(full, STEPS), _state(run, STEPS)
    assert sorted(sa) == sorted(sb)
    for k in sa:  # queue keys/ids, sample table, EMA teacher, optimizer momentum ...
        if torch.is_tensor(sa[k]):
            assert sa[k].shape == sb[k].shape and torch.allclose(sa[k].float(), sb[k].float(), atol=1e-6), k
    if method == "ifnd":  # clustering state and acceptance schedule travel with the checkpoint
        ma, mb = sa["_extra_state"]["miner"], sb["_extra_state"]["miner"]
        assert torch.equal(ma["labels"], mb["labels"]) and torch.equal(ma["assign"], mb["assign"])
        assert (ma["labels"] >= 0).any() and ma["rate"] == mb["rate"] == 1.0
