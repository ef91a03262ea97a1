"""trainer.trackers: Weights & Biases (offline run files) and MLflow (local file store) receive the same scalars as
metrics.jsonl, at the same steps; a tracker whose package is missing fails before training with the pip command."""
from __future__ import annotations

import glob
import json
import os
import struct

import pytest

from fastcl.config import ConfigError, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "test", "tiny.yaml")


def read_wandb_history(run_file: str) -> dict[int, dict]:
    """{step: {key: value}} from an offline W&B run file (`run-<id>.wandb`): a LevelDB-style record log (7-byte
    file header ':W&B' + magic + version; 32 KiB blocks; records = crc32, uint16 length, type FULL/FIRST/MIDDLE/LAST)
    of protobuf `Record`s. wandb 0.31 has no Python reader of its own (the Go core writes the file)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(run_file, "rb").read()
    assert data[:4] == b":W&B", f"{run_file}: not a W&B run file"
    block, pos, parts, records = 32768, 7, [], []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            parts = [chunk]
        elif kind == 3:
            parts.append(chunk)
        elif kind == 4:
            records.append(b"".join(parts + [chunk]))
    history: dict[int, dict] = {}
    for raw in records:
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            history.setdefault(int(items["_step"]), {}).update(items)
    return history


def _numeric_records(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if isinstance(v, (int, float))} for r in recs]


def test_wandb_and_mlflow_receive_the_metrics_jsonl_scalars(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb not installed (pip install 'fastcl[trackers]')")
    pytest.importorskip("mlflow", reason="mlflow not installed (pip install 'fastcl[trackers]')")
    from mlflow.tracking import MlflowClient

    from fastcl.train import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = str(tmp_path / "run")
    cfg = load_config(TINY, [f"trainer.run_dir={run_dir}", "trainer.trackers=[tensorboard,wandb,mlflow]",
                             "trainer.epochs=1", "trainer.log_every=2"])
    train(cfg)
    recs = _numeric_records(run_dir)
    assert len(recs) >= 2 and all("loss" in r for r in recs)
    assert glob.glob(os.path.join(run_dir, "tb", "**", "events.out.tfevents.*"), recursive=True)

    # W&B: offline run files under <run_dir>/wandb, history rows keyed by our step
    run_files = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb"))
    assert len(run_files) == 1, run_files
    hist = read_wandb_history(run_files[0])
    for r in recs:
        got = hist[r["step"]]
        for k, v in r.items():
            assert got[k] == pytest.approx(v, rel=1e-6, abs=1e-12), (k, r["step"])

    # MLflow: a file store in <run_dir>/mlruns; every key's history equals the jsonl column
    client = MlflowClient(tracking_uri=f"file://{os.path.join(run_dir, 'mlruns')}")
    exp = client.get_experiment_by_name("fastcl")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == "run" and run.data.params["method.name"] == "mocov2"
    for k in recs[0]:
        want = [(r["step"], float(r[k])) for r in recs if k in r]
        got = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, k))
        assert got == [(s, pytest.approx(v, rel=1e-6, abs=1e-12)) for s, v in want], k


@pytest.mark.parametrize("name,module", [("wandb", "wandb"), ("mlflow", "mlflow")])
def test_missing_tracker_package_fails_before_training_with_pip_command(tmp_path, monkeypatch, capsys, name, module):
    import importlib.util

    from fastcl import train as train_mod

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: None if m == module else real(m, *a))
    run_dir = tmp_path / "run"
    code = train_mod.main(["--config", TINY, f"trainer.run_dir={run_dir}", f"trainer.trackers=[{name}]"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{name!r} is not installed" in err and "pip install 'fastcl[trackers]'" in err, err
    assert not run_dir.exists()  # nothing written: it failed before training


def test_tracker_errors_name_the_fix():
    import importlib.util

    from fastcl.trackers import TrackerError, resolve

    with pytest.raises(TrackerError, match=r"unknown tracker 'neptune'"):
        resolve(["neptune"])
    real = importlib.util.find_spec
    try:
        importlib.util.find_spec = lambda m, *a: None if m == "wandb" else real(m, *a)
        with pytest.raises(TrackerError, match=r"pip install 'fastcl\[trackers\]'"):
            resolve(["tensorboard", "wandb"])
    finally:
        importlib.util.find_spec = real
    assert resolve([]) == [] and resolve(["tensorboard", "tensorboard"]) == ["tensorboard"]
    with pytest.raises(ConfigError, match="trainer.trackers"):
        load_config(TINY, ["trainer.trackers=[tensorbord]"])
