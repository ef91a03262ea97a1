"""Every published config (configs/exp/*.yaml) trains a few steps on CPU with real CIFAR-10 JPEGs.

Only sizes change (network width, batch, queue, step count, kNN off); method, optimiser, schedules, heads,
views (incl. SCE multi-crop and SANE's extra mixup crop) and their augmentations stay as published. Each run
must encode exactly the images its recipe needs per sample (student: every query view once + SANE's mixed
images; teacher: every key view once), and compute a finite loss and gradient norm.
"""
import glob
import json
import math
import os

import pytest
import torch.nn.functional as F

from fastcl.config import load_config
from fastcl.train import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "exp", "*.yaml")))


@pytest.fixture(scope="module")
def sepp_table(cifar_folder, tmp_path_factory):
    """A partner table over the fixture's train split (raw-pixel neighbours: good enough to exercise SePP)."""
    from fastcl.mining.miner import NeighbourMiner
    from fastcl.pipelines.augspec import AugSpec, ViewSpec
    from fastcl.pipelines.eval_data import eval_batches
    aug = AugSpec(views=[ViewSpec(), ViewSpec()], eval_size=32, eval_resize_ratio=1.0)
    x, _, _ = next(eval_batches(os.path.join(cifar_folder, "train"), aug, 1 << 30))  # one batch: the whole split
    miner = NeighbourMiner(x.shape[0], 5, 0.0)
    miner.mine(F.normalize(x.flatten(1), dim=1))
    path = str(tmp_path_factory.mktemp("sepp") / "table.npz")
    miner.save(path)
    return path


# images encoded per sample and step: (student, teacher), from each recipe's view structure
ENCODED = {"cifar10_simclr": (2, 0), "imagenet_simclr": (2, 0), "imagenet100_simclr": (2, 0),
           "cifar10_sane": (2, 1), "imagenet_sane": (2, 1), "imagenet100_sane": (2, 1),
           "imagenet_sce": (2, 2), "imagenet100_sce": (2, 2), "imagenet_sce_multicrop": (6, 2)}  # others: (1, 1)


def _default_encoded(cfg) -> tuple[int, int]:
    """Images per sample of a 2-view recipe without extras: the in-batch layout encodes both views with the student
    and has no teacher; the queue layout encodes the query view and the key view once each."""
    from fastcl.methods import method_class

    cls = method_class(cfg.method.name)
    inbatch = cls.inbatch_only or (cls.follows_base and cfg.method.base == "simclr")
    return (2, 0) if inbatch else (1, 1)


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(c)[:-5] for c in CONFIGS])
def test_published_config_trains_on_real_images(path, cifar_folder, sepp_table, tmp_path):
    from fastcl.step import count_forwards

    base = load_config(path)
    over = [f"data.path={os.path.join(cifar_folder, 'train')}", "data.backend=gpu_tensor", "data.eval_path=",
            "data.workers=0", "data.classes=null", "optim.batch_size=16", "model.width=8", "trainer.max_steps=2",
            "trainer.knn_every=0", "trainer.log_every=1",
            "trainer.progress=false", f"trainer.run_dir={tmp_path / 'run'}", f"method.sepp.table_path={sepp_table}"]
    if base.method.queue_size:
        over.append("method.queue_size=64")
    if base.model.proj_hidden > 512:  # keep the heads' shapes (layers, BN, predictor) but not their width
        over += ["model.proj_hidden=64"] + (["model.pred_hidden=64"] if base.model.pred_hidden else [])
    if base.method.name == "ifnd":
        over += ["method.ifnd.levels=[4,8]", "method.ifnd.warmup_epochs=0", "method.ifnd.accept_start=1.0"]
    with count_forwards() as encoded:
        result = train(load_config(path, over))
    assert result["steps"] == 2
    n_student, n_teacher = ENCODED.get(os.path.basename(path)[:-5], _default_encoded(base))
    assert (encoded["student"], encoded["teacher"]) == (2 * 16 * n_student, 2 * 16 * n_teacher)
    recs = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl") if '"loss"' in line]
    # step 1 of a MoCo-layout run: the queue is still empty, the own key is the only candidate and the loss is 0
    # (the grad norm of a width-8 net can be large: F.normalize divides by small head outputs; finite is the check)
    assert len(recs) == 2 and all(0 <= r["loss"] < 50 and math.isfinite(r["grad_norm"]) for r in recs), recs
    assert recs[-1]["loss"] > 0 and recs[-1]["grad_norm"] > 0, recs


def test_moco_demo_monitor_embeds_the_head(cifar_folder, tmp_path, monkeypatch):
    """trainer.knn_features=head (the MoCo CIFAR demo's monitor): the kNN monitor embeds the encoder's head output,
    backbone + fc, not the pooled backbone features; the demo config trains and logs its kNN on CPU."""
    from fastcl.eval import monitor as M

    seen = []
    call = M.KnnMonitor.__call__

    def spy(self, net):
        seen.append(type(net).__name__)
        return call(self, net)

    monkeypatch.setattr(M.KnnMonitor, "__call__", spy)
    path = os.path.join(REPO, "configs", "exp", "cifar10_moco_demo.yaml")
    over = [f"data.path={os.path.join(cifar_folder, 'train')}", f"data.eval_path={os.path.join(cifar_folder, 'test')}",
            "data.backend=gpu_tensor", "data.workers=0", "optim.batch_size=16", "model.width=8", "trainer.max_steps=2",
            "method.queue_size=64", "trainer.progress=false", f"trainer.run_dir={tmp_path / 'run'}"]
    result = train(load_config(path, over))
    assert seen == ["Encoder", "Encoder"] and result["knn_top1"] is not None  # at initialisation and at the end
    seen.clear()
    train(load_config(path, over + ["trainer.knn_features=backbone", f"trainer.run_dir={tmp_path / 'run2'}"]))
    assert seen == ["ResNet", "ResNet"]
