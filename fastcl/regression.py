"""Accuracy regression guard: one fixed-budget training run whose kNN curve is stored in the repository.

    python -m fastcl.regression check                  train the guard run, compare its curve with the reference
    python -m fastcl.regression update [--seeds 0 1 2] re-measure the reference (after a change that moves accuracy
                                                        on purpose) and write it with the commit that caused it

The guard run is configs/test/regression.yaml (the CPU comparison's SimCLR, small, on the bundled CIFAR-10
sample; kNN on the full CIFAR-10 test split) at the reference seed. On one machine kind it is deterministic, so
an unchanged trainer reproduces the stored curve; on another machine kind (or another BLAS) the floating-point
order differs and training drifts by about one seed's worth of noise. The tolerance is therefore measured, not
guessed: `update` trains the run at several seeds and sets tol = Z * sigma_seed (Z = 3, one-sided), separately
for the final kNN and for the curve's mean after initialisation. A change that costs more than that fails `make test` (tests/test_regression_guard.py).
Being higher than the reference by more than tol passes with a note: accuracy went up, record it with `update`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs/test/regression.yaml")
REFERENCE = os.path.join(REPO, "tests/regression_reference.json")
Z = 3.0  # one-sided: a clean change fails with p ~ 0.001 if cross-machine drift behaves like seed noise
RESOLUTION = 0.01  # kNN is measured on the 10,000 CIFAR-10 test images: one image = 0.01 points
SHARED_DATA = os.environ.get("FASTCL_SHARED_DATA", os.path.join(os.path.dirname(REPO), "shared", "data"))
TEST_SET = os.path.join(REPO, "data/extracted/cifar10_test")
THREADS = 1  # torch intra-op threads of the guard run: fixed, so the result does not depend on the core count


class RegressionError(ValueError):
    """Bad input to the guard (missing reference, malformed file): reported as one line."""


def ensure_test_set() -> str:
    """The full CIFAR-10 test split (10,000 JPEGs) in the ignored data/extracted/, extracted once from the
    shared tarball. Why not the sample's 1,000 test images: on those, two equally good encoders differ by about
    the binomial noise of 1,000 draws (~1.5 points at 35 %), which set the seed sigma (and the tolerance) of a
    first version of this guard to 1.4 points; 10,000 images cut that noise by sqrt(10)."""
    from fastcl.pipelines.extract import extract_once

    tar_path = os.path.join(SHARED_DATA, "cifar10-jpeg", "cifar10-jpeg.tar.gz")
    if not os.path.isfile(tar_path):
        raise RegressionError(f"CIFAR-10 tarball not found: {tar_path} (set FASTCL_SHARED_DATA to the folder "
                              f"holding cifar10-jpeg/)")
    return extract_once(tar_path, TEST_SET, subdir="test")  # <class>/<file>, 19 MB streamed


def train_curve(seed: int, run_dir: str, progress: bool = False) -> dict:
    """Train the guard run from scratch at `seed` in `run_dir`; {"epochs": [...], "knn": [...], "minutes"}.

    knn[i] is kNN top-1 (%) after epochs[i] epochs (epochs[0] = 0: the random initialisation).
    """
    import torch

    from fastcl.config import load_config
    from fastcl.demo import ensure_sample
    from fastcl.train import train

    ensure_sample()
    ensure_test_set()
    cwd, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(REPO)  # the guard config uses repo-relative paths
    torch.set_num_threads(THREADS)
    try:
        cfg = load_config(CONFIG, [f"trainer.seed={seed}", f"trainer.run_dir={os.path.abspath(run_dir)}",
                                   f"trainer.progress={str(progress).lower()}"])
        shutil.rmtree(cfg.trainer.run_dir, ignore_errors=True)  # always from scratch: a resumed run is another run
        t0 = time.time()
        train(cfg)
        minutes = (time.time() - t0) / 60
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f if '"knn_top1"' in line]
    return {"epochs": [r["epoch"] for r in recs], "knn": [round(r["knn_top1"], 2) for r in recs],
            "minutes": round(minutes, 2)}


def curve_mean(knn: list[float]) -> float:
    """Mean kNN over the curve after initialisation: a drop anywhere along the curve, not only at the end."""
    return sum(knn[1:]) / len(knn[1:])


def tolerances(finals: list[float], means: list[float]) -> dict:
    """Z * sample std over seeds, floored at the measurement's resolution: {"final", "mean", "sigma_final", ...}."""
    from fastcl.study.stats import mean_std

    s_f, s_m = mean_std(finals)["std"], mean_std(means)["std"]
    return {"sigma_final": round(s_f, 3), "sigma_mean": round(s_m, 3), "z": Z,
            "final": round(max(Z * s_f, RESOLUTION), 3), "mean": round(max(Z * s_m, RESOLUTION), 3)}


def compare(ref: dict, curve: dict) -> tuple[list[str], list[str]]:
    """(failures, notes) of a guard curve against the reference; no failures = the guard holds."""
    if curve["epochs"] != ref["curve"]["epochs"]:
        raise RegressionError(f"the guard run evaluated at epochs {curve['epochs']}, the reference at "
                              f"{ref['curve']['epochs']}: configs/test/regression.yaml changed; run "
                              f"`python -m fastcl.regression update`")
    tol, fails, notes = ref["tolerance"], [], []
    for name, now, was, t in (("final kNN", curve["knn"][-1], ref["curve"]["knn"][-1], tol["final"]),
                              ("curve mean", curve_mean(curve["knn"]), curve_mean(ref["curve"]["knn"]), tol["mean"])):
        line = f"{name} {now:.2f} % vs reference {was:.2f} % ({now - was:+.2f}, tolerance {t:.2f})"
        if now < was - t:
            fails.append(line)
        elif now > was + t:
            notes.append(line + ": above the reference; record it with `python -m fastcl.regression update`")
    return fails, notes


def load_reference(path: str = REFERENCE) -> dict:
    if not os.path.isfile(path):
        raise RegressionError(f"no reference at {path}: create it with `python -m fastcl.regression update`")
    with open(path) as f:
        ref = json.load(f)
    missing = [k for k in ("seed", "curve", "tolerance", "seeds") if k not in ref]
    if missing:
        raise RegressionError(f"{path}: malformed reference, missing {missing}")
    return ref


def check(path: str = REFERENCE, run_dir: str = "runs/regression/check", progress: bool = False) -> dict:
    """Train the guard run at the reference seed and compare; {"ok", "failures", "notes", "curve", "reference"}."""
    ref = load_reference(path)
    curve = train_curve(ref["seed"], run_dir, progress=progress)
    fails, notes = compare(ref, curve)
    out = {"ok": not fails, "failures": fails, "notes": notes, "curve": curve, "reference": ref["curve"],
           "reference_commit": ref.get("commit")}
    with open(os.path.join(run_dir, "regression_check.json"), "w") as f:
        json.dump(out, f, indent=1)
    return out


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def update(seeds: list[int], path: str = REFERENCE, run_root: str = "runs/regression", progress: bool = True) -> dict:
    """Train the guard run at every seed; write seeds[0]'s curve + the seed-derived tolerance to `path`."""
    import torch

    if len(seeds) < 3:
        raise RegressionError(f"update needs >= 3 seeds to measure the seed noise, got {seeds}")
    curves = {}
    for s in seeds:
        print(f"regression update: seed {s} ({len(curves) + 1}/{len(seeds)})", flush=True)
        curves[s] = train_curve(s, os.path.join(run_root, f"seed{s}"), progress=progress)
        print(f"  kNN {curves[s]['knn']} in {curves[s]['minutes']:.1f} min", flush=True)
    finals = [c["knn"][-1] for c in curves.values()]
    means = [curve_mean(c["knn"]) for c in curves.values()]
    ref = {
        "about": "accuracy regression guard (fastcl/regression.py); written by `python -m fastcl.regression update`",
        "config": os.path.relpath(CONFIG, REPO), "seed": seeds[0], "curve": curves[seeds[0]],
        "seeds": {str(s): c for s, c in curves.items()}, "tolerance": tolerances(finals, means),
        "commit": {"hash": _git("rev-parse", "HEAD"), "subject": _git("log", "-1", "--format=%s"),
                   "uncommitted_changes": bool(_git("status", "--porcelain", "--untracked-files=no"))},
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "threads": THREADS},
    }
    with open(path, "w") as f:
        json.dump(ref, f, indent=1)
        f.write("\n")
    return ref


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastcl.regression", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="train the guard run and compare with the stored reference")
    c.add_argument("--reference", default=REFERENCE)
    c.add_argument("--run-dir", default="runs/regression/check")
    u = sub.add_parser("update", help="re-measure the reference at several seeds and write it")
    u.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    u.add_argument("--reference", default=REFERENCE)
    u.add_argument("--run-root", default="runs/regression")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "check":
            out = check(a.reference, a.run_dir, progress=True)
            ref = out["reference"]
            print(f"epochs     {out['curve']['epochs']}\nreference  {ref['knn']}\nthis run   {out['curve']['knn']}")
            for line in out["notes"]:
                print("note:", line)
            for line in out["failures"]:
                print("REGRESSION:", line)
            print("regression guard:", "holds" if out["ok"] else "FAILED (a change cost accuracy beyond the seed "
                  "noise; if that is intended, commit it and run `python -m fastcl.regression update`)")
            return 0 if out["ok"] else 1
        ref = update(a.seeds, a.reference, a.run_root)
        t = ref["tolerance"]
        print(f"wrote {a.reference}: seed {ref['seed']} curve {ref['curve']['knn']}, tolerance final "
              f"{t['final']} / mean {t['mean']} (3 x sigma over seeds {a.seeds}), commit {ref['commit']['hash'][:10]}")
        return 0
    except RegressionError as e:
        print(f"fastcl.regression: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
