"""fastcl.lab.report: plots + report.md from synthetic run dirs (partial lines, missing keys, no kNN, different
lengths, resumed steps) and from a real tiny training run."""
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys

import pytest

from fastcl.lab import report as R

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs/test/tiny.yaml")

CONFIG = """\
method:
  name: {method}
model:
  arch: {arch}
optim:
  batch_size: {batch}
trainer:
  epochs: {epochs}
  max_steps: 0
"""


def make_run(path, method, arch, batch, steps, *, epochs=4, knn=True, diag=(), stages=(), finished=True,
             truncated=False, resumed_at=None, seed=0):
    """A synthetic run dir. `diag`: diagnostics keys logged every 2nd step; `stages`: t_* keys logged every
    step; `resumed_at`: the records after this step are logged twice (the first copy with wrong losses)."""
    rng = random.Random(seed)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.yaml"), "w") as f:
        f.write(CONFIG.format(method=method, arch=arch, batch=batch, epochs=epochs))
    spe = max(1, steps // epochs)
    recs, train = [], []
    if knn:
        recs.append({"step": 0, "epoch": 0, "knn_top1": 20.0, "feature_rank": 30.0})
    for s in range(1, steps + 1):
        r = {"step": s, "epoch": (s - 1) // spe, "loss": 6 * math.exp(-s / steps) + rng.gauss(0, 0.2),
             "lr": 0.1 * (1 + math.cos(math.pi * s / steps)) / 2, "img_per_s": 1000 + 10 * s, "pos_sim": 0.5}
        for i, k in enumerate(diag):
            if s % 2 == 0:
                r[k] = min(1.0, max(0.0, 0.3 + 0.1 * i + 0.3 * s / steps + rng.gauss(0, 0.05)))
        for i, k in enumerate(stages):  # the stages cover ~90% of the wall time per step
            r[k] = 0.9 * batch / r["img_per_s"] * (i + 1) / sum(range(1, len(stages) + 1)) * (1 + 0.1 * rng.random())
        train.append(r)
        recs.append(r)
        if knn and s % spe == 0:
            recs.append({"step": s, "epoch": s // spe, "knn_top1": 20.0 + 5 * s // spe, "feature_rank": 30.0 + s // spe})
    if resumed_at is not None:  # the steps after the checkpoint were logged once before a crash, then again
        stale = [{**r, "loss": 99.0} for r in train if r["step"] > resumed_at]
        i = next(j for j, r in enumerate(recs) if r.get("step") == resumed_at and "loss" in r) + 1
        recs = recs[:i] + stale + recs[i:]
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in recs))
        if truncated:
            f.write(json.dumps({"step": steps + 1, "epoch": 0, "loss": 1.0})[:17])  # partial last line
    if finished:
        with open(os.path.join(path, "result.json"), "w") as f:
            json.dump({"knn_top1": recs[-1]["knn_top1"] if knn else None, "knn_init": 20.0 if knn else None,
                       "steps": steps, "final_loss": train[-1]["loss"]}, f)
    return train


def _check_png(path):
    import matplotlib.image as mpimg

    assert os.path.isfile(path), path
    assert os.path.getsize(path) > 10_000, (path, os.path.getsize(path))
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400
    assert img[..., :3].std() > 0.01  # not a blank canvas


def _rows(md_text):
    """Data rows of the first markdown table: {run label: [cells]}."""
    lines = md_text.split("## Summary", 1)[1].strip().splitlines()
    end = next((i for i, ln in enumerate(lines) if not ln.startswith("|")), len(lines))
    rows = lines[2:end]
    out = {}
    for ln in rows:
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", ln)[1:-1]]
        out[cells[0]] = cells
    return out


@pytest.fixture(scope="module")
def fake_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    a, b = str(root / "ifnd_r18"), str(root / "sce_r50")
    ta = make_run(a, "ifnd", "resnet18", 256, 400, diag=("fn_share", "fn_masked_precision", "fn_masked_recall",
                                                           "fn_masked_f1", "pseudo_label_precision_l0",
                                                           "pseudo_label_precision_l1"),
                  stages=("t_data", "t_h2d", "t_forward_backward", "t_optimizer", "t_mining"), resumed_at=250)
    # b: still running (no result.json, partial last line), no kNN, shorter, other diagnostics, 1 missing stage
    tb = make_run(b, "sce", "resnet50", 128, 120, knn=False, diag=("fn_share", "target_same_class_mass"),
                  stages=("t_data", "t_forward_backward", "t_optimizer"), finished=False, truncated=True, seed=1)
    with pytest.warns(UserWarning, match=r"metrics.jsonl:\d+: skipping unparsable line.*still writing"):
        out = R.report([a, b], str(root / "out"))
    return a, b, ta, tb, out


def test_report_writes_readable_pngs(fake_runs):
    *_, out = fake_runs
    for k in ("loss", "lr", "knn", "diagnostics", "timing"):
        _check_png(out[k])
    assert os.path.basename(out["report"]) == "report.md"


def test_report_md_has_one_row_per_run_with_the_right_numbers(fake_runs):
    a, b, ta, tb, out = fake_runs
    md = open(out["report"]).read()
    rows = _rows(md)
    assert list(rows) == ["ifnd · ifnd_r18", "sce · sce_r50"]
    ra, rb = rows["ifnd · ifnd_r18"], rows["sce · sce_r50"]
    assert ra[1:4] == ["ifnd", "resnet18", "256"] and rb[1:4] == ["sce", "resnet50", "128"]
    assert ra[4] == "4 ep / 400 steps" and rb[4] == "4 ep / 120 steps (running)"
    assert ra[5] == f"{ta[-1]['loss']:.4f}" and rb[5] == f"{tb[-1]['loss']:.4f}"  # not the stale 99.0
    assert ra[6] == "20.00 → 40.00 (+20.00)" and rb[6] == "–"
    assert ra[7] == f"{statistics.median(r['img_per_s'] for r in ta):.1f}"
    assert rb[7] == f"{statistics.median(r['img_per_s'] for r in tb):.1f}"
    for cells, tr in ((ra, ta), (rb, tb)):
        assert cells[8] == f"{statistics.mean(r['fn_share'] for r in tr if 'fn_share' in r):.3f}"
    assert ra[9] == f"{statistics.mean(r['fn_masked_precision'] for r in ta if 'fn_share' in r):.3f}"
    assert ra[10] == f"{statistics.mean(r['fn_masked_recall'] for r in ta if 'fn_share' in r):.3f}"
    assert rb[9] == rb[10] == "–"
    # time shares: mean per stage over steps 2.. (step 1 is warm-up), as % of their sum
    means = {k: statistics.mean(r[k] for r in ta[1:]) for k in ("t_data", "t_h2d", "t_forward_backward",
                                                                  "t_optimizer", "t_mining")}
    tot = sum(means.values())
    assert ra[11] == ", ".join(f"{k[2:]} {100 * v / tot:.0f}%" for k, v in means.items())
    assert rb[11].startswith("data ") and "mining" not in rb[11]
    assert ra[12] == "30.0 → 34.0" and rb[12] == "–"  # effective rank of the held-out features (collapse check)
    # the other tables and the PNG links
    assert "## Time per step by stage" in md and "## Diagnostics" in md and "`target_same_class_mass`" in md
    assert "`pseudo_label_precision_l1`" in md
    for png in ("loss.png", "lr.png", "knn.png", "diagnostics.png", "timing.png"):
        assert f"]({png})" in md


def test_summary_dedupes_resumed_steps_and_skips_partial_line(fake_runs):
    a, b, ta, tb, _ = fake_runs
    with pytest.warns(UserWarning):
        run_b = R.load_run(b)
    run_a = R.load_run(a)
    assert [r["step"] for r in run_a.train] == list(range(1, 401))
    assert all(r["loss"] != 99.0 for r in run_a.train)
    assert [r["step"] for r in run_b.train] == list(range(1, 121)) and not run_b.finished
    assert R.series(run_a.knn, "knn_top1", x="epoch")[0] == [0, 1, 2, 3, 4]


def test_single_run_without_optional_keys_and_plot_curves(tmp_path):
    run = str(tmp_path / "plain")
    make_run(run, "simclr", "resnet18", 64, 3, epochs=1, knn=False)
    out = R.report([run])  # default out dir: <run>/report
    assert out["report"] == os.path.join(run, "report", "report.md")
    assert out["knn"] is None and out["diagnostics"] is None and out["timing"] is None
    _check_png(out["loss"]) and _check_png(out["lr"])
    md = open(out["report"]).read()
    assert len(_rows(md)) == 1 and "no kNN plot" in md and "knn.png" not in md
    png = R.plot_curves([run], str(tmp_path / "curves.png"))  # the demo's entry point
    _check_png(png)


def test_missing_metrics_names_the_path(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope" / "metrics.jsonl"))):
        R.report([str(tmp_path / "nope")])
    with pytest.raises(SystemExit) as e:
        R.main([str(tmp_path / "nope")])
    assert e.value.code == 2 and "metrics.jsonl" in capsys.readouterr().err


def test_fresh_restart_in_the_same_dir_drops_the_old_records(tmp_path):
    run = str(tmp_path / "again")
    make_run(run, "simclr", "resnet18", 64, 8, epochs=2)
    old = open(os.path.join(run, "metrics.jsonl")).read()
    make_run(run, "simclr", "resnet18", 64, 4, epochs=2, seed=3)  # a fresh run appended to the old file
    new = open(os.path.join(run, "metrics.jsonl")).read()
    with open(os.path.join(run, "metrics.jsonl"), "w") as f:
        f.write(old + new)
    r = R.load_run(run)
    assert [x["step"] for x in r.train] == [1, 2, 3, 4] and len(r.knn) == 3


def test_ema_is_bias_corrected():
    assert R.ema([2.0, 2.0, 2.0], 10) == pytest.approx([2.0, 2.0, 2.0])
    assert R.ema([1.0, 5.0], 1) == [1.0, 5.0]
    assert R.auto_span(10) == 1 and R.auto_span(1000) == 40 and R.auto_span(10**6) == 50


def test_report_on_a_real_tiny_run(tmp_path):
    from fastcl.config import load_config
    from fastcl.train import train

    run = str(tmp_path / "tiny")
    result = train(load_config(TINY, [f"trainer.run_dir={run}", "trainer.max_steps=4"]))
    out = subprocess.run([sys.executable, "-m", "fastcl.lab.report", run, "--out", str(tmp_path / "rep")],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    md = open(tmp_path / "rep" / "report.md").read()
    (cells,) = _rows(md).values()
    assert cells[1:4] == ["mocov2", "resnet18", "16"]
    assert cells[4] == "2 ep / 4 steps (max_steps 4)" and result["steps"] == 4
    assert cells[5] == f"{result['final_loss']:.4f}"
    _check_png(str(tmp_path / "rep" / "loss.png"))
    _check_png(str(tmp_path / "rep" / "lr.png"))
