"""fastcl.checkpoint: files recorded by name and found by name only, one reader (open_run) for every consumer."""
import json
import os

import pytest
import torch

from fastcl.checkpoint import META, CheckpointReadError, object_path, open_run
from fastcl.config import load_config
from fastcl.train import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs/test/tiny.yaml")


@pytest.fixture(scope="module")
def sce_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("ck") / "run"
    train(load_config(TINY, [f"trainer.run_dir={run}", "method.name=sce", "trainer.epochs=1"]))
    return str(run)


def test_meta_names_every_file(sce_run):
    run = open_run(sce_run)
    assert run.files == {"student": "model.safetensors", "optimizer": "optimizer.bin",
                         "train_state": "custom_checkpoint_0.pkl", "method": "custom_checkpoint_1.pkl",
                         "teacher": "custom_checkpoint_2.pkl"}
    assert all(os.path.isfile(run.file(name)) for name in run.files)
    assert all(object_path(run.path, name) == run.file(name) for name in run.files)
    teacher = torch.load(run.file("teacher"), weights_only=True)
    assert "backbone.conv1.weight" in teacher and "queue.keys" in torch.load(run.file("method"), weights_only=True)
    assert run.cfg.method.name == "sce" and run.run_dir == os.path.abspath(sce_run)


def test_teacher_found_by_name_not_position(sce_run, tmp_path):
    """A run whose objects were registered in another order still yields ITS teacher (the old reader took the
    last custom file)."""
    import shutil
    moved = tmp_path / "run"
    shutil.copytree(sce_run, moved)
    ck = open_run(str(moved)).path
    meta = json.load(open(os.path.join(ck, META)))
    a, b = object_path(ck, "method"), object_path(ck, "teacher")
    os.replace(a, a + ".x"), os.replace(b, a), os.replace(a + ".x", b)  # teacher <-> method files swapped
    meta["files"].update(method=os.path.basename(b), teacher=os.path.basename(a))
    json.dump(meta, open(os.path.join(ck, META), "w"))
    assert object_path(ck, "teacher") == a
    want = open_run(sce_run).encoder("teacher").state_dict()
    got = open_run(str(moved)).encoder("teacher").state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_objects_are_found_by_recorded_names_only(sce_run, tmp_path):
    """No positional fallback: a checkpoint whose meta records no names (written before they were recorded), or
    lacks the name of an object, fails naming what is missing, for readers and for resume alike."""
    import shutil

    from fastcl.train import SetupError

    old = tmp_path / "old"
    shutil.copytree(sce_run, old)
    ck = open_run(str(old)).path
    meta = json.load(open(os.path.join(ck, META)))
    teacher_less = {**meta, "files": {k: v for k, v in meta["files"].items() if k != "teacher"}}
    json.dump(teacher_less, open(os.path.join(ck, META), "w"))
    with pytest.raises(ValueError, match=f"has no EMA teacher: its {META} records no file for 'teacher'"):
        object_path(ck, "teacher")
    with pytest.raises(SetupError, match="records no file for 'teacher'"):
        train(load_config(TINY, [f"trainer.run_dir={old}", "method.name=sce", "trainer.epochs=2",
                                 "trainer.resume=auto"]))
    del meta["files"]
    json.dump(meta, open(os.path.join(ck, META), "w"))
    with pytest.raises(CheckpointReadError, match=r"records no object names \('files'\)"):
        open_run(str(old))
    with pytest.raises(SetupError, match="records no object names"):
        train(load_config(TINY, [f"trainer.run_dir={old}", "method.name=sce", "trainer.epochs=2",
                                 "trainer.resume=auto"]))


def test_simclr_run_has_no_teacher(tmp_path):
    run = tmp_path / "run"
    train(load_config(TINY, [f"trainer.run_dir={run}", "method.name=simclr", "method.queue_size=0",
                             "trainer.max_steps=1"]))
    r = open_run(str(run))
    assert not r.has("teacher")
    with pytest.raises(ValueError, match="has no EMA teacher"):
        r.encoder("teacher")
