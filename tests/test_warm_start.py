"""trainer.init_from (the study's warm-start protocol): weights, teacher, optimizer, train position and RNG come from
another run's checkpoint; the method state is fresh except a same-size queue."""
import json
import os

import torch

from fastcl.checkpoint import object_path
from fastcl.config import load_config
from fastcl.train import main, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs/test/tiny.yaml")


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_mocov2_continued_from_its_own_checkpoint_equals_the_uninterrupted_run(tmp_path, capsys):
    full, base, warm = (str(tmp_path / n) for n in ("full", "base", "warm"))
    train(load_config(TINY, [f"trainer.run_dir={full}"]))
    train(load_config(TINY, [f"trainer.run_dir={base}", "trainer.max_steps=4"]))  # epoch 1 of 2, same schedule
    capsys.readouterr()
    train(load_config(TINY, [f"trainer.run_dir={warm}", f"trainer.init_from={base}"]))
    assert "queue kept" in capsys.readouterr().out
    a, b = _losses(full), _losses(warm)
    assert sorted(b) == [5, 6, 7, 8]  # the train position came along
    for s in b:  # same weights, optimizer momentum, queue and RNG: the same trajectory
        assert abs(a[s] - b[s]) < 1e-6, (s, a[s], b[s])


def test_other_methods_start_from_it_with_fresh_state(tmp_path, capsys):
    base = str(tmp_path / "base")
    train(load_config(TINY, [f"trainer.run_dir={base}", "trainer.max_steps=4"]))
    queue = torch.load(object_path(os.path.join(base, "checkpoints/step_00000004"), "method"), weights_only=True)
    capsys.readouterr()
    ifnd = str(tmp_path / "ifnd")
    res = train(load_config(TINY, [f"trainer.run_dir={ifnd}", f"trainer.init_from={base}", "method.name=ifnd",
                                   "method.ifnd.levels=[4]", "trainer.max_steps=5"]))
    assert res["steps"] == 5 and "queue kept" in capsys.readouterr().out
    st = torch.load(object_path(os.path.join(ifnd, "checkpoints/step_00000005"), "method"), weights_only=True)
    assert int(st["table.seen"].sum()) == 16  # fresh SampleTable: only the one step's keys are in it
    # the queue came along: after one more push its older entries are the base run's
    assert torch.equal(st["queue.ids"][16:], queue["queue.ids"][16:])
    simclr = str(tmp_path / "simclr")  # no teacher, no queue: takes the student, optimizer and position
    res = train(load_config(TINY, [f"trainer.run_dir={simclr}", f"trainer.init_from={base}", "method.name=simclr",
                                   "method.queue_size=0"]))
    assert res["steps"] == 8 and "no queue kept" in capsys.readouterr().out
    assert sorted(_losses(simclr)) == [5, 6, 7, 8]


def test_bad_init_from_is_one_line(tmp_path, capsys):
    simclr = str(tmp_path / "simclr")
    train(load_config(TINY, [f"trainer.run_dir={simclr}", "method.name=simclr", "method.queue_size=0",
                             "trainer.max_steps=2"]))
    for src, needle in ((str(tmp_path / "nowhere"), "neither a fastcl checkpoint"), (simclr, "has none")):
        assert main(["--config", TINY, f"trainer.run_dir={tmp_path / 'x'}", f"trainer.init_from={src}"]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and "trainer.init_from" in err and len(err.splitlines()) == 1, err
    assert main(["--config", TINY, f"trainer.run_dir={tmp_path / 'y'}", f"trainer.init_from={simclr}",
                 "model.width=16"]) == 2
    assert "width" in capsys.readouterr().err
