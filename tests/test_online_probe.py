"""Online linear probe (trainer.online_probe; reads labels, off by default): logged with knn_top1, learns, and
leaves the pretraining trajectory bit-identical."""
from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch

from fastcl.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "test", "tiny.yaml")


def _over(cifar_folder, run_dir, probe: bool) -> list[str]:
    return ["data.backend=gpu_tensor", f"data.path={cifar_folder}/train", f"data.eval_path={cifar_folder}/test",
            "data.aug.views.0.size=32", "data.aug.views.1.size=32", "data.aug.eval_size=32", "model.width=8",
            "model.cifar_stem=true", "method.queue_size=64", "optim.batch_size=50", "trainer.epochs=2",
            "trainer.max_steps=12", "trainer.knn_every=1", f"trainer.run_dir={run_dir}",
            f"trainer.online_probe={str(probe).lower()}"]


def test_probe_on_off_same_backbone_trajectory_and_logged_with_knn(cifar_folder, tmp_path):
    from fastcl.checkpoint import load_encoder
    from fastcl.train import train

    runs = {}
    for probe in (False, True):
        run_dir = tmp_path / f"probe_{probe}"
        train(load_config(TINY, _over(cifar_folder, run_dir, probe)))
        recs = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
        enc, _ = load_encoder(str(run_dir), "student")
        runs[probe] = (recs, enc.state_dict())
    (off, w_off), (on, w_on) = runs[False], runs[True]
    assert [r["loss"] for r in off if "loss" in r] == [r["loss"] for r in on if "loss" in r]
    assert w_off.keys() == w_on.keys()
    for k in w_off:
        assert torch.equal(w_off[k], w_on[k]), k  # bit-identical weights and BN buffers
    knn_on = [r for r in on if "knn_top1" in r]
    assert len(knn_on) >= 2 and all(0 <= r["probe_top1"] <= 100 for r in knn_on)
    assert [r["knn_top1"] for r in knn_on] == [r["knn_top1"] for r in off if "knn_top1" in r]
    assert not any("probe_top1" in r for r in off)


def test_probe_learns_from_labelled_samples_only(cifar_folder):
    from fastcl.eval.online_probe import OnlineProbe
    from fastcl.models import build_encoder
    from fastcl.pipelines.batch import Batch
    from fastcl.pipelines.eval_data import eval_batches

    cfg = load_config(TINY, _over(cifar_folder, "unused", True) + ["trainer.online_probe_lr=5.0"])
    torch.manual_seed(0)
    backbone = build_encoder(cfg.model).backbone
    x, y, _ = next(eval_batches(f"{cifar_folder}/train", cfg.data.aug, 1 << 30, workers=1))  # one batch: all 500
    x, y = x[::2], y[::2]  # 250 images, 10 classes
    # the probe is scored on the images it may learn from (the labelled half): random features, so fitting is the test
    # the monitor's side of the contract: held-out labels and L2-normalised eval-mode features of the backbone
    knn = SimpleNamespace(enabled=True, test_labels=y[1::2],
                          test_features=lambda net: OnlineProbe._features(net, x[1::2]))
    probe = OnlineProbe.build(cfg, SimpleNamespace(labels=y), knn, backbone)
    before = [p.detach().clone() for p in backbone.parameters()]
    acc0 = probe.evaluate(backbone, knn)["probe_top1"]
    hidden = y.clone()
    hidden[::2] = -1  # unlabelled samples (STL-10's) are skipped
    for _ in range(100):
        probe.step(backbone, Batch((x, x), torch.arange(len(y)), hidden))
    acc = probe.evaluate(backbone, knn)["probe_top1"]
    assert acc > max(25.0, acc0 + 10), (acc0, acc)  # fits the labelled half well above chance (10 %)
    assert all(torch.equal(a, b) for a, b in zip(before, backbone.parameters()))
    with pytest.raises(ValueError, match="data.eval_path"):
        OnlineProbe.build(cfg, SimpleNamespace(labels=y), SimpleNamespace(enabled=False, test_labels=None), backbone)
