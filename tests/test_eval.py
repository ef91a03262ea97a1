"""Evaluation suite and export on REAL CIFAR-10 images (conftest `cifar_folder`: 50 train + 20 test per class)
with a tiny MoCo-v2 run trained for two steps on that train folder."""
from __future__ import annotations

import json
import os
import re

import pytest
import torch
import torch.nn.functional as F

from fastcl.config import load_config
from fastcl.eval import knn, linear, semisup
from fastcl.eval.knn import knn_top1

TINY = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "test", "tiny.yaml")
COMMON = ["--no-progress", "--workers", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def run(cifar_folder, tmp_path_factory) -> str:
    """A run directory with one checkpoint (student + EMA teacher) trained on the real train split."""
    from fastcl.train import train

    run_dir = str(tmp_path_factory.mktemp("eval") / "run")
    over = ["data.backend=gpu_tensor", f"data.path={cifar_folder}/train", "data.aug.views.0.size=32",
            "data.aug.views.1.size=32", "data.aug.eval_size=32", "model.width=8", "model.cifar_stem=true",
            "trainer.max_steps=2", "method.queue_size=64", f"trainer.run_dir={run_dir}",
            f"data.eval_path={cifar_folder}/test", "trainer.knn_every=1"]
    train(load_config(TINY, over))
    return run_dir


def test_training_logs_knn_feature_rank_and_memory(run):
    recs = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    knn_recs = [r for r in recs if "knn_top1" in r]
    assert [r["epoch"] for r in knn_recs] == [0, 0]  # random init, then at the end of the 2 steps
    for r in knn_recs:
        assert 0 <= r["knn_top1"] <= 100 and 1.0 < r["feature_rank"] <= 64  # ResNet-18 width 8: 64 features
    train_recs = [r for r in recs if "loss" in r]
    assert train_recs and all(0.05 < r["host_rss_gb"] < 64 for r in train_recs)


def _args(run, cifar_folder, cache) -> list[str]:
    return ["--checkpoint", run, "--data", f"{cifar_folder}/train", "--val", f"{cifar_folder}/test",
            "--cache", str(cache)] + COMMON


def test_linear_probe_beats_chance(run, cifar_folder, tmp_path):
    out = tmp_path / "linear.json"
    assert linear.main(_args(run, cifar_folder, tmp_path / "cache") +
                       ["--protocol", "adam", "--bn", "--epochs", "60", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert (r["n_train"], r["n_val"], r["num_classes"], r["feat_dim"]) == (500, 200, 10, 64)
    assert r["protocol"]["optimizer"] == "adam" and r["protocol"]["bn"] and len(r["history"]) == 60
    assert r["top1"] > 15.0, r["top1"]  # 10 balanced classes: chance is 10 %
    assert r["top5"] >= r["top1"]
    assert r["cache_hit"] == {"train": False, "val": False}


def test_protocol_presets_and_overrides():
    p = linear.resolve_protocol("mocov3")
    assert (p.lr, p.batch_size, p.epochs, p.schedule, p.wd) == (0.4, 1024, 90, "cosine", 0.0)
    assert linear.resolve_protocol("mocov3", batch_size=256).lr == pytest.approx(0.1)  # linear scaling rule
    assert linear.resolve_protocol("mocov3", batch_size=256, lr=0.3).lr == 0.3  # an explicit lr wins
    m = linear.resolve_protocol("moco", epochs=10)
    assert (m.lr, m.milestones) == (30.0, (6, 8))
    assert [linear.lr_at(linear.PROTOCOLS["moco"], e) for e in (59, 60, 80)] == pytest.approx([30, 3, 0.3])
    with pytest.raises(ValueError, match="unknown linear protocol 'lars'"):
        linear.resolve_protocol("lars")


def test_feature_cache_is_reused_and_invalidated(run, cifar_folder, tmp_path, monkeypatch):
    test_dir, cache = f"{cifar_folder}/test", str(tmp_path / "cache")
    first, hit = linear.cached_features(run, test_dir, cache_dir=cache, workers=1, progress=False)
    assert not hit and first.feats.shape == (200, 64) and len(os.listdir(cache)) == 1

    def no_backbone(*a, **k):
        raise AssertionError("the backbone ran although the features are cached")

    with monkeypatch.context() as m:
        m.setattr(linear, "extract_folder", no_backbone)
        again, hit = linear.cached_features(run, test_dir, cache_dir=cache, workers=1, progress=False)
    assert hit and torch.equal(again.feats, first.feats) and torch.equal(again.labels, first.labels)
    assert again.rel_paths[0] == "airplane/0000.jpg"
    # a rewritten checkpoint (newer mtime) must not be served the old features
    weights = os.path.join(linear.checkpoint_context(run)[0], "model.safetensors")
    st = os.stat(weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    _, hit = linear.cached_features(run, test_dir, cache_dir=cache, workers=1, progress=False)
    assert not hit and len(os.listdir(cache)) == 2


def test_knn_cli_fields(run, cifar_folder, tmp_path):
    out, cache = tmp_path / "knn.json", tmp_path / "cache"
    assert knn.main(_args(run, cifar_folder, cache) + ["--k", "20", "200", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    for key in ("checkpoint", "which", "n_train", "n_val", "num_classes", "feat_dim", "t", "k", "top1", "top5"):
        assert key in r, key
    assert set(r["top1"]) == set(r["top5"]) == {"20", "200"} and r["t"] == 0.1
    assert all(0 <= v <= 100 for v in r["top1"].values())
    # the CLI is knn_top1 on the cached, L2-normalised features
    tr, _ = linear.cached_features(run, f"{cifar_folder}/train", cache_dir=str(cache), progress=False)
    te, _ = linear.cached_features(run, f"{cifar_folder}/test", cache_dir=str(cache), progress=False)
    ref = knn_top1(F.normalize(tr.feats, dim=1), tr.labels, F.normalize(te.feats, dim=1), te.labels, k=20, t=0.1)
    assert r["top1"]["20"] == pytest.approx(ref)


def test_subsets_deterministic_and_class_balanced(cifar_folder, tmp_path):
    train = f"{cifar_folder}/train"
    for d in ("a", "b"):
        assert semisup.main(["--data", train, "--percent", "1", "10", "--make-subset", "--name", "cifar",
                             "--subset-dir", str(tmp_path / d)]) == 0
    for pct in ("1", "10"):
        name = f"cifar_{pct}pct.txt"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    lines = {pct: [ln for ln in (tmp_path / "a" / f"cifar_{pct}pct.txt").read_text().splitlines()
                   if not ln.startswith("#")] for pct in ("1", "10")}
    for pct, per_class in (("1", 1), ("10", 5)):  # 1 % of 500 over 10 classes rounds up to 1 per class
        counts = {}
        for ln in lines[pct]:
            counts[ln.split("/")[0]] = counts.get(ln.split("/")[0], 0) + 1
        assert len(counts) == 10 and set(counts.values()) == {per_class}, counts
    assert set(lines["1"]) <= set(lines["10"])  # nested at the same seed
    assert semisup.make_subset(train, 10, seed=1) != lines["10"]
    with pytest.raises(FileExistsError, match="cifar_10pct.txt exists with different content"):
        semisup.write_subset(str(tmp_path / "a" / "cifar_10pct.txt"), "# other\nairplane/0000.jpg\n")
    # reading: relative paths resolve to scan_folder ids; bare file names must be unambiguous
    rels = ["cat/0001.jpg", "cat/0002.jpg", "dog/0001.jpg"]
    (tmp_path / "ok.txt").write_text("# c\ncat/0002.jpg\n\ndog/0001.jpg\n")
    assert semisup.read_subset(str(tmp_path / "ok.txt"), rels).tolist() == [1, 2]
    (tmp_path / "names.txt").write_text("0002.jpg\n")
    assert semisup.read_subset(str(tmp_path / "names.txt"), rels).tolist() == [1]
    (tmp_path / "amb.txt").write_text("0001.jpg\n")
    with pytest.raises(ValueError, match="ambiguous"):
        semisup.read_subset(str(tmp_path / "amb.txt"), rels)
    (tmp_path / "bad.txt").write_text("cow/0001.jpg\n")
    with pytest.raises(ValueError, match="bad.txt: 1 listed images are not in the data folder"):
        semisup.read_subset(str(tmp_path / "bad.txt"), rels)
    assert semisup.per_class_count(1281167, 1000, 1) == 13 and semisup.per_class_count(1281167, 1000, 10) == 128


@pytest.mark.parametrize("mode", ["linear", "finetune"])
def test_semisup_runs_on_a_subset(run, cifar_folder, tmp_path, mode):
    out = tmp_path / "semi.json"
    extra = ["--epochs", "5"] if mode == "linear" else ["--epochs", "1", "--batch-size", "16", "--workers", "0"]
    assert semisup.main(_args(run, cifar_folder, tmp_path / "cache") + ["--percent", "10", "--make-subset",
                        "--subset-dir", str(tmp_path / "sub"), "--mode", mode, "--out", str(out)] + extra) == 0
    r = json.loads(out.read_text())
    (entry,) = r["results"]
    assert r["mode"] == mode and entry["n_labeled"] == 50 and entry["percent"] == 10
    assert 0 <= r["top1"]["10"] <= r["top5"]["10"] <= 100
    assert entry["subset_file"].endswith("cifar_test_subset_10pct.txt") and len(entry["history"]) == int(extra[1])


def _torchvision_resnet18_keys(num_classes: int) -> set[str]:
    """torchvision.models.resnet18().state_dict() key names, written out independently of fastcl.models."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = {"conv1.weight"} | {f"bn1.{s}" for s in bn}
    for layer in range(1, 5):
        for block in range(2):
            p = f"layer{layer}.{block}."
            keys |= {p + "conv1.weight", p + "conv2.weight"} | {p + f"bn{i}.{s}" for i in (1, 2) for s in bn}
        if layer > 1:
            keys |= {f"layer{layer}.0.downsample.0.weight"} | {f"layer{layer}.0.downsample.1.{s}" for s in bn}
    return keys | ({"fc.weight", "fc.bias"} if num_classes else set())


def test_export_round_trip(run, cifar_folder, tmp_path):
    from fastcl import export
    from fastcl.checkpoint import load_encoder
    from fastcl.models import resnet
    from fastcl.pipelines.eval_data import eval_batches

    out = tmp_path / "resnet.pt"
    assert export.main(["--checkpoint", run, "--out", str(out), "--which", "teacher"]) == 0
    sd = torch.load(out, map_location="cpu", weights_only=True)
    assert set(sd) == _torchvision_resnet18_keys(0) and len(sd) == 120
    assert "layer4.1.bn2.running_var" in sd and not any(k.startswith(("encoder.", "backbone.", "fc.")) for k in sd)
    side = json.loads((tmp_path / "resnet.json").read_text())
    assert (side["arch"], side["cifar_stem"], side["width"], side["which"], side["method"]) == \
        ("resnet18", True, 8, "teacher", "mocov2")
    assert side["source_run"] == os.path.abspath(run) and side["num_classes"] == 0

    fresh = resnet("resnet18", cifar_stem=True, width=8, num_classes=0)
    fresh.load_state_dict(sd, strict=True)
    teacher, _ = load_encoder(run, "teacher")
    student, _ = load_encoder(run, "student")
    aug = load_config(os.path.join(run, "config.yaml")).data.aug
    x = next(eval_batches(f"{cifar_folder}/test", aug, 1 << 30, workers=1))[0][::10]  # one batch: the whole split
    with torch.no_grad():
        got, want = fresh.eval()(x), teacher.backbone(x)
        assert torch.allclose(got, want, rtol=0, atol=1e-6)
        assert not torch.allclose(got, student.backbone(x))  # --which picked the EMA teacher, not the student

    with_fc = tmp_path / "cls.pt"
    assert export.main(["--checkpoint", run, "--out", str(with_fc), "--num-classes", "10"]) == 0
    sd10 = torch.load(with_fc, map_location="cpu", weights_only=True)
    assert set(sd10) == _torchvision_resnet18_keys(10) and sd10["fc.weight"].shape == (10, 64)
    resnet("resnet18", cifar_stem=True, width=8, num_classes=10).load_state_dict(sd10, strict=True)
    assert torch.equal(sd10["layer1.0.conv1.weight"], student.backbone.layer1[0].conv1.weight)


def test_labels_must_match_by_class_name(tmp_path):
    with pytest.raises(ValueError, match="class 'cow' of /v is not a class of /t"):
        linear.remap_labels(["cat", "dog"], ["cow"], torch.tensor([0]), "/t", "/v")
    with pytest.raises(ValueError, match="/t is a flat folder"):
        linear.remap_labels([], ["cat"], torch.tensor([0]), "/t", "/v")
    assert linear.remap_labels(["cat", "dog"], ["dog"], torch.tensor([0, 0]), "/t", "/v").tolist() == [1, 1]


def test_fn_diagnostics_count_eliminated_and_attracted_but_not_soft_mass():
    """2 anchors x 5 columns (column 0 = the positive). Anchor classes 0 and 1; columns' classes below."""
    from fastcl.eval.diagnostics import fn_diagnostics
    from fastcl.methods.base import Sims
    from fastcl.objectives import Target
    labels = torch.tensor([0, 1, 0, 0, 1, 2, 0, 1])  # by sample id
    row_ids, col_ids = torch.tensor([0, 1]), torch.tensor([2, 3, 4, 5, 6])  # column classes 0, 0, 1, 2, 0
    valid = torch.ones(2, 5, dtype=torch.bool)
    sims = Sims(torch.zeros(2, 5), None, torch.tensor([0, 0]), valid, row_ids, col_ids)
    # true false negatives (non-positive, same class): row 0 -> cols 1, 4; row 1 -> col 2
    hard = torch.tensor([[.5, .5, 0, 0, 0], [1., 0, 0, 0, 0]])  # row 0 attracts col 1 (equal mass)
    elim = valid.clone()
    elim[0, 3] = False  # row 0 eliminates col 3 (class 2: a wrong detection)
    elim[1, 2] = False  # row 1 eliminates col 2 (right)
    out = fn_diagnostics(sims, Target(hard, elim), labels)
    assert out["fn_share"].item() == pytest.approx(3 / 8)
    assert out["fn_masked_precision"].item() == pytest.approx(2 / 3)  # cols (0,1), (1,2) right; (0,3) wrong
    assert out["fn_masked_recall"].item() == pytest.approx(2 / 3)  # (0,4) missed
    soft = F.softmax(torch.tensor([[0.3, -0.2, 0.1, 0.4, 0.0], [0.0, 0.2, -0.1, 0.1, 0.3]]), dim=1) * 0.5
    soft[:, 0] += 0.5  # an SCE-like target: some mass on every column, most on the positive
    out = fn_diagnostics(sims, Target(soft, None), labels)
    assert "fn_masked_precision" not in out  # nothing detected
    same = torch.tensor([[0, 1, 0, 0, 1], [0, 0, 1, 0, 0]], dtype=torch.bool)
    assert out["target_same_class_mass"].item() == pytest.approx((soft * same).sum(1).mean().item())


def test_effective_rank_tells_collapse_from_spread_features():
    from fastcl.eval.diagnostics import effective_rank
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(4000, 16, generator=g)
    assert 15.0 < effective_rank(spread) <= 16.0
    line = torch.randn(4000, 1, generator=g) * torch.randn(1, 16, generator=g)  # collapsed to one direction
    assert effective_rank(line) == pytest.approx(1.0, abs=0.01)
    two = torch.cat([torch.randn(4000, 2, generator=g), torch.zeros(4000, 14)], 1)
    assert 1.9 < effective_rank(two) <= 2.0


D2_KEY = re.compile(r"^(stem\.conv1(\.norm)?|res[2-5]\.\d+\.(conv[123]|shortcut)(\.norm)?)\."
                    r"(weight|bias|running_mean|running_var)$")


def test_export_detectron2_names_and_values(run, tmp_path):
    """--format detectron2: Detectron2's ResNet names for every backbone tensor, the same values; a CIFAR-stem
    backbone is refused (Detectron2 has no such stem)."""
    import pickle

    from fastcl import export
    from fastcl.models import resnet
    from fastcl.train import train
    std = str(tmp_path / "std")  # the tiny config: standard stem
    train(load_config(TINY, [f"trainer.run_dir={std}", "trainer.max_steps=1"]))
    tv = tmp_path / "tv.pt"
    assert export.main(["--checkpoint", std, "--out", str(tv)]) == 0
    out = tmp_path / "d2.pkl"
    assert export.main(["--checkpoint", std, "--out", str(out), "--format", "detectron2"]) == 0
    blob = pickle.load(open(out, "rb"))
    assert blob["__author__"] == "fastcl" and blob["matching_heuristics"] is True
    d2, sd = blob["model"], torch.load(tv, weights_only=True)
    assert all(D2_KEY.match(k) for k in d2), [k for k in d2 if not D2_KEY.match(k)]
    assert len(d2) == len([k for k in sd if not k.endswith("num_batches_tracked")]) == 100  # ResNet-18
    pairs = {"stem.conv1.weight": "conv1.weight", "stem.conv1.norm.running_var": "bn1.running_var",
             "res2.1.conv2.norm.weight": "layer1.1.bn2.weight", "res4.0.shortcut.weight": "layer3.0.downsample.0.weight",
             "res5.0.shortcut.norm.running_mean": "layer4.0.downsample.1.running_mean"}
    for new, old in pairs.items():
        assert (d2[new] == sd[old].numpy()).all(), new
    side = json.loads((tmp_path / "d2.json").read_text())
    assert side["format"] == "detectron2-pkl" and side["detectron2_config"]["MODEL.RESNETS.STRIDE_IN_1X1"] is False
    # ResNet-50 (bottlenecks, conv3, shortcuts in every first block) maps completely as well
    r50 = {k: v for k, v in resnet("resnet50", num_classes=0).state_dict().items()}
    names = export.detectron2_names(r50)
    assert all(D2_KEY.match(k) for k in names) and "res5.2.conv3.norm.running_var" in names
    assert len(names) == len([k for k in r50 if not k.endswith("num_batches_tracked")])
    with pytest.raises(ValueError, match="standard-stem backbone"):
        export.export(run, str(tmp_path / "cifar.pkl"), fmt="detectron2")


def test_tsne_map_of_real_images(run, cifar_folder, tmp_path):
    """python -m fastcl.eval.tsne: a PNG a person can read and the 2-D coordinates of every image, in folder
    order, with their classes; the same seed gives the same map."""
    import numpy as np
    from PIL import Image

    from fastcl.eval import tsne
    out = tmp_path / "map.png"
    args = ["--checkpoint", run, "--data", f"{cifar_folder}/test", "--perplexity", "10", "--out", str(out),
            "--no-progress", "--workers", "1", "--device", "cpu"]
    assert tsne.main(args) == 0
    z = np.load(tmp_path / "map.npz")
    assert z["xy"].shape == (200, 2) and np.isfinite(z["xy"]).all() and z["xy"].std(0).min() > 0
    assert list(z["ids"]) == list(range(200)) and list(z["classes"])[:2] == ["airplane", "automobile"]
    assert np.bincount(z["labels"]).tolist() == [20] * 10
    w, h = Image.open(out).size
    assert w >= 900 and h >= 800
    first = z["xy"].copy()
    assert tsne.main(args + ["--max-images", "0"]) == 0
    assert np.allclose(np.load(tmp_path / "map.npz")["xy"], first)
    with pytest.raises(ValueError, match="--perplexity must be in"):
        tsne.main(args + ["--perplexity", "500"])


def test_semisup_subset_file_in_simclr_format(run, cifar_folder, tmp_path):
    """--subset-file takes the user's lists as they are published for ImageNet (SimCLR 1 %/10 %: one bare file name
    per line, names unique across classes); the labelled share is measured; an eval --classes subset applies."""
    data = tmp_path / "train"  # CIFAR train with ImageNet-style unique names: <class>_<file>
    for c in sorted(os.listdir(f"{cifar_folder}/train")):
        (data / c).mkdir(parents=True)
        for f in sorted(os.listdir(f"{cifar_folder}/train/{c}")):
            os.symlink(f"{cifar_folder}/train/{c}/{f}", data / c / f"{c}_{f}")
    picked = [f"{c}_{k:04d}.jpg" for c in ("cat", "dog", "ship") for k in (3, 7)]
    (tmp_path / "2images.txt").write_text("\n".join(picked) + "\n")  # no header, no folders: SimCLR's format
    out = tmp_path / "semi.json"
    args = ["--checkpoint", run, "--data", str(data), "--val", f"{cifar_folder}/test", "--cache", "",
            "--subset-file", str(tmp_path / "2images.txt"), "--epochs", "3", "--out", str(out)] + COMMON
    assert semisup.main(args) == 0
    r = json.loads(out.read_text())
    (entry,) = r["results"]
    assert entry["subset"] == "2images" and entry["n_labeled"] == 6 and entry["percent"] == pytest.approx(1.2)
    assert set(r["top1"]) == {"2images"} and 0 <= r["top1"]["2images"] <= 100
    # the same list with an eval class subset of 3 classes: 150 training images, so 4 %
    (tmp_path / "cls.txt").write_text("ship\ncat\ndog\n")
    assert semisup.main(args + ["--classes", str(tmp_path / "cls.txt")]) == 0
    (entry,) = json.loads(out.read_text())["results"]
    assert entry["n_labeled"] == 6 and entry["percent"] == pytest.approx(4.0)
    (tmp_path / "missing.txt").write_text("cat_9999.jpg\n")
    with pytest.raises(ValueError, match="not in the data folder"):
        semisup.main(args[:-len(COMMON) - 2] + ["--subset-file", str(tmp_path / "missing.txt")] + COMMON)
