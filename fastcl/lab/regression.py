"""Accuracy regression guard: fixed-budget training runs whose kNN is compared with a reference stored in the
repository (tests/regression_reference.json), by `make test` (tests/test_regression_guard.py).

    python -m fastcl.lab.regression check [--paths simclr queue]       train the check seeds of every path, compare
    python -m fastcl.lab.regression update [--seeds 2 3 ...]            re-measure the reference (after a change that
                                                                    moves accuracy on purpose) and record the commit

Two paths, each on the bundled CIFAR-10 sample with kNN (k = 200) on the full 10,000-image CIFAR-10 test split:

  simclr  configs/test/regression.yaml: SimCLR (in-batch negatives, no queue, no teacher); one compared point,
          the final network.
  queue   configs/test/regression_queue.yaml, then configs/test/regression_sce.yaml: MoCo-v2 (momentum queue, EMA
          teacher, key shuffle over split BN) for its first epochs, then SCE (a label-assignment method: a soft
          target from the queue) continues from that checkpoint (trainer.init_from, init_position keep: weights,
          teacher, optimizer, schedule position and queue come along). Two compared points: MoCo-v2 where it
          stops, and SCE's final network.

Statistics. `update` trains every path at n reference seeds; the reference of a point is the MEAN over those
runs and s their sample standard deviation. `check` trains every path at the m CHECK_SEEDS, which are never
reference seeds (so a check is a fresh draw from the same seed distribution, on this machine or another), and
compares their mean with the one-sided prediction bound

    mean - tol,   tol = t_{1 - alpha, n - 1} * s * sqrt(1/m + 1/n)

An unchanged trainer falls below it with probability alpha although s is itself estimated from n runs (the
Student t quantile accounts for that; at n = 5 and one check run, the normal quantile 3.09 with s in place of
sigma false-alarms 2.4 % of the time instead of 0.1 %). alpha = ALPHA_FAMILY / (number of compared points) (Bonferroni), so the whole guard
false-alarms with probability <= ALPHA_FAMILY = 0.1 %. Another machine kind (or BLAS, or torch version) adds
floating-point drift; the guard assumes the seed distribution there has the same mean and spread, which is why
`check` prints a note when the reference was measured in another environment. The reference also records the
power: the probability that a check falls below the bound when the trainer's true mean is DROP = 2 points lower
(noncentral t: (mean - check) / (s sqrt(1/m + 1/n)) has n - 1 degrees of freedom and noncentrality
DROP / (sigma sqrt(1/m + 1/n)), sigma taken as s), for the m check seeds and for a single one, and the drop the
m-seed check catches with probability 0.9.
A check mean above mean + tol passes with a note: accuracy went up, record it with `update`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from fastcl.lab import REPO

REFERENCE = os.path.join(REPO, "tests/regression_reference.json")
SHARED_DATA = os.environ.get("FASTCL_SHARED_DATA", os.path.join(os.path.dirname(REPO), "shared", "data"))
TEST_SET = os.path.join(REPO, "data/extracted/cifar10_test")
THREADS = 1  # torch intra-op threads of the guard runs: fixed, so the result does not depend on the core count
RESOLUTION = 0.01  # kNN is measured on the 10,000 CIFAR-10 test images: one image = 0.01 points
ALPHA_FAMILY = 0.001  # false-alarm probability of the whole guard (all compared points together)
DROP = 2.0  # the accuracy drop (kNN points) whose detection probability the reference reports
# Seeds the check trains and averages (m = 2: one seed alone catches a 2-point drop far less often, see the
# reference's power_one_run). Never reference seeds: the bound is for a draw independent of the reference runs.
CHECK_SEEDS = (0, 1)
# reference seeds of `update`: n = 24. The bound's t quantile at alpha = 0.1 % / 3 is 9.6 at n = 5 (the tolerance
# would be ~10 seed sigmas: a 2-point drop nearly never caught), 5.1 at n = 10, 4.3 at n = 16 and 3.9 at n = 24
DEFAULT_SEEDS = tuple(range(2, 26))


@dataclass(frozen=True)
class Stage:
    """One training run of a guard path: `config`; stop after `stop_epochs` of its schedule (0: all of it);
    `warm`: start from the previous stage's checkpoint (trainer.init_from, the config's init_position)."""
    name: str
    config: str
    stop_epochs: int = 0
    warm: bool = False


PATHS = {
    "simclr": (Stage("simclr", "configs/test/regression.yaml"),),
    "queue": (Stage("mocov2", "configs/test/regression_queue.yaml", stop_epochs=2),
              Stage("sce", "configs/test/regression_sce.yaml", warm=True)),
}


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


def knn_of(run_dir: str) -> float:
    """kNN top-1 (%) of the backbone in `run_dir`'s newest checkpoint: the training run's own KnnMonitor (its
    config's bank, held-out split, k and T), called once on the final network. The guard configs keep the monitor
    off during training (knn_every = 0), so a check pays for one evaluation per compared point."""
    from fastcl.checkpoint import load_encoder
    from fastcl.eval.monitor import KnnMonitor

    enc, cfg = load_encoder(run_dir)
    cfg.trainer.knn_every = 1  # KnnMonitor is enabled by it
    return round(KnnMonitor(cfg)(enc.backbone)["knn_top1"], 2)


def points(path: str) -> list[str]:
    """Names of the compared points of a path: each stage's final network, '<stage> epoch <E>'."""
    from fastcl.config import load_config

    out = []
    for st in PATHS[path]:
        cfg = load_config(os.path.join(REPO, st.config))
        out.append(f"{st.name} epoch {st.stop_epochs or cfg.trainer.epochs}")
    return out


def train_path(path: str, seed: int, run_root: str, progress: bool = False, with_init: bool = False) -> dict:
    """Train every stage of guard path `path` at `seed` under `run_root` (from scratch) and evaluate each stage's
    final network: {"knn": [one per point], "minutes": wall, "cpu_s": process CPU seconds (all threads)}.

    with_init (update): the first stage's monitor also evaluates the random initialisation ("init"), which the
    test uses to show that a trainer that stops learning fails; the check does not pay for it.
    """
    import torch

    from fastcl.config import load_config
    from fastcl.lab.demo import ensure_sample
    from fastcl.lab.study.cli import steps_per_epoch
    from fastcl.train import train

    ensure_sample()
    ensure_test_set()
    run_root = os.path.abspath(run_root)
    shutil.rmtree(run_root, ignore_errors=True)  # always from scratch: a resumed run is another run
    cwd, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(REPO)  # the guard configs use repo-relative paths
    torch.set_num_threads(THREADS)
    out, prev = {"knn": []}, None
    t0, c0 = time.time(), time.process_time()
    try:
        for i, st in enumerate(PATHS[path]):
            run_dir = os.path.join(run_root, st.name)
            over = [f"trainer.seed={seed}", f"trainer.run_dir={run_dir}", f"trainer.progress={str(progress).lower()}"]
            if st.warm:
                over.append(f"trainer.init_from={prev}")
            if with_init and i == 0:  # the monitor at step 0 (and once more at the end, not used)
                over.append("trainer.knn_every=1000")
            if st.stop_epochs:  # the schedule spans the config's epochs; this stage runs the first stop_epochs
                cfg = load_config(st.config, over)
                over.append(f"trainer.max_steps={st.stop_epochs * steps_per_epoch(cfg)}")
            train(load_config(st.config, over))
            out["knn"].append(knn_of(run_dir))
            if with_init and i == 0:
                with open(os.path.join(run_dir, "metrics.jsonl")) as f:
                    out["init"] = next(round(r["knn_top1"], 2) for r in map(json.loads, f) if "knn_top1" in r)
            prev = run_dir
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    out["minutes"] = round((time.time() - t0) / 60, 2)
    out["cpu_s"] = round(time.process_time() - c0, 1)
    return out


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def bound(values: list[float], m: int, n_points: int) -> dict:
    """Reference statistics of one point from its n seed runs `values`, for a check averaging m seeds:
    {"n", "mean", "s", "alpha", "t", "tol", "power", "power_one_run", "drop_90"} (module docstring; drop_90: the
    drop caught with probability 0.9). tol is floored at the measurement's resolution (one test image)."""
    from scipy import stats
    from scipy.optimize import brentq

    from fastcl.lab.study.stats import mean_std

    ms = mean_std(values)
    n, s = ms["n"], ms["std"]
    alpha = ALPHA_FAMILY / n_points
    t = float(stats.t.ppf(1 - alpha, n - 1))

    def tol_power(k: int) -> tuple[float, float]:
        se = s * math.sqrt(1 / k + 1 / n)
        tol = max(t * se, RESOLUTION)
        power = float(stats.nct.sf(tol / se, n - 1, DROP / se)) if se > 0 else 1.0
        return tol, power

    tol, power = tol_power(m)
    power_one_run = tol_power(1)[1]
    se = s * math.sqrt(1 / m + 1 / n)
    # the drop the m-seed check catches with probability 0.9 (same noncentral t, solved for the drop)
    drop_90 = brentq(lambda d: stats.nct.sf(tol / se, n - 1, d / se) - 0.9, 0.0, 100 * se + 1.0) if se > 0 else tol
    return {"n": n, "mean": round(ms["mean"], 3), "s": round(s, 3), "alpha": round(alpha, 6), "t": round(t, 3),
            "tol": round(tol, 3), "power": round(power, 3), "power_one_run": round(power_one_run, 3),
            "drop_90": round(drop_90, 2)}


def statistics(seed_runs: dict, m: int = len(CHECK_SEEDS)) -> list[dict]:
    """bound() of every point of a path from its {seed: run} reference runs; the number of compared points of
    the whole guard (every point of every path) sets each point's alpha."""
    n_points = sum(len(st) for st in PATHS.values())
    k = len(next(iter(seed_runs.values()))["knn"])
    return [bound([r["knn"][i] for r in seed_runs.values()], m, n_points) for i in range(k)]


def environment() -> dict:
    """What the floating-point order of a guard run depends on, recorded with the reference and compared by
    check: torch version, CPU model and architecture, torch threads (plus informative platform/python/cores)."""
    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"torch": torch.__version__, "cpu_model": cpu or "unknown", "machine": platform.machine(),
            "threads": THREADS, "platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count()}


ENV_KEYS = ("torch", "cpu_model", "machine", "threads")  # the ones check compares


def environment_differences(ref_env: dict, now: dict) -> list[str]:
    """'key: reference X, here Y' for each ENV_KEYS entry that differs (a missing one counts as different)."""
    return [f"{k}: reference {ref_env.get(k, 'not recorded')!r}, here {now.get(k)!r}"
            for k in ENV_KEYS if ref_env.get(k) != now.get(k)]


def load_reference(path: str = REFERENCE) -> dict:
    if not os.path.isfile(path):
        raise RegressionError(f"no reference at {path}: create it with `python -m fastcl.lab.regression update`")
    with open(path) as f:
        ref = json.load(f)
    missing = [k for k in ("paths", "check_seeds", "environment") if k not in ref]
    if missing:
        raise RegressionError(f"{path}: malformed reference, missing {missing} (written by an older fastcl: run "
                              f"`python -m fastcl.lab.regression update`)")
    for name, p in ref["paths"].items():
        gone = [k for k in ("points", "seeds", "reference") if k not in p]
        if gone or name not in PATHS:
            raise RegressionError(f"{path}: malformed reference path {name!r}" + (f", missing {gone}" if gone else
                                                                                   f", not one of {list(PATHS)}"))
    return ref


def compare(ref: dict, results: dict) -> tuple[list[str], list[str]]:
    """(failures, notes) of check results {path: {"points": [...], "knn": [check mean per point]}} against the
    reference; no failures = the guard holds."""
    fails, notes = [], []
    for name, res in results.items():
        rp = ref["paths"].get(name)
        if rp is None:
            raise RegressionError(f"the reference has no path {name!r}: run `python -m fastcl.lab.regression update`")
        if res["points"] != rp["points"]:
            raise RegressionError(f"path {name}: the check evaluated {res['points']}, the reference "
                                  f"{rp['points']}: its configs changed; run `python -m fastcl.lab.regression update`")
        for point, now, st in zip(res["points"], res["knn"], rp["reference"]):
            line = (f"{name}: {point}: {now:.2f} % vs reference {st['mean']:.2f} % ({now - st['mean']:+.2f}, "
                    f"tolerance {st['tol']:.2f})")
            if now < st["mean"] - st["tol"]:
                fails.append(line)
            elif now > st["mean"] + st["tol"]:
                notes.append(line + ": above the reference; record it with `python -m fastcl.lab.regression update`")
    return fails, notes


def check(path: str = REFERENCE, run_dir: str = "runs/regression/check", paths: list[str] | None = None,
          progress: bool = False) -> dict:
    """Train every path (or `paths`) at the reference's check seeds and compare the mean per point:
    {"ok", "failures", "notes", "environment_notes", "results", "reference_commit"}; also written to
    <run_dir>/regression_check.json."""
    ref = load_reference(path)
    env_notes = environment_differences(ref["environment"], environment())
    results = {}
    for name in paths or list(ref["paths"]):
        if name not in ref["paths"]:
            raise RegressionError(f"the reference has no path {name!r} (it has {list(ref['paths'])})")
        runs = {s: train_path(name, s, os.path.join(run_dir, name, f"seed{s}"), progress=progress)
                for s in ref["check_seeds"]}
        k = len(ref["paths"][name]["points"])
        results[name] = {"points": points(name), "seeds": {str(s): r for s, r in runs.items()},
                         "knn": [round(mean([r["knn"][i] for r in runs.values()]), 3) for i in range(k)],
                         "minutes": round(sum(r["minutes"] for r in runs.values()), 2),
                         "cpu_s": round(sum(r["cpu_s"] for r in runs.values()), 1)}
    fails, notes = compare(ref, results)
    out = {"ok": not fails, "failures": fails, "notes": notes, "environment_notes": env_notes, "results": results,
           "reference_commit": ref.get("commit")}
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "regression_check.json"), "w") as f:
        json.dump(out, f, indent=1)
    return out


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def update(seeds: list[int], path: str = REFERENCE, run_root: str = "runs/regression", progress: bool = True) -> dict:
    """Train every path at every reference seed (with the initialisation's kNN) and at the check seeds (what the
    check gives on this machine: recorded, not used by the statistics); write the reference to `path`."""
    if len(seeds) < 3:
        raise RegressionError(f"update needs >= 3 seeds to measure the seed noise, got {seeds}")
    if set(seeds) & set(CHECK_SEEDS) or len(set(seeds)) != len(seeds):
        raise RegressionError(f"reference seeds {seeds} must be distinct and exclude the check seeds "
                              f"{list(CHECK_SEEDS)} (the bound is for a check independent of the reference runs)")
    # the commit whose code the runs measure: read before they start (a commit made meanwhile is not theirs)
    commit = {"hash": _git("rev-parse", "HEAD"), "subject": _git("log", "-1", "--format=%s"),
              "uncommitted_changes": bool(_git("status", "--porcelain", "--untracked-files=no"))}
    out = {}
    for name in PATHS:
        runs, here = {}, {}
        for s in list(seeds) + list(CHECK_SEEDS):
            print(f"regression update: {name} seed {s}", flush=True)
            r = train_path(name, s, os.path.join(run_root, name, f"seed{s}"), progress=progress, with_init=True)
            (here if s in CHECK_SEEDS else runs)[str(s)] = r
            print(f"  kNN init {r['init']} -> {r['knn']} in {r['minutes']:.1f} min ({r['cpu_s']:.0f} CPU s)",
                  flush=True)
        out[name] = {"configs": [st.config for st in PATHS[name]], "points": points(name), "seeds": runs,
                     "reference": statistics(runs), "check_seeds_here": here}
    ref = {
        "about": "accuracy regression guard (fastcl/lab/regression.py); written by `python -m fastcl.lab.regression update`",
        "check_seeds": list(CHECK_SEEDS),
        "statistics": {"alpha_family": ALPHA_FAMILY, "drop": DROP, "m": len(CHECK_SEEDS),
                       "bound": "one-sided prediction bound mean - t_{1-alpha,n-1} * s * sqrt(1/m + 1/n), "
                                "alpha = alpha_family / compared points (Bonferroni)",
                       "power": "noncentral t, n - 1 degrees of freedom, noncentrality drop / (s sqrt(1/m + 1/n)); "
                                "power_one_run: the same for a check of one seed; drop_90: the drop the m-seed "
                                "check catches with probability 0.9"},
        "paths": out,
        "commit": commit,
        "date": time.strftime("%Y-%m-%d"),
        "environment": environment(),
    }
    with open(path, "w") as f:
        json.dump(ref, f, indent=1)
        f.write("\n")
    return ref


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastcl.lab.regression", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="train the guard paths at the check seeds and compare with the reference")
    c.add_argument("--reference", default=REFERENCE)
    c.add_argument("--run-dir", default="runs/regression/check")
    c.add_argument("--paths", nargs="+", choices=list(PATHS), default=None, help="default: every path")
    u = sub.add_parser("update", help="re-measure the reference at several seeds and write it")
    u.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS))
    u.add_argument("--reference", default=REFERENCE)
    u.add_argument("--run-root", default="runs/regression")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "check":
            ref = load_reference(a.reference)
            out = check(a.reference, a.run_dir, a.paths, progress=True)
            for name, res in out["results"].items():
                rp = ref["paths"][name]
                print(f"{name} ({res['minutes']:.1f} min, {res['cpu_s']:.0f} CPU s for seeds {ref['check_seeds']}):")
                there = rp.get("check_seeds_here", {})
                for i, (point, st) in enumerate(zip(res["points"], rp["reference"])):
                    each = " / ".join(f"{r['knn'][i]:.2f}" for r in res["seeds"].values())
                    was = " / ".join(f"{r['knn'][i]:.2f}" for r in there.values())
                    print(f"  {point:18s} this check {res['knn'][i]:6.2f} ({each})   reference {st['mean']:.2f} "
                          f"(n {st['n']}, s {st['s']:.2f}), fails below {st['mean'] - st['tol']:.2f}"
                          + (f"; the same seeds where the reference was measured: {was}" if was else ""))
            for line in out["environment_notes"]:
                print("note: the reference was measured in another environment, its tolerance calibrated there:", line)
            for line in out["notes"]:
                print("note:", line)
            for line in out["failures"]:
                print("REGRESSION:", line)
            print("regression guard:", "holds" if out["ok"] else "FAILED (a change cost accuracy beyond the seed "
                  "noise; if that is intended, commit it and run `python -m fastcl.lab.regression update`)")
            return 0 if out["ok"] else 1
        ref = update(a.seeds, a.reference, a.run_root)
        print(f"wrote {a.reference} (commit {ref['commit']['hash'][:10]}, reference seeds {a.seeds}, check seeds "
              f"{ref['check_seeds']}):")
        for name, p in ref["paths"].items():
            for point, st in zip(p["points"], p["reference"]):
                print(f"  {name}: {point}: mean {st['mean']:.2f} s {st['s']:.2f} (n {st['n']}) tol {st['tol']:.2f} "
                      f"power({DROP:g} points) {st['power']:.2f} with {len(ref['check_seeds'])} check seeds, "
                      f"{st['power_one_run']:.2f} with one; 90 % power at a {st['drop_90']:.2f}-point drop")
        return 0
    except RegressionError as e:
        print(f"fastcl.lab.regression: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
