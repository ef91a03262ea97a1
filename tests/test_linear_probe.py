"""The linear probe made sound: standardised features + a held-out lr sweep make every protocol converge
on every shipped backbone; a diverging probe warns. Real CIFAR-10 JPEGs (conftest `cifar_folder`) and a tiny run
trained on them."""
from __future__ import annotations

import json
import os

import pytest
import torch

from fastcl.config import load_config
from fastcl.eval import linear

TINY = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "test", "tiny.yaml")
COMMON = ["--no-progress", "--workers", "1", "--device", "cpu"]
EPOCHS = ["--epochs", "30"]  # milestones keep their fraction (moco: 18, 24)


@pytest.fixture(scope="module")
def run(cifar_folder, tmp_path_factory) -> str:
    """A tiny MoCo-v2 run trained for one epoch (7 steps of 64) on the 500 real training images."""
    from fastcl.train import train

    run_dir = str(tmp_path_factory.mktemp("probe") / "run")
    over = ["data.backend=gpu_tensor", f"data.path={cifar_folder}/train", "data.aug.views.0.size=32",
            "data.aug.views.1.size=32", "data.aug.eval_size=32", "model.width=8", "model.cifar_stem=true",
            "optim.batch_size=64", "trainer.epochs=1", "method.queue_size=128", f"trainer.run_dir={run_dir}"]
    train(load_config(TINY, over))
    return run_dir


def _probe(run, cifar_folder, tmp_path, extra) -> dict:
    out = tmp_path / "linear.json"
    args = ["--checkpoint", run, "--data", f"{cifar_folder}/train", "--val", f"{cifar_folder}/test",
            "--cache", str(tmp_path.parent / "cache"), "--out", str(out)] + COMMON + EPOCHS + extra
    assert linear.main(args) == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("protocol", sorted(linear.PROTOCOLS))
def test_every_protocol_converges_on_a_trained_encoder(run, cifar_folder, tmp_path, protocol, recwarn):
    r = _probe(run, cifar_folder, tmp_path, ["--protocol", protocol])
    assert r["standardize"] and len(r["lr_sweep"]) >= len(linear.LR_GRID)
    assert r["lr"] in [t["lr"] for t in r["lr_sweep"]]
    assert not r["diverged"] and not [w for w in recwarn if "rose above its start" in str(w.message)]
    losses = [h["loss"] for h in r["history"]]
    # converges: no epoch above the start, and a clear drop. How far a width-8 encoder of one epoch on 500 images
    # lets the loss fall depends on the machine's float rounding (the trained encoder differs between CPU kinds:
    # 0.78 of the start on one, 0.91 on another), so the drop asked for is 5 %, not a fixed level
    assert max(losses) <= r["start_loss"] and losses[-1] < 0.95 * r["start_loss"], (r["start_loss"], losses)
    assert r["top1"] > 15.0, r["top1"]  # chance: 10 %, binomial sd 2.1 points on the 200 test images


def test_the_old_moco_probe_diverges_and_warns(run, cifar_folder, tmp_path):
    """What a new user got before: raw features at MoCo's lr 30. The probe must say it diverged."""
    with pytest.warns(RuntimeWarning, match="rose above its start"):
        r = _probe(run, cifar_folder, tmp_path, ["--protocol", "moco", "--no-standardize", "--no-lr-sweep"])
    assert r["diverged"] and r["lr"] == 30.0 and r["lr_sweep"] == []


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
def test_every_backbone_every_protocol_converges(cifar_folder, arch):
    """Feature scales differ by backbone (ResNet-50: 4x the width, bottleneck outputs); the sound probe converges
    on each shipped one (random-init weights, width 8, real images)."""
    from fastcl.models import build_encoder

    cfg = load_config(TINY, [f"model.arch={arch}", "model.width=8", "data.aug.eval_size=32"])
    torch.manual_seed(0)
    enc = build_encoder(cfg.model)
    aug = linear.eval_aug(cfg)
    tr = linear.extract_folder(enc.backbone, f"{cifar_folder}/train", aug, workers=1, progress=False)
    te = linear.extract_folder(enc.backbone, f"{cifar_folder}/test", aug, workers=1, progress=False)
    for name in sorted(linear.PROTOCOLS):
        p = linear.resolve_protocol(name, epochs=20)
        r = linear.fit_probe(tr.feats, tr.labels, te.feats, te.labels, 10, p, torch.device("cpu"), progress=False)
        assert not r["diverged"], (arch, name, r["start_loss"], r["history"][:3])
        assert r["history"][-1]["loss"] < r["start_loss"], (arch, name)


def test_bad_probe_arguments_fail_before_extraction(run, cifar_folder, tmp_path, capsys):
    base = ["--checkpoint", run, "--data", f"{cifar_folder}/train", "--val", f"{cifar_folder}/test",
            "--cache", str(tmp_path / "c")] + COMMON
    for extra, needle in ((["--holdout", "1.5"], "--holdout"), (["--lr-grid", "0"], "--lr-grid")):
        assert linear.run_cli(lambda: linear.main(base + extra)) == 2
        assert needle in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "c")


def test_standardize_uses_train_statistics():
    x, v = torch.randn(100, 5) * 7 + 3, torch.randn(10, 5)
    x[:, 2] = 1.0  # a dead dimension
    xs, vs = linear.standardize(x, v)
    assert torch.allclose(xs.mean(0), torch.zeros(5), atol=1e-5) and torch.isfinite(vs).all()
    assert torch.allclose(xs[:, [0, 1, 3, 4]].std(0), torch.ones(4), atol=1e-4) and (xs[:, 2] == 0).all()


def test_sweep_continues_below_the_grid_while_the_smallest_lr_wins(monkeypatch):
    """The optimum can lie below the preset's grid (standardised features of a small CIFAR encoder: MoCo's lr 30
    needs x0.0001): the sweep extends downwards while the smallest lr wins, and stops once a smaller one loses."""
    peak = 0.003

    def fake(xf, yf, xh, yh, num_classes, q, *a, **k):  # held-out top-1 peaks at lr = peak
        import math
        return {"top1": 50.0 - abs(math.log10(q.lr / peak)), "history": [{"loss": 1.0}], "diverged": False}

    monkeypatch.setattr(linear, "train_linear", fake)
    p = linear.resolve_protocol("moco", None, None, None, None, None)
    x, y = torch.randn(100, 8), torch.randint(0, 10, (100,))
    lr, table = linear.sweep_lr(x, y, 10, p)
    assert lr == pytest.approx(peak) and len(table) == len(linear.LR_GRID) + 2  # 0.003 wins, 0.0003 loses
    monkeypatch.setattr(linear, "train_linear", lambda *a, **k: {"top1": 40.0 + a[5].lr, "history": [{"loss": 1.0}],
                                                                 "diverged": False})
    lr, table = linear.sweep_lr(x, y, 10, p)  # the largest lr wins: no extension
    assert lr == p.lr and len(table) == len(linear.LR_GRID)
