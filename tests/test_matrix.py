"""Multi-process matrix: every method x every REAL-image backend (torch, ffcv, dali), 2 gloo CPU processes.

The synthetic backend x every method is tests/test_methods.py::test_two_processes; here the data are 64 real
CIFAR-10 JPEGs (4 classes x 16, 32x32) read through the image-folder backends and a .beton converted from the
same folder. Each 2-process run goes through the real `fastcl.train.train` loop (tests/_dist_matrix_worker.py
records the gathered ids, the rank-averaged loss and the method state) and is checked for:
- every sample exactly once per epoch across ranks, in the global batches of a 1-process run;
- queues, SampleTables, miner outputs (IFND pseudo labels, SePP partners), oracle labels and weights
  identical on both ranks;
- deterministic methods (all but SANE, whose mixup partners permute each rank's LOCAL batch): the loss of a
  1-process run over the same global batches, to float reduction noise (BN all-reduce, DDP averaging; see
  LOSS_TOL), plus the same final queue (ids exact, keys to 1e-4), IFND pseudo labels and SePP partners.

Deterministic views. The device-side colour ops (torch, ffcv) and DALI's graph are seeded per (seed, epoch,
rank, batch), so a 2-process run does not repeat a 1-process run's augmentations. For the loss comparison the
views are made a pure function of the image: crop scale (1, 1) and ratio (1, 1) at the native 32 px, view 0
never flipped and view 1 always (flip_p 0 / 1), jitter/gray/blur/solarize p 0. At native size the three
backends then hand over the same pixels (measured: ffcv bit-equal to torch, DALI within 1e-6 after
normalisation), so ONE 1-process reference on the torch backend, run in-process, serves all three backends.
SANE runs keep the default random MoCo-v2 recipe: they exercise the rank-seeded colour ops in 2 processes (ids,
states and weights are still compared across ranks).

Budget: the matrix is sampled deterministically (DEFAULT below): every method and every backend appears in
the default set (7 of 21 combinations, 3 torchrun launches, one per backend); the other 14 are @slow (they
still run in CI). One launch runs a whole (backend, tier) group, so process start and ffcv's JIT are paid per
group.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastcl.methods import METHODS as REGISTRY
from fastcl.pipelines.batch import epoch_permutation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs/test/tiny.yaml")
WORKER = os.path.join(REPO, "tests/_dist_matrix_worker.py")
sys.path.insert(0, os.path.dirname(WORKER))
from _dist_matrix_worker import record_run  # noqa: E402

METHODS = tuple(REGISTRY)  # every registered method
BACKENDS = ("torch", "ffcv", "dali")
# Deterministic sample of the matrix run by default: each method once, each backend at least twice (a method
# registered later runs on torch by default). SePP pair mode (key view from a partner image) exists on torch
# only, so ffcv/dali run SePP in multi mode.
DEFAULT = {("mocov2", "torch"), ("sepp", "torch"), ("sane", "torch"),
           ("sce", "ffcv"), ("ifnd", "ffcv"),
           ("simclr", "dali"), ("oracle", "dali")}
DEFAULT |= {(m, "torch") for m in METHODS if not any(d[0] == m for d in DEFAULT)}
N, BATCH, EPOCHS, CLASSES, PER_CLASS = 64, 16, 2, 4, 16
STEPS_PER_EPOCH = N // BATCH
SEED = 0
# 2-process vs 1-process loss tolerance. Measured noise floor: the SAME 1-process run with 1 vs 2 torch threads
# (float reduction order only) differs by <= 2.5e-5 over the 8 steps at lr 0.0002 (at lr 0.002 by up to 1e-3
# by step 7: chaotic). A 2x gradient-scale error changes the loss by 1e-3..3e-2 from step 3 on; wrong columns,
# offsets or a per-rank queue change it at once.
LOSS_TOL = 1e-4
# view 1 is always flipped: two views that differ, deterministically (identical views make SimCLR's tiny net
# chaotic: a 1e-6 pixel difference grew to 1e-3 in the loss within 3 steps)
DETERMINISTIC_VIEWS = [f"data.aug.views.{v}.{kv}" for v in (0, 1) for kv in (
    "size=32", "scale=[1.0,1.0]", "ratio=[1.0,1.0]", f"flip_p={v}", "jitter_p=0", "gray_p=0", "blur_p=0",
    "solarize_p=0")]
RANDOM_VIEWS = ["data.aug.views.0.size=32", "data.aug.views.1.size=32"]  # the default MoCo-v2 recipe


def method_overrides(method: str, backend: str, data: dict) -> list[str]:
    """The tiny config's method settings (as tests/test_methods.py) for the real-image runs: `method.name` plus
    what a method needs at this size (a method without an entry runs with its defaults)."""
    extra = {
        "simclr": ["method.queue_size=0"],
        "ifnd": ["method.ifnd.levels=[4,8]", "method.ifnd.warmup_epochs=1"],
        "sepp": [f"method.sepp.table_path={data['table']}",
                 "method.sepp.rho=1.0" if backend == "torch" else "method.sepp.mode=multi"],
        "sane": ["method.batch_negatives=true"],
    }
    return [f"method.name={method}", *extra.get(method, [])]


def overrides(method: str, backend: str, data: dict, run_dir: str, loader: str | None = None) -> list[str]:
    """The run's overrides; `loader` replaces the data backend (not the method settings made for `backend`)."""
    loader = loader or backend
    path = data["beton"] if loader == "ffcv" else data["root"]
    views = RANDOM_VIEWS if method == "sane" else DETERMINISTIC_VIEWS
    # lr 0.0002 (LOSS_TOL): on these real images the tiny net is chaotic at the synthetic tests' lr 0.002
    return [f"data.backend={loader}", f"data.path={path}", "data.workers=0", f"optim.batch_size={BATCH}",
            f"trainer.epochs={EPOCHS}", "optim.lr=0.0002", f"trainer.seed={SEED}", "trainer.progress=false",
            f"trainer.run_dir={run_dir}", *views, *method_overrides(method, backend, data)]


# ------------------------------------------------------------------------------------------ data


@pytest.fixture(scope="module")
def data(tmp_path_factory, cifar_folder) -> dict:
    """64 real JPEGs (first 16 of the first 4 classes, as symlinks), their .beton (raw pixels) and a SePP
    neighbour table mined with NeighbourMiner over the images' pixels (k=3, no threshold)."""
    from fastcl.mining.miner import NeighbourMiner
    from fastcl.pipelines.folder import load_rgb, scan_folder

    tmp = tmp_path_factory.mktemp("matrix")
    root = tmp / "real"
    src = os.path.join(cifar_folder, "train")
    for c in sorted(os.listdir(src))[:CLASSES]:
        (root / c).mkdir(parents=True)
        for f in sorted(os.listdir(os.path.join(src, c)))[:PER_CLASS]:
            os.symlink(os.path.join(src, c, f), root / c / f)
    index = scan_folder(str(root))
    assert len(index) == N
    pix = torch.stack([torch.from_numpy(np.asarray(load_rgb(p).resize((16, 16)), dtype=np.float32)).flatten()
                       for p in index.paths])
    miner = NeighbourMiner(N, 3, 0.0)
    miner.mine(F.normalize(pix - pix.mean(0), dim=1))
    table = str(tmp / "table.npz")
    miner.save(table)
    out = {"root": str(root), "table": table, "labels": torch.tensor(index.labels), "tmp": tmp}
    try:
        import ffcv  # noqa: F401
    except ImportError:
        return out
    from fastcl.pipelines.convert import convert

    out["beton"] = str(tmp / "real.beton")
    convert(str(root), out["beton"], write_mode="raw", workers=1, progress=False)
    return out


# ------------------------------------------------------------------------------------------ runs

_GROUPS: dict = {}  # (backend, slow) -> {method: [rank0 record, rank1 record]}
_REFS: dict = {}  # overrides of the 1-process reference -> its record


def _torchrun(nproc: int, args: list[str], timeout: float = 540) -> tuple[int, str]:
    """(exit code, log tail) of a torchrun launch. Its own session: on a timeout the whole group is killed
    (SIGKILL: the trainer turns SIGTERM into "checkpoint at the next log step", which a hung rank never reaches)."""
    p = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone",
                          f"--nproc_per_node={nproc}", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        log, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        log, _ = p.communicate()
        return -9, f"timed out after {timeout} s\n" + log[-6000:]
    return p.returncode, log[-8000:]


def _group(backend: str, slow: bool, data: dict) -> dict:
    """Run every method of a (backend, tier) group in ONE 2-process torchrun launch; cached per module."""
    key = (backend, slow)
    if key not in _GROUPS:
        methods = [m for m in METHODS if ((m, backend) in DEFAULT) != slow]
        out = data["tmp"] / f"w-{backend}-{'slow' if slow else 'default'}"
        out.mkdir()
        spec = [{"name": m, "config": TINY, "overrides": overrides(m, backend, data, str(out / f"run-{m}"))}
                for m in methods]
        (out / "spec.json").write_text(json.dumps(spec))
        code, log = _torchrun(2, [WORKER, str(out / "spec.json"), str(out)])
        _GROUPS[key] = {"error": log} if code else {
            m: [torch.load(out / f"{m}.rank{k}.pt", weights_only=False) for k in (0, 1)] for m in methods}
    return _GROUPS[key]


def _reference(method: str, backend: str, data: dict) -> dict:
    """The 1-process run over the same global batches, in-process, on the torch backend (pixel-identical to
    ffcv/dali with DETERMINISTIC_VIEWS), with the method settings of `backend`; shared by equal settings."""
    key = (method, tuple(method_overrides(method, backend, data)))
    if key not in _REFS:
        run_dir = str(data["tmp"] / f"ref-{len(_REFS)}-{method}")
        _REFS[key] = record_run(TINY, overrides(method, backend, data, run_dir, loader="torch"))
    return _REFS[key]


def _matrix():
    for method in METHODS:
        for backend in BACKENDS:
            marks = [] if (method, backend) in DEFAULT else [pytest.mark.slow]
            marks += [getattr(pytest.mark, backend)] if backend in ("ffcv", "dali") else []
            yield pytest.param(method, backend, marks=marks, id=f"{method}-{backend}")


@pytest.mark.parametrize("method,backend", list(_matrix()))
def test_two_processes_real_images(method, backend, data):
    if backend == "ffcv" and "beton" not in data:
        pytest.skip("ffcv is not installed")
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    group = _group(backend, (method, backend) not in DEFAULT, data)
    assert "error" not in group, group.get("error")
    r0, r1 = group[method]
    assert (r0["world"], r0["rank"], r1["rank"]) == (2, 0, 1)
    steps = r0["steps"]
    assert [s["step"] for s in steps] == list(range(EPOCHS * STEPS_PER_EPOCH))

    # each sample exactly once per epoch across ranks, in the 1-process global batch order
    for epoch in range(EPOCHS):
        ids = sum((s["ids"] for s in steps[epoch * STEPS_PER_EPOCH:(epoch + 1) * STEPS_PER_EPOCH]), [])
        assert sorted(ids) == list(range(N)), epoch
        assert ids == epoch_permutation(N, SEED, epoch).tolist(), epoch
    assert [s["ids"] for s in r1["steps"]] == [s["ids"] for s in steps]

    # rank-identical state: losses (averaged), label tables at every step, queue / table / miner, weights
    assert [s["loss"] for s in r1["steps"]] == [s["loss"] for s in steps]
    for a, b in zip(steps, r1["steps"]):
        assert (a["labels"] is None) == (b["labels"] is None)
        if a["labels"] is not None:
            assert torch.equal(a["labels"], b["labels"]), a["step"]
    s0, s1 = r0["state"], r1["state"]
    assert s0.keys() == s1.keys()
    for k in s0:
        if k == "miner":
            assert s0[k].keys() == s1[k].keys()
            for mk, v in s0[k].items():
                assert torch.equal(v, s1[k][mk]) if torch.is_tensor(v) else v == s1[k][mk], mk
        else:
            assert torch.equal(s0[k], s1[k]), k
    queue = set() if REGISTRY[method].inbatch_only else {"queue_keys"}  # the tiny config runs the MoCo layout
    expect_state = queue | {"ifnd": {"table_feats", "miner"}, "sepp": {"miner"},
                            "oracle": {"oracle_labels"}}.get(method, set())
    assert expect_state <= set(s0), set(s0)
    if "queue_ids" in s0:
        assert (s0["queue_ids"] >= 0).all()  # 32 slots, 128 keys pushed: full, and only real ids
    if method == "ifnd":
        assert (s0["miner"]["labels"] >= 0).any() and bool(s0["table_seen"].all())
        assert (steps[-1]["labels"] >= 0).any()  # epoch 1 trained with accepted pseudo labels
    if method == "oracle":
        assert torch.equal(s0["oracle_labels"].view(-1), data["labels"])
    for k, v in r0["params"].items():
        assert torch.allclose(v.float(), r1["params"][k].float(), atol=1e-6), k

    if method == "sane":
        return  # SANE permutes mixup partners within each rank's batch: not comparable with 1 process
    one = _reference(method, backend, data)
    assert one["world"] == 1
    assert [s["ids"] for s in one["steps"]] == [s["ids"] for s in steps]  # the same global batches
    # equal up to float reduction order (BN all-reduce, DDP averaging); see LOSS_TOL
    assert [s["loss"] for s in steps] == pytest.approx([s["loss"] for s in one["steps"]], abs=LOSS_TOL)
    if "queue_ids" in s0:
        assert torch.equal(s0["queue_ids"], one["state"]["queue_ids"])
        assert torch.allclose(s0["queue_keys"], one["state"]["queue_keys"], atol=1e-4)
    if method == "ifnd":
        assert torch.equal(s0["miner"]["labels"], one["state"]["miner"]["labels"])
    if method == "sepp":
        assert torch.equal(s0["miner"]["nbr_ids"], one["state"]["miner"]["nbr_ids"])
