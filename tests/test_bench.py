"""`python -m fastcl.bench ...` on small inputs: every subcommand runs end to end, measures what it claims and
writes its JSON evidence where it is told (never into docs/ from a test). The comparison (`methods`) trains every
method on real CIFAR-10 JPEGs and reports them side by side."""
import json
import os

import pytest

from fastcl.methods import METHODS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs/test/tiny.yaml")
ALL = ["mocov2", *(m for m in METHODS if m != "mocov2")]  # every registered method


def _evidence(folder):
    (name,) = os.listdir(folder)
    payload = json.load(open(os.path.join(folder, name)))
    assert payload["commit"] and payload["hardware"]["cores"] >= 1 and payload["date"]
    return payload


def test_step_bench_times_every_method_against_mocov2(tmp_path):
    from fastcl.lab.benchmarks import step
    res = step.main(["--config", TINY, "--steps", "1", "--warmup", "1", "--repeats", "2", "--out", str(tmp_path), "--methods", *ALL])
    assert sorted(res) == sorted(ALL)
    assert res["mocov2"]["extra_vs_mocov2_pct"] == 0.0
    for m, r in res.items():
        assert r["img_per_s"] > 0 and len(r["times"]) == 2, m
        assert r["extra_vs_mocov2_pct"] == pytest.approx(100 * (r["median_s_per_step"] / res["mocov2"]["median_s_per_step"] - 1))
    assert sorted(_evidence(tmp_path)["results"]) == sorted(ALL)


def test_kernels_bench_compares_numba_with_the_torch_reference(tmp_path):
    from fastcl.lab.benchmarks import kernels
    out = kernels.main(["--rows", "4", "--cols", "512", "--repeats", "1", "--out-dir", str(tmp_path)])
    names = {r["kernel"] for r in out["results"]}
    assert len(names) >= 4
    for r in out["results"]:  # the ratio is the medians' ratio, and every kernel matched its reference
        assert r["speedup"] == pytest.approx(r["torch_median_s"] / r["kernel_median_s"]), r["kernel"]
        assert r["kernel_median_s"] > 0 and len(r["kernel_times_s"]) == 1
        assert r.get("mismatches", 0) == 0 and r.get("max_rel_err", 0.0) < 1e-4, r
    assert _evidence(tmp_path)["results"] == out["results"]


def test_mining_bench_runs_kmeans_and_knn_engines(tmp_path):
    from fastcl.lab.benchmarks import mining
    out = mining.main(["--n", "1200", "--dim", "16", "--k", "8", "--niter", "3", "--queries", "100", "--knn-k", "5",
                       "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)])
    assert set(out["results"]) == {"kmeans", "knn"}
    knn = out["results"]["knn"]
    assert {"faiss-cpu", "torch-cpu"} <= set(knn)
    # the exact searches agree on the neighbours (the key the benchmark writes: same_ids_vs_<reference engine>)
    assert knn["torch-cpu"]["same_ids_vs_faiss-cpu"] > 0.99 and knn["faiss-cpu"]["same_ids_vs_faiss-cpu"] == 1.0
    _evidence(tmp_path)


def test_loader_bench_on_real_jpegs(tmp_path, cifar_folder):
    from fastcl.lab.benchmarks import loader
    out = loader.main(["--backend", "torch", "--data", os.path.join(cifar_folder, "train"), "--batch", "32",
                       "--size", "32", "--batches", "2", "--repeats", "1", "--workers", "0", "--out", str(tmp_path)])
    r = out["results"]["torch"]
    assert [run["images"] for run in r["runs"]] == [64] and r["img_s"] > 0 and r["ratio_vs_torch"] == 1.0
    _evidence(tmp_path)


def test_methods_bench_trains_every_method_on_real_images(tmp_path, cifar_folder):
    from fastcl.lab.benchmarks import methods
    out = str(tmp_path / "cmp")
    summary = methods.main(["--config", TINY, "--epochs", "1", "--out", out, "data.backend=torch",
                            f"data.path={cifar_folder}/train", f"data.eval_path={cifar_folder}/test",
                            "data.aug.views.0.size=16", "data.aug.views.1.size=16"])
    assert set(ALL) <= set(summary)
    for m in ALL:  # one epoch of 500 images at global batch 16, kNN before and after
        assert summary[m]["steps"] == 500 // 16 and 0 < summary[m]["knn_top1"] <= 100, m
    assert summary["sepp_mining"]["pairs"] > 0  # partners mined from the MoCo-v2 run's encoder
    report = open(os.path.join(out, "report", "report.md")).read()
    assert all(f"| {m} " in report or f"/{m}" in report for m in ALL)
    assert json.load(open(os.path.join(out, "summary.json"))).keys() == summary.keys()


def test_methods_bench_stops_when_a_run_is_preempted(tmp_path, monkeypatch):
    from fastcl.lab.benchmarks import methods
    calls = []

    def preempted(cfg):
        calls.append(cfg.method.name)
        return {"preempted": True, "steps": 3}

    monkeypatch.setattr(methods, "train", preempted)
    summary = methods.main(["--config", TINY, "--epochs", "1", "--out", str(tmp_path), "--methods", "mocov2", "sce"])
    assert calls == ["mocov2"] and list(summary) == ["mocov2"]


def test_methods_bench_refuses_sepp_without_its_miner_run(tmp_path, capsys):
    from fastcl.lab.benchmarks import methods
    with pytest.raises(SystemExit) as e:
        methods.main(["--config", TINY, "--out", str(tmp_path), "--methods", "sepp"])
    assert e.value.code == 2 and "add mocov2 to --methods" in capsys.readouterr().err


def test_step_bench_on_a_real_loader_adds_the_mocov2_reference(tmp_path, cifar_folder):
    """`--method sce sepp --backend torch`: the step includes the real loader; MoCo-v2 is timed too (the
    reference of the extra-cost column) even when not asked for."""
    from fastcl.lab.benchmarks import step
    res = step.main(["--config", TINY, "--method", "sce", "sepp", "--backend", "torch", "--steps", "1",
                     "--warmup", "1", "--repeats", "1", "--out", str(tmp_path), f"data.path={cifar_folder}/train"])
    assert sorted(res) == ["mocov2", "sce", "sepp"] and all(r["img_per_s"] > 0 for r in res.values())
    assert "backend: torch" in _evidence(tmp_path)["config"]


def test_bench_bad_input_is_one_line(capsys):
    from fastcl import bench
    with pytest.raises(SystemExit) as e:
        bench.main(["step", "--config", TINY, "--backend", "nope", "--steps", "1"])
    assert "fastcl.bench step: error:" in str(e.value) and "nope" in str(e.value) and "\n" not in str(e.value)


def test_step_bench_compares_encode_once_with_per_pair(tmp_path):
    """--compare-per-pair on the symmetric 2+4 multi-crop structure: the engine encodes 6 student + 2 teacher
    images per sample in 2 + 1 forwards; the per-pair engine 10 + 10 in 10 + 10; the speedup is their ratio."""
    from fastcl.lab.benchmarks import step
    views = "data.aug.views=[{size: 16},{size: 16},{size: 8},{size: 8},{size: 8},{size: 8}]"
    res = step.main(["--config", TINY, "--method", "sce", "--compare-per-pair", "--steps", "1", "--warmup", "1",
                     "--repeats", "1", "--out", str(tmp_path), "method.symmetric=true", views])
    assert sorted(res) == ["mocov2", "mocov2@per_pair", "sce", "sce@per_pair"]
    once, pp = res["sce"], res["sce@per_pair"]
    assert (once["student_images_per_sample"], once["teacher_images_per_sample"]) == (6, 2)
    assert (once["student_forwards_per_step"], once["teacher_forwards_per_step"]) == (2, 1)
    assert (pp["student_images_per_sample"], pp["teacher_images_per_sample"]) == (10, 10)
    assert (pp["student_forwards_per_step"], pp["teacher_forwards_per_step"]) == (10, 10)
    assert once["speedup_vs_per_pair"] == pytest.approx(pp["median_s_per_step"] / once["median_s_per_step"])


def test_loader_bench_views_and_cpu_time_counts_live_children():
    """--views groups (later groups are local crops) and the CPU-ms-per-image clock: a live child process's CPU
    time (a persistent DataLoader worker) counts, as does this process's own."""
    import subprocess
    import sys
    import time

    from fastcl.lab.benchmarks.loader import LOCAL_SCALE, _proc_cpu_s, cpu_delta, cpu_seconds, parse_views

    v = parse_views("2x224+6x96", 32)
    assert [x["size"] for x in v] == [224] * 2 + [96] * 6 and "scale" not in v[0] and v[2]["scale"] == list(LOCAL_SCALE)
    assert parse_views("", 32) == [{"size": 32}] * 2
    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time()\n"
                              "while time.process_time() - t < 0.6: pass\ntime.sleep(30)"])
    try:
        a = cpu_seconds()
        t0 = time.process_time()
        while time.process_time() - t0 < 0.2:  # this process burns 0.2 s too
            pass
        deadline = time.time() + 30
        while _proc_cpu_s(child.pid) < 0.6 and time.time() < deadline:  # the child burns its 0.6 s, stays alive
            time.sleep(0.05)
        spent = cpu_delta(a, cpu_seconds())
    finally:
        child.kill()
        child.wait()
    assert 0.7 < spent < 2.5, spent  # >= 0.2 own + ~0.6 child (minus its start-up before the first sample)


def test_scaling_bench_measures_every_item_against_its_formula(tmp_path):
    """`scaling` at a toy N: every memory item's measured bytes (tensors of the real objects after a real refresh,
    mine, and a real sharded kNN monitor call with 8 ranks simulated) equal its formula at N and N/4, the formulas
    at ImageNet-1k are the documented ones, the monitor's vote over 2 and 8 simulated shards equals its 1-rank
    vote, and every timed piece of work took a positive time."""
    from fastcl import bench
    from fastcl.lab.benchmarks import scaling
    bench.main(["scaling", "--n", "2048", "--queue", "1024", "--dim", "16", "--levels", "8", "16", "32",
                "--backbone-dim", "32", "--sepp-dim", "16", "--out", str(tmp_path), "--name", "toy"])
    out = _evidence(tmp_path)
    mem = {r["item"]: r for r in out["summary"]["memory"]}
    assert set(mem) == {k for k, *_ in scaling.MEMORY_ITEMS}
    for key, r in mem.items():
        if key == "kmeans_transient":  # a process peak-RSS rise, compared with an approximate formula
            assert r["exact"] is False
            continue
        assert r["exact"] and r["equal"], r
        assert r["measured_bytes"] == r["formula_bytes"] > 0, key
        # the similarity block holds all M queries at both toy sizes: [M, N/W] grows as N^2; the held-out
        # all-gather pads M = 80 / 20 to ceil(M/8) = 10 / 3 rows per rank
        assert r["exponent_formula"] == pytest.approx({"queue": 0.0, "knn_sims_block": 2.0}.get(key, 1.0),
                                                      abs=0.15 if key == "knn_test_allgather" else 0.01), key
    assert mem["queue"]["measured_bytes"] == 1024 * 16 * 4 + 1024 * 8 + 8
    assert mem["ifnd_state"]["measured_bytes"] == 3 * 2048 * 20 and mem["sepp_table"]["measured_bytes"] == 2048 * 5 * 12
    n, m, w, db, k = 2048, 80, 8, 32, 200  # m: the held-out split at ImageNet's ratio, round(2048 * 50000 / 1281167)
    assert mem["knn_shard"]["measured_bytes"] == n // w * db * 4
    assert mem["knn_sims_block"]["measured_bytes"] == m * (n // w) * 4
    assert mem["knn_test"]["measured_bytes"] == mem["knn_test_device"]["measured_bytes"] == m * db * 4
    assert mem["knn_test_allgather"]["measured_bytes"] == (1 + 2 * w) * (m // w) * (db * 4 + 8)
    assert mem["knn_candidates"]["measured_bytes"] == (1 + 2 * w) * m * k * (4 + 8)
    # the ImageNet column with the default (ImageNet) sizes: the figures docs/SCALING.md quotes
    big, val = scaling.IMAGENET_N, scaling.IMAGENET_VAL
    assert scaling.table_bytes(big, 128) == 329_259_919 and scaling.ifnd_state_bytes(big, 3) == 76_870_020
    assert scaling.knn_shard_bytes(big, 2048, 8) == 1_311_916_032
    assert scaling.knn_sims_block_bytes(big, val, 8) == 104 * 160_146 * 4 == 66_620_736
    assert scaling.knn_features_bytes(val, 2048) == 409_600_000
    assert scaling.knn_allgather_bytes(val, 2048, 8) == 17 * 6250 * 8200 == 871_250_000
    assert scaling.knn_candidates_bytes(val, 200, 8) == 2_040_000_000
    vote = scaling.vote_cost(big, val, 2048, 8)  # per rank on an H100: far inside the 1800 s collective timeout
    assert vote["flops"] == 2.0 * val * 160_146 * 2048 and 0.5 < vote["h100_s"] < 2.0, vote
    for size in ("n", "n_over_4"):  # the bank split over 2 and 8 simulated ranks votes as one rank does
        split = out["measured"][size]["knn_vote"]["split"]
        assert sorted(int(x) for x in split) == [2, 8], split
        for v in split.values():
            assert v["pred_mismatches"] == 0 and v["top_sims_max_abs_diff"] < 1e-5, v
    engines = out["engines"]
    assert "torch" in engines
    work = {(r["item"], r["engine"]) for r in out["summary"]["time"]}
    assert {("ifnd_refresh", e) for e in engines} | {("sepp_mine", e) for e in engines} <= work
    for r in out["summary"]["time"]:
        assert r["measured_s"] > 0 and r["measured_s_small"] > 0 and r["flops"] > r["flops_small"] > 0, r
        assert r["imagenet_flops"] > r["flops"]
        # k-means ~ N (its counted iterations may differ between sizes), the kNN table and the vote ~ N^2
        assert r["exponent_formula"] == pytest.approx({"ifnd_refresh": 1.0}.get(r["item"], 2.0),
                                                      abs=0.5 if r["item"] == "ifnd_refresh" else 0.01), r
    for eng in engines:  # Lloyd iterations counted per level (torch: its similarity passes; faiss: iteration_stats)
        iters = out["measured"]["n"]["ifnd_refresh"][eng]["lloyd_iters"]
        assert len(iters) == 3 and all(1 <= i <= 20 for i in iters), (eng, iters)
    assert set(out["assumptions"]) >= {"h100_fp32_flops", "eval_img_s_per_gpu", "train_img_s_per_gpu"}
