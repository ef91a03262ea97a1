"""Accuracy regression guard (fastcl/lab/regression.py): the stored reference is consistent with the seed runs it was
derived from, the prediction bound has the false-alarm rate it claims, the comparison fails on a drop beyond the
tolerance, another environment is a note and not a failure, and both guard paths (SimCLR; MoCo-v2 -> SCE on the
queue) reproduce the reference within the tolerance at the check seeds (the check `make test` runs: a change that
costs accuracy fails CI)."""
import copy
import json
import math

import numpy as np
import pytest
from scipy import stats

from fastcl.lab import regression
from fastcl.lab.regression import (CHECK_SEEDS, PATHS, RegressionError, bound, compare, environment,
                               environment_differences, load_reference, statistics)


@pytest.fixture(scope="module")
def ref():
    return load_reference()


def _as_check(ref, shift=0.0):
    """Check results equal to the reference means (+ shift) for every path."""
    return {name: {"points": list(p["points"]), "knn": [st["mean"] + shift for st in p["reference"]]}
            for name, p in ref["paths"].items()}


def test_reference_is_the_seed_runs_it_claims(ref):
    assert set(ref["paths"]) == set(PATHS) and ref["check_seeds"] == list(CHECK_SEEDS)
    for name, p in ref["paths"].items():
        assert p["configs"] == [st.config for st in PATHS[name]] and p["points"] == regression.points(name)
        seeds = p["seeds"]
        assert len(seeds) >= 3 and not set(seeds) & {str(s) for s in CHECK_SEEDS}
        assert p["reference"] == statistics(seeds)  # derived from the seeds, not edited by hand
        for st in p["reference"]:
            assert st["n"] == len(seeds) and st["alpha"] == pytest.approx(regression.ALPHA_FAMILY / 3, rel=1e-3)
        # the guard is only worth running if training moves every point beyond its tolerance: a check at the
        # reference seeds' mean initialisation kNN (a trainer that stopped learning) fails every point
        init = sum(r["init"] for r in seeds.values()) / len(seeds)
        for st in p["reference"]:
            assert st["mean"] - st["tol"] > init, (name, init, st)
    assert ref["commit"]["hash"] and set(regression.ENV_KEYS) <= set(ref["environment"])


def test_bound_is_the_t_prediction_bound():
    vals = [30.0, 31.0, 29.5, 30.5, 30.2]
    b = bound(vals, m=2, n_points=3)
    s = float(np.std(vals, ddof=1))
    t = stats.t.ppf(1 - 0.001 / 3, 4)
    assert b["n"] == 5 and b["mean"] == pytest.approx(30.24, abs=1e-3) and b["s"] == pytest.approx(s, abs=1e-3)
    assert b["tol"] == pytest.approx(t * s * math.sqrt(1 / 2 + 1 / 5), abs=1e-3)
    one = bound(vals, m=1, n_points=3)
    assert one["tol"] > b["tol"] and one["power"] == b["power_one_run"] < b["power"]
    # more reference seeds: a smaller t quantile, a tighter bound, more power
    more = bound(vals * 4, m=2, n_points=3)
    assert more["t"] < b["t"] and more["power"] > b["power"]


def test_bound_false_alarms_at_alpha_and_catches_a_drop_at_its_power():
    """Monte Carlo: fresh references of n seed runs and fresh checks of m runs, all N(0, 1) (alpha 0.05 here so
    that 20,000 draws measure it); a normal bound with s in place of sigma would false-alarm more often."""
    rng = np.random.default_rng(0)
    n, m, trials, alpha = 5, 2, 20000, 0.05
    refs = rng.normal(size=(trials, n))
    checks = rng.normal(size=(trials, m)).mean(1)
    mu, s = refs.mean(1), refs.std(1, ddof=1)
    se = s * math.sqrt(1 / m + 1 / n)
    rate = float(np.mean(checks < mu - stats.t.ppf(1 - alpha, n - 1) * se))
    naive = float(np.mean(checks < mu - stats.norm.ppf(1 - alpha) * s * math.sqrt(1 / m)))
    assert abs(rate - alpha) < 0.006 and naive > 2 * alpha, (rate, naive)
    drop = 1.5  # in sigma units: the noncentral t gives the probability of catching it
    caught = float(np.mean(checks - drop < mu - stats.t.ppf(1 - alpha, n - 1) * se))
    power = stats.nct.sf(stats.t.ppf(1 - alpha, n - 1), n - 1, drop / math.sqrt(1 / m + 1 / n))
    assert abs(caught - power) < 0.015, (caught, power)


def test_compare_fails_on_a_drop_beyond_the_tolerance(ref):
    same = _as_check(ref)
    assert compare(ref, same) == ([], [])
    for name, p in ref["paths"].items():
        for i, st in enumerate(p["reference"]):
            low = copy.deepcopy(same)
            low[name]["knn"][i] -= st["tol"] + 0.05
            fails, _ = compare(ref, low)
            assert len(fails) == 1 and fails[0].startswith(f"{name}: {p['points'][i]}")
            inside = copy.deepcopy(same)
            inside[name]["knn"][i] -= 0.5 * st["tol"]
            assert compare(ref, inside)[0] == []
    # a trainer that stopped learning: every point at the initialisation's kNN
    flat = {name: {"points": list(p["points"]),
                   "knn": [sum(r["init"] for r in p["seeds"].values()) / len(p["seeds"])] * len(p["points"])}
            for name, p in ref["paths"].items()}
    assert len(compare(ref, flat)[0]) == sum(len(p["points"]) for p in ref["paths"].values())
    high = _as_check(ref, shift=max(st["tol"] for p in ref["paths"].values() for st in p["reference"]) + 1)
    fails, notes = compare(ref, high)
    assert fails == [] and len(notes) == 3 and "update" in notes[0]
    other = copy.deepcopy(same)
    other["queue"]["points"] = other["queue"]["points"][:-1]
    with pytest.raises(RegressionError, match="configs changed"):
        compare(ref, other)


def test_another_environment_is_a_note_not_a_failure():
    here = environment()
    assert environment_differences(here, here) == []
    elsewhere = {**here, "torch": "1.0.0", "cpu_model": "Some Other CPU", "threads": 8}
    diffs = environment_differences(elsewhere, here)
    assert [d.split(":")[0] for d in diffs] == ["torch", "cpu_model", "threads"]
    assert "reference '1.0.0'" in diffs[0]
    assert environment_differences({}, here)[0].startswith("torch: reference 'not recorded'")


def test_missing_or_malformed_reference_is_one_line(tmp_path, capsys):
    assert regression.main(["check", "--reference", str(tmp_path / "none.json")]) == 2
    assert "no reference at" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text(json.dumps({"seed": 0, "curve": {}}))
    assert regression.main(["check", "--reference", str(tmp_path / "bad.json")]) == 2
    assert "missing ['paths', 'check_seeds', 'environment']" in capsys.readouterr().err
    assert regression.main(["update", "--seeds", "2", "3", "--reference", str(tmp_path / "r.json")]) == 2
    assert ">= 3 seeds" in capsys.readouterr().err
    assert regression.main(["update", "--seeds", "0", "2", "3", "--reference", str(tmp_path / "r.json")]) == 2
    assert "exclude the check seeds" in capsys.readouterr().err


@pytest.mark.slow
def test_guard_runs_hold_the_reference(ref, tmp_path, capsys):
    """Both paths at the check seeds (about 110 CPU seconds in all on the 2-core machine): the check `make test`
    runs. A reference from another environment prints a note but does not fail on that alone."""
    assert regression.main(["check", "--run-dir", str(tmp_path / "guard")]) == 0, capsys.readouterr().out
    out = json.loads((tmp_path / "guard" / "regression_check.json").read_text())
    print(capsys.readouterr().out)
    assert out["ok"] is True and set(out["results"]) == set(PATHS)
    assert all(len(r["seeds"]) == len(CHECK_SEEDS) for r in out["results"].values())
