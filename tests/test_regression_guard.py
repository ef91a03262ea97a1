"""Accuracy regression guard (fastcl/regression.py): the stored reference is consistent with the seed runs it was
derived from, the comparison fails on a drop beyond the tolerance, and the guard run itself reproduces the
reference within that tolerance (the check `make test` runs: a change that costs accuracy fails CI)."""
import copy
import json

import pytest

from fastcl import regression
from fastcl.regression import RegressionError, compare, curve_mean, load_reference, tolerances


@pytest.fixture(scope="module")
def ref():
    return load_reference()


def test_reference_is_the_seed_runs_it_claims(ref):
    seeds = ref["seeds"]
    assert len(seeds) >= 3 and ref["curve"] == seeds[str(ref["seed"])]
    finals = [c["knn"][-1] for c in seeds.values()]
    means = [curve_mean(c["knn"]) for c in seeds.values()]
    assert ref["tolerance"] == tolerances(finals, means)  # derived from the seeds, not edited by hand
    assert ref["commit"]["hash"] and ref["config"] == "configs/test/regression.yaml"
    # the guard is only worth running if training moves the curve well beyond the tolerance
    gain = min(c["knn"][-1] - c["knn"][0] for c in seeds.values())
    assert gain > 2 * ref["tolerance"]["final"], (gain, ref["tolerance"])


def test_compare_fails_on_a_drop_beyond_the_tolerance(ref):
    same = copy.deepcopy(ref["curve"])
    assert compare(ref, same) == ([], [])
    tol = ref["tolerance"]
    low = copy.deepcopy(same)
    low["knn"][-1] -= tol["final"] + 0.05
    fails, _ = compare(ref, low)
    assert len(fails) >= 1 and fails[0].startswith("final kNN")
    inside = copy.deepcopy(same)
    inside["knn"][-1] -= 0.5 * tol["final"]
    assert compare(ref, inside)[0] == []
    flat = copy.deepcopy(same)  # a trainer that stopped learning: the curve stays at initialisation
    flat["knn"] = [flat["knn"][0]] * len(flat["knn"])
    assert len(compare(ref, flat)[0]) == 2
    high = copy.deepcopy(same)
    high["knn"] = [v + tol["final"] + tol["mean"] + 1 for v in high["knn"]]
    fails, notes = compare(ref, high)
    assert fails == [] and len(notes) == 2 and "update" in notes[0]
    other = copy.deepcopy(same)
    other["epochs"] = other["epochs"][:-1]
    with pytest.raises(RegressionError, match="regression.yaml changed"):
        compare(ref, other)


def test_missing_or_malformed_reference_is_one_line(tmp_path, capsys):
    assert regression.main(["check", "--reference", str(tmp_path / "none.json")]) == 2
    assert "no reference at" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text(json.dumps({"seed": 0}))
    assert regression.main(["check", "--reference", str(tmp_path / "bad.json")]) == 2
    assert "missing ['curve', 'tolerance', 'seeds']" in capsys.readouterr().err
    assert regression.main(["update", "--seeds", "0", "1", "--reference", str(tmp_path / "r.json")]) == 2
    assert ">= 3 seeds" in capsys.readouterr().err


@pytest.mark.slow
def test_guard_run_holds_the_reference(ref, tmp_path):
    out = regression.check(run_dir=str(tmp_path / "guard"))
    print("guard:", out["curve"], "reference:", ref["curve"]["knn"], out["notes"])
    assert out["ok"], out["failures"]
    assert json.loads((tmp_path / "guard" / "regression_check.json").read_text())["ok"] is True
