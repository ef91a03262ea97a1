"""`python -m fastcl.lab.gpucheck`, the one device check (docs/GPU.md), cannot rot: its toy size runs here on the
CPU in CI, so a change that breaks a stage on the CPU fails this test long before a GPU machine is lent.

- the toy run as a user runs it (a subprocess): every stage reported, none failed, every registered method
  trained through stop + resume, and the parts that need CUDA say so on a machine without one;
- the runner's isolation, with stages injected in-process: an exception fails only its own stage (error line
  in the reason) and the next stage still runs; a stage past its time budget is stopped and reported.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastcl.lab import gpucheck
from fastcl.methods import METHODS

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> tuple[int, dict, float, str]:
    out = tmp_path_factory.mktemp("gpucheck")
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "fastcl.lab.gpucheck", "--size", "toy", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=500)
    with open(out / "gpucheck.json") as f:
        return p.returncode, json.load(f), time.time() - t0, p.stdout + p.stderr


def test_toy_run_every_stage_and_no_failure(toy_run):
    rc, report, wall, output = toy_run
    stages = report["stages"]
    assert list(stages) == list(gpucheck.STAGES), output[-3000:]
    failed = {n: s["reason"] for n, s in stages.items() if s["status"] == "fail"}
    assert not failed and rc == 0, (failed, output[-3000:])
    for name, s in stages.items():
        assert s["status"] in ("pass", "skipped") and s["seconds"] >= 0, name
        assert s["status"] == "pass" or s["reason"], f"{name}: a skipped stage must say why"
    assert "stage" in output and "results:" in output  # the printed table
    print(f"gpucheck --size toy: {wall:.1f} s")


def test_toy_run_trains_every_registered_method_through_resume(toy_run):
    _, report, _, _ = toy_run
    methods = report["stages"]["train"]["numbers"]["methods"]
    assert sorted(methods) == sorted(METHODS)
    for name, r in methods.items():
        assert r["steps"] > r["stopped_at"] > 0, name
        assert abs(r["final_loss"]) < float("inf"), name


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without CUDA reports")
def test_toy_run_names_what_needs_cuda(toy_run):
    _, report, _, _ = toy_run
    stages = report["stages"]
    assert report["device"] == stages["env"]["numbers"]["device"] == "cpu"
    assert "numba.cuda: needs CUDA" in stages["kernels"]["reason"]
    assert stages["kernels"]["numbers"]["backend"] == "numba_cpu"  # the njit path still ran
    assert stages["mining"]["numbers"]["faiss_gpu"] == "skipped: needs CUDA"
    assert "faiss-gpu: skipped: needs CUDA" in stages["mining"]["reason"]


def _ok(ctx):
    return {"ran": True}, "ran"


def _boom(ctx):
    raise RuntimeError("injected failure\nsecond line not in the reason")


def _slow(ctx):
    time.sleep(30)
    return {}, "should have been stopped"


def _skip(ctx):
    raise gpucheck.Skip("needs CUDA")


def test_a_failing_stage_is_reported_and_the_next_one_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpucheck, "STAGES", {"first": _ok, "boom": _boom, "skip": _skip, "after": _ok})
    rc = gpucheck.main(["--out", str(tmp_path), "--size", "toy"])
    report = json.loads((tmp_path / "gpucheck.json").read_text())
    s = report["stages"]
    assert rc == 1 and report["failed"] == ["boom"]
    assert s["boom"]["status"] == "fail" and s["boom"]["reason"] == "RuntimeError: injected failure"
    log = (tmp_path / "gpucheck.log").read_text()
    assert "===== stage boom" in log and "second line not in the reason" in log  # the traceback
    assert s["skip"]["status"] == "skipped" and s["skip"]["reason"] == "needs CUDA"
    assert s["first"]["status"] == s["after"]["status"] == "pass" and s["after"]["numbers"] == {"ran": True}
    table = capsys.readouterr().out
    assert "boom" in table and "RuntimeError: injected failure" in table


def test_a_stage_past_its_budget_is_stopped(tmp_path, monkeypatch):
    monkeypatch.setattr(gpucheck, "STAGES", {"slow": _slow, "after": _ok})
    t0 = time.time()
    rc = gpucheck.main(["--out", str(tmp_path), "--timeout-s", "1"])
    s = json.loads((tmp_path / "gpucheck.json").read_text())["stages"]
    assert rc == 1 and time.time() - t0 < 20
    assert s["slow"]["status"] == "fail" and "time budget of 1 s" in s["slow"]["reason"]
    assert s["after"]["status"] == "pass"


def test_skipped_stages_do_not_fail_the_check(tmp_path, monkeypatch):
    monkeypatch.setattr(gpucheck, "STAGES", {"skip": _skip, "after": _ok})
    assert gpucheck.main(["--out", str(tmp_path)]) == 0


def test_gpu_doc_names_only_what_exists():
    """docs/GPU.md: every repository path and fastcl module it names exists, and the device command keeps
    exit codes (pipefail, no `| tail`)."""
    import importlib.util
    import re

    text = (REPO / "docs" / "GPU.md").read_text()
    assert "python -m fastcl.lab.gpucheck --size full" in text and "set -o pipefail" in text
    assert "| tail" not in text
    for mod in set(re.findall(r"python -m (fastcl(?:\.\w+)+)", text)):
        assert importlib.util.find_spec(mod) is not None, mod
    for path in set(re.findall(r"`((?:fastcl|pipelines|kernels|tests|configs|docs)/[\w./-]+)`", text)):
        assert (REPO / path).exists(), path
    assert "gpu-check:" in (REPO / "Makefile").read_text()
