"""`python -m fastcl.lab.study` on synthetic data (configs/test/tiny.yaml): a 2-method x 2-seed study, its statistics,
skipping finished runs and resuming an interrupted study, the warm protocol, and one-line errors."""
import json
import math
import os
import shutil

import pytest

from fastcl.lab.study import main
from fastcl.lab.study.stats import mean_std, paired_difference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs/test/tiny.yaml")


def _study(out, *extra):
    return main(["--config", TINY, "--methods", "mocov2", "oracle", "--seeds", "0", "1", "--epochs", "2",
                 "--out", str(out), *extra])


def test_paired_difference_is_a_student_t_interval():
    d = paired_difference({0: 11.0, 1: 12.0, 2: 16.0}, {0: 10.0, 1: 10.0, 2: 10.0, 3: 9.0})
    assert d["seeds"] == [0, 1, 2] and d["mean"] == pytest.approx(3.0) and d["std"] == pytest.approx(2.6458, 1e-4)
    half = 4.302653 * 2.6457513 / math.sqrt(3)  # t_{0.975, 2}
    assert (d["ci_low"], d["ci_high"]) == pytest.approx((3 - half, 3 + half), 1e-5) and d["in_noise"] is True
    tight = paired_difference({0: 11.0, 1: 11.1, 2: 10.9}, {0: 10.0, 1: 10.0, 2: 10.0})
    assert tight["in_noise"] is False and tight["ci_low"] > 0
    assert paired_difference({0: 1.0}, {0: 0.0})["in_noise"] is None and math.isnan(mean_std([3.0])["std"])


def test_study_summarises_skips_and_resumes(tmp_path, capsys):
    out = tmp_path / "study"
    assert _study(out) == 0
    root = out / "scratch"
    summary = json.loads((root / "summary.json").read_text())
    m = summary["methods"]
    assert set(m) == {"mocov2", "oracle"} and m["oracle"]["seeds"] == [0, 1]
    for k in ("200", "20"):
        vals = list(m["oracle"][f"knn{k}"]["per_seed"].values())
        assert m["oracle"][f"knn{k}"]["mean"] == pytest.approx(sum(vals) / 2)
        ref = m["mocov2"][f"knn{k}"]["per_seed"]
        diff = [m["oracle"][f"knn{k}"]["per_seed"][s] - ref[s] for s in ref]
        assert m["oracle"][f"diff{k}"]["mean"] == pytest.approx(sum(diff) / 2)
    md = (root / "summary.md").read_text()
    assert "| oracle |" in md and "95 % CI" in md and (root / "knn.png").stat().st_size > 1000
    first = capsys.readouterr().out
    assert first.count(": fresh,") == 4

    # simulate an interruption: oracle/seed1 killed after its epoch-1 checkpoint, mocov2/seed1 never started
    killed = root / "oracle" / "seed1"
    (killed / "result.json").unlink()
    shutil.rmtree(killed / "checkpoints" / "step_00000008")
    lines = [ln for ln in (killed / "metrics.jsonl").read_text().splitlines() if json.loads(ln)["step"] <= 4]
    (killed / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    shutil.rmtree(root / "mocov2" / "seed1")
    done = (root / "oracle" / "seed0" / "result.json").stat().st_mtime_ns
    assert _study(out) == 0
    log = capsys.readouterr().out
    assert "[2/4] oracle seed 0: done, skipped" in log and "mocov2 seed 1: fresh" in log
    assert "oracle seed 1: resumed" in log and log.count("skipped") == 2
    assert (root / "oracle" / "seed0" / "result.json").stat().st_mtime_ns == done  # not retrained
    again = json.loads((root / "summary.json").read_text())["methods"]
    for v in ("mocov2", "oracle"):  # resumed / rerun runs are exact: the same study
        for k in ("200", "20"):
            assert again[v][f"knn{k}"]["per_seed"] == m[v][f"knn{k}"]["per_seed"], (v, k)
    # a run made by other training code is trained again (its recorded fingerprint differs); the others stay
    spec = root / "mocov2" / "seed0" / "study_spec.json"
    rec = json.loads(spec.read_text())
    assert rec["code"] and rec["commit"]
    spec.write_text(json.dumps({**rec, "code": "0" * 16}))
    assert _study(out) == 0
    log = capsys.readouterr().out
    assert "the training code changed since this run" in log and "mocov2 seed 0: fresh" in log
    assert log.count("skipped") == 3 and json.loads(spec.read_text())["code"] == rec["code"]
    # another budget in the same --out is refused instead of silently reusing the runs
    assert _study(out, "optim.lr=0.1") == 2
    assert "trained with other settings" in capsys.readouterr().err


def test_code_fingerprint_covers_what_a_run_imports(tmp_path):
    """The fingerprint is the parsed import closure of the training entry points and the run's method: comments
    and docstrings do not count, another method's file and the lab do not count, a deferred import does."""
    from fastcl.lab.study.runs import code_fingerprint

    def put(rel: str, text: str) -> None:  # PKG: a small package named like ours, in tmp_path only
        path = tmp_path / rel.replace("PKG", "fastcl")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.replace("PKG", "fastcl"))

    put("PKG/__init__.py", "")
    put("PKG/train.py", "from PKG import methods\nfrom PKG.step import run\n")
    put("PKG/step.py", '"""doc"""\ndef run(x):\n    """doc"""\n    from PKG.late import g\n    return g(x) + 1\n')
    put("PKG/late.py", "def g(x):\n    return x\n")
    put("PKG/methods/__init__.py", "from PKG.methods.a import A\nfrom PKG.methods.b import B\n")
    put("PKG/methods/base.py", "class Base: pass\n")
    put("PKG/methods/a.py", "from PKG.methods.base import Base\nclass A(Base): pass\n")
    put("PKG/methods/b.py", "from PKG.methods.base import Base\nclass B(Base): pass\n")
    put("PKG/lab/__init__.py", "")
    put("PKG/lab/tool.py", "X = 1\n")

    def fp(method="a"):
        return code_fingerprint("fastcl" + ".methods." + method, root=str(tmp_path))

    a, b = fp(), fp("b")
    assert a != b  # each run covers its own method
    put("PKG/step.py", '"""other doc"""\n# a comment\ndef run(x):\n    from PKG.late import g  # why\n'
                       '    return g(x) + 1\n')
    put("PKG/lab/tool.py", "X = 2\n")  # the lab is not training code
    put("PKG/methods/b.py", "from PKG.methods.base import Base\nclass B(Base):\n    x = 1\n")
    assert fp() == a and fp("b") != b
    put("PKG/late.py", "def g(x):\n    return x * 2\n")  # reached only by a deferred import
    assert fp() != a
    a = fp()
    put("PKG/methods/base.py", "class Base:\n    y = 0\n")  # shared by every method
    assert fp() != a


def test_warm_protocol_shares_one_base_per_seed(tmp_path, capsys):
    out = tmp_path / "warm"
    assert main(["--config", TINY, "--methods", "mocov2", "--seeds", "0", "--epochs", "1", "--protocol", "warm",
                 "--warm-epochs", "1", "--out", str(out)]) == 0
    root = out / "warm"
    base = json.loads((root / "_base" / "seed0" / "result.json").read_text())
    cont = json.loads((root / "mocov2" / "seed0" / "result.json").read_text())
    assert base["steps"] == 4 and cont["steps"] == 8  # E0 = 1 epoch of 4 steps, then E1 = 1 more
    steps = [json.loads(ln)["step"] for ln in (root / "mocov2" / "seed0" / "metrics.jsonl").read_text().splitlines()
             if "loss" in ln]
    assert steps == [5, 6, 7, 8]


@pytest.mark.parametrize("extra,needle", [
    (["--protocol", "warm"], "--warm-epochs"),
    (["--seeds", "0", "0"], "--seeds"),
    (["--precisions", "0"], "--precisions"),
    (["--methods", "byol"], "invalid choice"),
])
def test_bad_arguments_are_one_line(tmp_path, capsys, extra, needle):
    with pytest.raises(SystemExit) as e:
        _study(tmp_path, *extra)
    assert e.value.code == 2 and needle in capsys.readouterr().err


def test_bad_config_and_folders_are_one_line(tmp_path, capsys):
    assert _study(tmp_path, "optim.lrr=1") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastcl.lab.study: error:") and "optim.lrr" in err and len(err.splitlines()) == 1
    assert _study(tmp_path, "data.backend=torch", f"data.path={tmp_path}") == 2
    assert "--test" in capsys.readouterr().err
    assert not (tmp_path / "scratch").exists()


def test_overrides_may_follow_list_options():
    from fastcl.lab.study.cli import parse
    a = parse(["--precisions", "1", "0.5", "data.path=x", "--sweep", "fn-precision", "optim.lr=0.1"])
    assert a.precisions == [1.0, 0.5] and a.sweep == ["fn-precision"] and a.overrides == ["data.path=x", "optim.lr=0.1"]


def test_ladder_protocol_rungs_continuations_and_resume(tmp_path, capsys):
    """--protocol ladder: one MoCo-v2 base whose end-of-epoch checkpoints at --rungs survive ckpt_keep (pinned),
    each rung measured (rungs.json), then every method x seed continues E1 epochs from every rung with its own
    schedule and seeded RNG (trainer.init_position=reset). An interrupted base resumes; finished runs are skipped."""
    out = tmp_path / "ladder"
    args = ["--config", TINY, "--protocol", "ladder", "--rungs", "1", "2", "--epochs", "1", "--seeds", "0", "1",
            "--out", str(out), "trainer.ckpt_every=1", "trainer.ckpt_keep=1", "trainer.keep_epochs=[1,2]"]
    assert main(args + ["--methods", "mocov2", "--base-only"]) == 0
    root = out / "ladder"
    base = root / "_base"
    metas = [json.loads((p / "fastcl_meta.json").read_text()) for p in sorted((base / "checkpoints").iterdir())]
    assert sorted((m["epoch"], m["batches_done"]) for m in metas) == [(1, 0), (2, 0)]  # rungs pinned, rest pruned
    rungs = json.loads((root / "rungs.json").read_text())["rungs"]
    assert [r["epoch"] for r in rungs] == [1, 2] and all(0 <= r["knn"]["200"] <= 100 for r in rungs)
    assert not (root / "e1").exists()  # --base-only: no continuation
    # interrupt the base after its first rung: the same command resumes it and keeps the rung
    (base / "result.json").unlink()
    shutil.rmtree(next(p for p, m in zip(sorted((base / "checkpoints").iterdir()), metas) if m["epoch"] == 2))
    capsys.readouterr()
    full = args + ["--methods", "mocov2", "sce", "--sweep", "fn-precision", "--precisions", "1", "0.5"]
    assert main(full) == 0
    log = capsys.readouterr().out
    # 2 rungs x 4 methods (the sweep brings IFND and the oracle) x 2 seeds, then the p = 0.5 point at one rung
    assert "ladder base resumed" in log and log.count("training") == 18
    for r in (1, 2):
        summary = json.loads((root / f"e{r}" / "summary.json").read_text())["methods"]
        assert {"mocov2", "sce", "ifnd", "oracle"} <= set(summary) and summary["sce"]["seeds"] == [0, 1]
        steps = [json.loads(ln)["step"] for ln in (root / f"e{r}" / "sce" / "seed0" / "metrics.jsonl").read_text()
                 .splitlines() if '"loss"' in ln]
        assert steps == [1, 2, 3, 4]  # its own E1 = 1 epoch of 4 steps, from step 0
    mp = json.loads((root / "map.json").read_text())
    at = mp["break_even"]["rung"]
    oracle = {row["epoch"]: row["diff"]["oracle"] for row in mp["rows"]}
    assert at == next((r for r in (1, 2) if oracle[r]["ci_low"] > 0), 2)  # lowest paying rung, else the top one
    assert "oracle_p0.5" in json.loads((root / f"e{at}" / "summary.json").read_text())["methods"]
    assert not (root / f"e{3 - at}" / "oracle_p0.5").exists()  # the sweep runs at one rung only
    assert [row["epoch"] for row in mp["rows"]] == [1, 2] and mp["comparisons"] == 3 * 2  # sce, ifnd, oracle
    for row in mp["rows"]:  # the map's cell is the paired difference of the rung's runs
        ref = {s: json.loads((root / f"e{row['epoch']}" / "mocov2" / f"seed{s}" / "study_knn.json").read_text())
               ["top1"]["200"] for s in (0, 1)}
        sce = {s: json.loads((root / f"e{row['epoch']}" / "sce" / f"seed{s}" / "study_knn.json").read_text())
               ["top1"]["200"] for s in (0, 1)}
        assert row["diff"]["sce"]["mean"] == pytest.approx(sum(sce[s] - ref[s] for s in (0, 1)) / 2)
        assert 0 <= row["diagnostics"]["queue_same_class"] <= 1  # MoCo-v2's logged fn_share
        b = row["diff"]["sce"]["bonferroni"]  # wider than the 95 % interval (level 1 - 0.05/6)
        assert b["ci_low"] <= row["diff"]["sce"]["ci_low"] and b["ci_high"] >= row["diff"]["sce"]["ci_high"]
    assert set(mp["readings"]) == {"sce", "ifnd", "oracle"} and (root / "map.png").is_file()
    assert "Break-even" in (root / "map.md").read_text()
    losses = [[json.loads(ln)["loss"] for ln in (root / "e2" / "mocov2" / f"seed{s}" / "metrics.jsonl").read_text()
               .splitlines() if '"loss"' in ln] for s in (0, 1)]
    assert losses[0] != losses[1]  # the seeds draw their own augmentations and order after the rung
    assert main(full) == 0  # everything finished: skipped
    assert "done, skipped" in capsys.readouterr().out


def test_break_even_reading_of_the_precision_sweep():
    from fastcl.lab.study.payoff import break_even, sweep_rung

    def pt(p, mean, low):
        return {"precision": p, "diff": {"mean": mean, "ci_low": low}}
    # gains 2.0 at p = 1, 1.0 at 0.75, -1.0 at 0.5: the mean crosses 0 halfway between 0.5 and 0.75
    r = break_even([pt(0.5, -1.0, -2.0), pt(1, 2.0, 0.5), pt(0.75, 1.0, -0.1)])
    assert r["interpolated"] == pytest.approx(0.625) and r["lowest_paying"] == 1
    assert break_even([pt(1, -0.2, -1.0), pt(0.5, 0.3, -0.5)]) == {"interpolated": None, "lowest_paying": None}
    assert break_even([pt(1, 1.0, 0.2), pt(0.5, 0.4, 0.1)])["lowest_paying"] == 0.5  # still paying at the lowest p
    assert sweep_rung([2, 5, 10], {2: {"ci_low": -0.3}, 5: {"ci_low": 0.1}, 10: {"ci_low": 0.4}}) == 5
    assert sweep_rung([2, 5, 10], {2: {"ci_low": -0.3}, 5: {"ci_low": float("nan")}}) == 10  # none pays: the top


def test_map_plot_keeps_a_far_loss_off_the_axis(tmp_path):
    """One method losing 20 points must not flatten the others: the axis spans 0 and the intervals within FAR,
    and the far point is drawn at the edge (the plot still writes)."""
    from fastcl.lab.study.payoff import FAR, off_axis, plot, y_range

    def d(mean, low, high):
        return {"mean": mean, "ci_low": low, "ci_high": high}
    mp = {"methods": ["sce", "dcl"],
          "rows": [{"rung_knn": 50.0, "diff": {"sce": d(0.4, -0.2, 1.0), "dcl": d(-19.4, -29.8, -9.0)}},
                   {"rung_knn": 56.0, "diff": {"sce": d(0.1, float("nan"), float("nan")), "dcl": d(-3.0, -4.0, -2.0)}}]}
    lo, hi = y_range(mp)
    assert -4.0 > lo > -FAR - 1 and 1.0 < hi < 2.0  # dcl's -3 interval counts, its -19.4 does not
    assert off_axis(mp) == ["off the axis, dcl (▼): rung 50.0: -19.4 [-29.8, -9.0]"]  # its value is still shown
    assert os.path.isfile(plot(mp, str(tmp_path / "map.png")))


def test_pooled_difference_pairs_rung_and_seed():
    """The pooled reading pairs each method's run with MoCo-v2's of the same rung and seed (R·S pairs), so a
    small gain repeated at every rung is found where single rungs' 3 seeds cannot settle it."""
    from fastcl.lab.study.payoff import pooled

    res = []
    for i, rung in enumerate((2, 5, 10, 20)):
        for seed in (0, 1, 2):
            base = 40.0 + 3 * i + 0.7 * seed  # rungs and seeds differ a lot: only pairing removes that
            res += [{"variant": "mocov2", "rung": rung, "seed": seed, "knn": {"200": base}},
                    {"variant": "oracle", "rung": rung, "seed": seed, "knn": {"200": base + 0.5 + 0.1 * (-1) ** seed}},
                    {"variant": "sce", "rung": rung, "seed": seed, "knn": {"200": base + 0.3 * (-1) ** (seed + i)}}]
    p = pooled(res, ["oracle", "sce", "sane"])
    assert set(p) == {"oracle", "sce"} and p["oracle"]["n"] == 12  # sane ran nowhere: no entry
    assert p["oracle"]["mean"] == pytest.approx(0.5 + 0.1 / 3)  # seeds +0.1, -0.1, +0.1 at every rung
    assert p["oracle"]["ci_low"] > 0 and p["oracle"]["bonferroni"]["ci_low"] > 0
    assert p["oracle"]["bonferroni"]["ci_low"] < p["oracle"]["ci_low"]  # level 1 - 0.05/3 is wider
    assert p["sce"]["ci_low"] < 0 < p["sce"]["ci_high"]
    s = p["oracle"]["by_seed"]  # seeds as the unit: 3 pairs, each seed's mean over the 4 rungs
    assert s["n"] == 3 and s["mean"] == pytest.approx(p["oracle"]["mean"])
    assert s["ci_high"] - s["ci_low"] > p["oracle"]["ci_high"] - p["oracle"]["ci_low"]  # 2 degrees of freedom


def test_sweep_variants_keep_their_names_and_separate_the_degradations():
    """The add sweep's run folders keep their names (finished runs stay cached); --degrade replace gets its own,
    so it never reuses or overwrites add's runs, and the report finds its points under the same names."""
    from fastcl.lab.study.cli import parse, variants
    from fastcl.lab.study.runs import fn_variant, sepp_variant

    assert (fn_variant(1), fn_variant(0.5), fn_variant(0.25, "add")) == ("oracle", "oracle_p0.5", "oracle_p0.25")
    assert fn_variant(0.5, "replace") == "oracle_p0.5_replace" and fn_variant(1, "replace") == "oracle"
    assert sepp_variant(-0.1) == "sepp_tm0.1"
    v = variants(parse(["--config", TINY, "--sweep", "fn-precision", "--precisions", "1", "0.5",
                        "--degrade", "replace"]))
    assert "oracle_p0.5_replace" in v and "oracle_p0.5" not in v
    assert "method.oracle.degrade=replace" in v["oracle_p0.5_replace"]["overrides"]
