"""Hard kills: SIGKILL a training process (after a checkpoint, and leaving a half-written checkpoint behind),
resume with --resume auto, and require the trajectory of an uninterrupted run (losses to 1e-6, same queue and
IFND miner state)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastcl.config import load_config
from fastcl.train import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs/test/tiny.yaml")
# lr 0.002: a stable trajectory (the tiny net at lr 0.05 amplifies rounding noise between processes)
BASE = ["data.num_samples=128", "trainer.epochs=4", "trainer.ckpt_every=3", "trainer.log_every=1", "optim.lr=0.002"]
METHODS = {"mocov2": [], "ifnd": ["method.name=ifnd", "method.ifnd.levels=[4,8]", "method.ifnd.warmup_epochs=1"]}


def _losses(run):
    return {r["step"]: r["loss"] for r in map(json.loads, open(os.path.join(run, "metrics.jsonl"))) if "loss" in r}


def _start(run, over, env):
    return subprocess.Popen([sys.executable, os.path.join(REPO, "fastcl/train.py"), "--config", TINY,
                             f"trainer.run_dir={run}", "--resume", "auto"] + BASE + over,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def _ckpts(run):
    d = os.path.join(run, "checkpoints")
    return sorted(n for n in os.listdir(d) if n.startswith("step_")) if os.path.isdir(d) else []


@pytest.mark.parametrize("method", sorted(METHODS))
def test_sigkill_and_torn_checkpoint_then_resume(tmp_path, method):
    over = METHODS[method]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    run = str(tmp_path / "killed")
    for kill in range(2):  # kill twice, each time once a NEW checkpoint exists
        p = _start(run, over, env)
        before, deadline = len(_ckpts(run)), time.time() + 120
        while len(_ckpts(run)) <= before and p.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.3 * kill)  # second time: kill in the middle of further training
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
    # a checkpoint write cut short by a kill leaves a .tmp- directory: resume must ignore it
    torn = os.path.join(run, "checkpoints", ".tmp-step_99999999")
    os.makedirs(torn, exist_ok=True)
    open(os.path.join(torn, "model.safetensors"), "wb").write(b"partial")
    p = _start(run, over, env)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    full = str(tmp_path / "full")
    train(load_config(TINY, BASE + over + [f"trainer.run_dir={full}"]))
    a, b = _losses(full), _losses(run)
    assert sorted(b) == sorted(a) == list(range(1, 33))
    assert not os.path.exists(torn)  # the torn write was cleaned up by the next checkpoint
    assert max(abs(a[s] - b[s]) for s in a) < 1e-6
    last = "checkpoints/step_00000032/custom_checkpoint_1.pkl"
    sa = torch.load(os.path.join(full, last), weights_only=True)
    sb = torch.load(os.path.join(run, last), weights_only=True)
    assert torch.equal(sa["queue.ids"], sb["queue.ids"]) and torch.allclose(sa["queue.keys"], sb["queue.keys"], atol=1e-6)
    if method == "ifnd":  # clustering state and acceptance travel with the checkpoint
        ma, mb = sa["_extra_state"]["miner"], sb["_extra_state"]["miner"]
        assert torch.equal(ma["labels"], mb["labels"]) and torch.equal(ma["assign"], mb["assign"])
        assert ma["rate"] == mb["rate"] == 1.0
