"""Miners: backend choice, spherical k-means, exact kNN / semantic pairs, IFND acceptance, miner state, 2-process."""
from __future__ import annotations

import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix

import fastcl.mining.knn as knn_mod
from fastcl.lab.benchmarks.mining import ari
from fastcl.methods.ifnd import ClusterMiner, accept, acceptance_schedule, confidence, spherical_kmeans
from fastcl.mining import NeighbourMiner, choose_engine, knn_search, pair_precision, semantic_pairs
from fastcl.mining.engine import faiss_module, faiss_num_gpus

ROOT = Path(__file__).resolve().parents[1]
HAVE_FAISS = faiss_module() is not None
CPU_BACKENDS = ["torch"] + (["faiss-cpu"] if HAVE_FAISS else [])


# ---------------------------------------------------------------------------------------------------- helpers
def planted(n=2000, d=32, c=10, kappa=12.0, seed=0):
    """n unit vectors around c orthonormal centres (von Mises-like, cos to own centre ~0.9); labels [n]."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.linalg.qr(torch.randn(d, d, generator=g))[0][:c]
    lab = torch.randperm(n, generator=g) % c
    return F.normalize(centres[lab] * kappa + torch.randn(n, d, generator=g), dim=1), lab


def contingency(a, b):
    return contingency_matrix(np.asarray(a), np.asarray(b))


def nmi(a, b):
    return normalized_mutual_info_score(np.asarray(a), np.asarray(b), average_method="geometric")


def purity(pred, truth):
    return contingency(pred, truth).max(1).sum() / len(pred)


def assert_same_knn(s1, i1, s2, i2, tie=1e-5):
    """Same sims everywhere; same ids except where a neighbour's sim is within `tie` of the next one."""
    torch.testing.assert_close(s1, s2, atol=tie, rtol=0)
    gaps = (s1[:, 1:] - s1[:, :-1]).abs() < tie
    near_tie = torch.zeros_like(i1, dtype=torch.bool)
    near_tie[:, 1:] |= gaps
    near_tie[:, :-1] |= gaps
    assert torch.equal(i1[~near_tie], i2[~near_tie])


# ---------------------------------------------------------------------------------------------------- backend
def test_choose_engine():
    assert choose_engine("torch") == "torch"
    assert choose_engine("auto") == ("faiss-gpu" if faiss_num_gpus() else "faiss-cpu" if HAVE_FAISS else "torch")
    with pytest.raises(ValueError):
        choose_engine("cuda")
    if faiss_num_gpus() == 0:   # the silent-CPU trap (fastcl/mining/engine.py) must be a loud error here
        with pytest.raises(ValueError):
            choose_engine("faiss-gpu")
        # features on a GPU: torch on the device, never a silent host round trip through faiss-cpu
        assert choose_engine("auto", "cuda") == "torch"
        assert choose_engine("auto", "cpu") == ("faiss-cpu" if HAVE_FAISS else "torch")


def test_two_faiss_distributions_are_refused(monkeypatch):
    """faiss-cpu and faiss-gpu both install the top-level `faiss` package: with both present the import names both
    instead of silently using whichever was installed last."""
    from fastcl.mining import engine

    monkeypatch.setattr(engine, "installed_faiss", lambda: ["faiss-cpu", "faiss-gpu"])
    with pytest.raises(ImportError, match="faiss-cpu and faiss-gpu"):
        engine.faiss_module()


# ---------------------------------------------------------------------------------------------------- k-means
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_kmeans_recovers_planted_clusters(backend):
    x, lab = planted()
    res = spherical_kmeans(x, 10, niter=20, nredo=2, seed=0, backend=backend, init="kmeans++")
    assert res.centroids.shape == (10, 32) and res.assign.shape == (2000,) and res.sims.shape == (2000, 2)
    assert res.assign.dtype == torch.int64
    torch.testing.assert_close(res.centroids.norm(dim=1), torch.ones(10))
    # assignment = nearest centroid, sims = the two largest cosines
    top = (F.normalize(x, dim=1) @ res.centroids.T).topk(2, dim=1)
    assert torch.equal(res.assign, top.indices[:, 0])
    torch.testing.assert_close(res.sims, top.values, atol=1e-5, rtol=0)
    assert nmi(res.assign, lab) >= 0.99 and purity(res.assign, lab) >= 0.99


@pytest.mark.skipif(not HAVE_FAISS, reason="faiss not installed")
@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_kmeans_faiss_and_torch_agree(init):
    x, lab = planted(seed=1)
    a = spherical_kmeans(x, 10, niter=15, seed=3, backend="faiss-cpu", init=init)
    b = spherical_kmeans(x, 10, niter=15, seed=3, backend="torch", init=init)
    # shared subsample and initial centroids: both engines follow the same Lloyd trajectory (random init may
    # merge planted clusters, but identically in both)
    assert ari(np.asarray(a.assign), np.asarray(b.assign)) >= 0.999
    assert contingency(a.assign, b.assign).max(1).sum() / len(lab) >= 0.999   # agreement up to a permutation
    torch.testing.assert_close(a.sims, b.sims, atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_kmeans_deterministic_subsampled_and_edge_k(backend):
    x, _ = planted(n=1500, seed=2)
    kw = dict(niter=5, nredo=2, seed=7, backend=backend, max_points_per_centroid=40, min_points_per_centroid=1,
              init="random")
    a, b = spherical_kmeans(x, 20, **kw), spherical_kmeans(x, 20, **kw)      # trains on 800 of 1500 points
    assert torch.equal(a.assign, b.assign) and torch.equal(a.centroids, b.centroids)
    assert a.assign.shape == (1500,) and int(a.assign.max()) < 20
    one = spherical_kmeans(x, 1, niter=2, backend=backend, min_points_per_centroid=1, init="random")
    assert torch.all(one.assign == 0) and torch.all(one.sims[:, 1] == -1)
    with pytest.raises(ValueError):
        spherical_kmeans(x[:5], 10, backend=backend, init="random")


# ---------------------------------------------------------------------------------------------------- kNN
@pytest.mark.skipif(not HAVE_FAISS, reason="faiss not installed")
@pytest.mark.parametrize("self_search", [False, True])
def test_knn_faiss_equals_torch(self_search, monkeypatch):
    g = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(3000, 24, generator=g), dim=1)
    q = bank if self_search else F.normalize(torch.randn(700, 24, generator=g), dim=1)
    excl = torch.arange(len(q)) if self_search else None
    sf, i_f = knn_search(q, bank, 12, backend="faiss-cpu", exclude_self_ids=excl, batch=256)
    # force the torch engine through several query and bank blocks and the block merge
    monkeypatch.setattr(knn_mod, "_CHUNK_ELEMS", 256 * 500)
    st, i_t = knn_search(q, bank, 12, backend="torch", exclude_self_ids=excl, batch=256)
    assert i_f.shape == (len(q), 12) and i_f.dtype == torch.int64 and sf.dtype == torch.float32
    assert_same_knn(sf, i_f, st, i_t)
    brute = (q @ bank.T)
    if self_search:
        assert not (i_f == torch.arange(len(q))[:, None]).any()
        brute.fill_diagonal_(-float("inf"))
    torch.testing.assert_close(sf, brute.topk(12, dim=1).values, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_knn_pads_small_banks(backend):
    x = F.normalize(torch.randn(5, 8), dim=1)
    s, i = knn_search(x, x[:3], 4, backend=backend, exclude_self_ids=torch.arange(5))
    assert torch.equal((i >= 0).sum(1), torch.tensor([2, 2, 2, 3, 3]))     # rows 0-2 lose themselves
    assert torch.all(torch.isinf(s[i < 0])) and not (i == torch.arange(5)[:, None]).any()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_semantic_pairs_facts(backend):
    x, lab = planted(n=1200, d=16, c=6, kappa=3.0, seed=4)
    x[1] = x[0]                                          # an exact duplicate: a partner, but never itself
    k, t = 8, 0.6
    ids, sims = semantic_pairs(x, k, t, backend=backend)
    n = len(x)
    assert ids.shape == (n, k) and ids.dtype == torch.int64 and sims.shape == (n, k)
    assert not (ids == torch.arange(n)[:, None]).any()                      # never itself
    assert torch.all(sims[ids >= 0] >= t) and torch.all(torch.isinf(sims[ids < 0]))
    valid = ids >= 0
    assert torch.all(valid[:, :-1] | ~valid[:, 1:])                        # kept neighbours left-aligned
    assert 0 < valid.sum() < n * k and ids[0, 0] == 1 and ids[1, 0] == 0
    # exactly the top-k others above the threshold (brute force)
    full = x @ x.T
    full.fill_diagonal_(-float("inf"))
    top = full.topk(k, dim=1)
    torch.testing.assert_close(sims, top.values.masked_fill(top.values < t, -float("inf")), atol=1e-5, rtol=0)
    assert torch.equal(valid.sum(1), (top.values >= t).sum(1))
    again = semantic_pairs(x, k, t, backend=backend)                          # deterministic
    assert torch.equal(again[0], ids) and torch.equal(again[1], sims)
    assert pair_precision(ids, lab) > 0.6                                  # chance is 1/6


def post_relu_clusters(c=8, per=3, d=64, seed=0):
    """c small classes of post-ReLU-like features: a large shared non-negative part plus a class part plus noise,
    through a ReLU (every cosine >= 0, most > 0.5, as pooled backbone features). -> (x [c*per, d], labels)."""
    g = torch.Generator().manual_seed(seed)
    common = torch.rand(d, generator=g) + 1.0
    centres = 1.2 * torch.randn(c, d, generator=g)
    lab = torch.arange(c).repeat_interleave(per)
    x = torch.relu(common + centres[lab] + 0.25 * torch.randn(c * per, d, generator=g))
    return x, lab


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sepp_threshold_filters_on_centred_features_not_on_post_relu_ones(backend):
    """On post-ReLU features every cosine is >= 0 and a 0.5 threshold keeps nearly the plain
    top-k (here k > class size, so most kept partners are of another class); centred, unrelated pairs fall to
    ~0 or below and the same threshold keeps the same-class partners only."""
    x, lab = post_relu_clusters()
    xn = F.normalize(x, dim=1)
    assert float((xn @ xn.T).min()) > 0.5                                  # every raw cosine clears 0.5
    k, t = 5, 0.5                                                          # 2 same-class partners per image
    raw_ids, _ = semantic_pairs(x, k, t, backend=backend)
    assert bool((raw_ids >= 0).all())                                      # nothing filtered: a plain top-k
    assert pair_precision(raw_ids, lab) < 0.5
    ids, sims = semantic_pairs(x, k, t, backend=backend, center=True)
    cen = knn_mod.center_features(x)
    assert float((cen @ cen.T).min()) < 0                                  # signed after centring
    assert pair_precision(ids, lab) == 1.0 and int((ids >= 0).sum()) >= len(x)  # the 2 true partners survive
    assert torch.all(sims[ids >= 0] >= t)
    miner = NeighbourMiner(len(x), k, t, backend=backend, features="centered")  # the miner centres too
    assert torch.equal(miner.mine(x)[0], ids) and miner.features == "centered"


def test_threshold_for_precision_calibration():
    # 3 rows, 3 slots: sims and whether each partner shares the row's label (labels built to match)
    labels = torch.tensor([0, 0, 1, 0, 1, 1, 2, 0])
    ids = torch.tensor([[1, 3, 2], [0, 4, -1], [5, 7, 6]])
    sims = torch.tensor([[0.9, 0.7, 0.4], [0.8, 0.3, -float("inf")], [0.6, 0.5, 0.2]])
    # pairs by sim: .9 T, .8 T, .7 T, .6 T, .5 F, .4 F, .3 F, .2 F  -> precision 1 down to .6, then 4/5 ...
    thr, prec, pairs = knn_mod.threshold_for_precision(ids, sims, labels, 1.0, rows=torch.arange(3))
    assert (thr, prec, pairs) == (pytest.approx(0.6), 1.0, 4)
    thr, prec, pairs = knn_mod.threshold_for_precision(ids, sims, labels, 0.6, rows=torch.arange(3))
    assert thr == pytest.approx(0.4) and prec == pytest.approx(4 / 6) and pairs == 6   # 4/7 < 0.6 at 0.3
    # only the labelled subset counts: row 2 alone has precision 1 at 0.6 and nothing else
    thr, prec, pairs = knn_mod.threshold_for_precision(ids, sims, labels, 0.9, rows=torch.tensor([2]))
    assert (thr, pairs) == (pytest.approx(0.6), 1)
    no_match = torch.tensor([10, 11, 12, 3, 3, 3, 3, 3])                    # no pair shares a label
    assert knn_mod.threshold_for_precision(ids, sims, no_match, 0.5)[0] == float("inf")
    with pytest.raises(ValueError):
        knn_mod.threshold_for_precision(ids, sims, labels, 0.0)


def test_sepp_table_records_its_feature_space(tmp_path):
    from fastcl.config import load_config
    from fastcl.methods import build_method

    x, _ = post_relu_clusters()
    path = str(tmp_path / "t.npz")
    miner = NeighbourMiner(len(x), 3, 0.5, backend="torch", features="backbone")
    miner.mine(x)
    miner.save(path)
    cfg = load_config(None, ["method.name=sepp", f"method.sepp.table_path={path}", "method.sepp.mode=multi"])
    assert cfg.method.sepp.features == "centered"                        # the default space
    with pytest.raises(ValueError, match="mined on 'backbone' features"):
        build_method(cfg, len(x))
    cfg = load_config(None, ["method.name=sepp", f"method.sepp.table_path={path}", "method.sepp.mode=multi",
                             "method.sepp.features=backbone"])
    assert build_method(cfg, len(x)).miner.features == "backbone"


@pytest.mark.skipif(not HAVE_FAISS, reason="faiss not installed")
def test_semantic_pairs_ivf_and_pca_options():
    x, lab = planted(n=2000, d=32, c=10, kappa=3.0, seed=5)
    exact = semantic_pairs(x, 10, 0.5, backend="faiss-cpu")
    ivf = semantic_pairs(x, 10, 0.5, backend="faiss-cpu", ivf_nlist=8, nprobe=8)      # all lists = exact
    assert torch.equal(ivf[0], exact[0])
    pf = semantic_pairs(x, 10, 0.5, backend="faiss-cpu", pca_dim=12)
    pt = semantic_pairs(x, 10, 0.5, backend="torch", pca_dim=12)
    assert_same_knn(pf[1].clamp_min(-2), pf[0], pt[1].clamp_min(-2), pt[0], tie=1e-4)
    assert not (pf[0] == torch.arange(2000)[:, None]).any() and pair_precision(pf[0], lab) > 0.5
    with pytest.raises(ValueError):
        semantic_pairs(x, 10, 0.5, backend="torch", ivf_nlist=8)


# ---------------------------------------------------------------------------------------------------- IFND
def _clusters(n_per=(10, 7, 1, 23, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    assign = torch.cat([torch.full((c,), j) for j, c in enumerate(n_per)])[torch.randperm(sum(n_per), generator=g)]
    return assign, torch.rand(len(assign), generator=g)


@pytest.mark.parametrize("per_cluster", [True, False])
@pytest.mark.parametrize("rate", [0.0, 0.1, 0.25, 0.3, 0.5, 0.7, 0.9, 1.0])
def test_accept_counts_and_order(rate, per_cluster):
    assign, conf = _clusters()
    labels = accept(assign, conf, rate, per_cluster=per_cluster)
    acc = labels >= 0
    assert torch.equal(labels[acc], assign[acc])
    if rate == 0.0:
        assert torch.all(labels == -1)
    if rate == 1.0:
        assert torch.all(acc)
    ceil = lambda n: -(-Fraction(str(rate)) * n // 1)  # noqa: E731  exact ⌈rate·n⌉ for the decimal rate
    if per_cluster:
        for c in assign.unique():
            m = assign == c
            assert acc[m].sum() == ceil(int(m.sum()))
            if acc[m].any() and (~acc[m]).any():                           # accepted = the most confident
                assert conf[m & acc].min() > conf[m & ~acc].max()
    else:
        assert acc.sum() == ceil(len(assign))
        if acc.any() and (~acc).any():
            assert conf[acc].min() > conf[~acc].max()


def test_accept_ties_and_confidence_kinds():
    assign = torch.tensor([0, 0, 0, 1, 1])
    labels = accept(assign, torch.zeros(5), 0.5)
    assert labels.tolist() == [0, 0, -1, 1, -1]                             # ties: lower index first
    x, _ = planted(n=300, c=3, seed=6)
    res = spherical_kmeans(x, 3, niter=5, backend="torch", init="kmeans++")
    torch.testing.assert_close(confidence(res, "centroid"), res.sims[:, 0])
    margin = confidence(res, "margin")
    assert torch.all(margin >= 0)
    with pytest.raises(ValueError):
        confidence(res, "entropy")
    with pytest.raises(ValueError):
        accept(assign, torch.zeros(5), 1.5)


@pytest.mark.parametrize("epochs,warmup,start,end", [(10, 0, 0.0, 1.0), (200, 10, 0.1, 0.9), (5, 4, 0.2, 0.6),
                                                     (1, 0, 0.0, 1.0), (7, 2, 0.5, 0.5)])
def test_acceptance_schedule(epochs, warmup, start, end):
    a = acceptance_schedule(epochs, warmup, start, end)
    assert a.shape == (epochs,) and a[-1] == end
    assert np.all(np.diff(a) >= 0) and np.all(a[:warmup] == 0)
    if epochs - warmup > 1:
        assert a[warmup] == start
    if (epochs, warmup, start) == (10, 0, 0.0):
        np.testing.assert_allclose(a, np.arange(10) / 9)
    with pytest.raises(ValueError):
        acceptance_schedule(epochs, epochs, start, end)
    with pytest.raises(ValueError):
        acceptance_schedule(epochs, 0, end + 0.1, end)


# ---------------------------------------------------------------------------------------------------- miners
def test_cluster_miner_refresh_relabel_and_state(tmp_path):
    x, lab = planted(n=800, d=16, c=4, seed=7)
    cm = ClusterMiner(800, [4, 8], niter=10, seed=1, init="kmeans++", every=2)
    assert cm.due(0) and torch.all(cm.relabel(0.5) == -1)                  # never mined: nothing accepted
    labels = cm.refresh(x, 0.25, epoch=4)
    assert labels.shape == (2, 800) and cm.epoch_mined == 4 and cm.last_seconds > 0
    assert not cm.due(5) and cm.due(6)
    assert nmi(cm.assign[0], lab) >= 0.99
    assert abs((labels >= 0).float().mean().item() - 0.25) < 0.02
    cm.relabel(1.0)
    assert torch.equal(cm.labels, cm.assign) and cm.rate == 1.0
    torch.save(cm.state_dict(), tmp_path / "cm.pt")
    other = ClusterMiner(800, [4, 8], init="kmeans++")
    other.load_state_dict(torch.load(tmp_path / "cm.pt", weights_only=True))
    for name in ("assign", "conf", "labels"):
        assert torch.equal(getattr(other, name), getattr(cm, name))
    assert (other.epoch_mined, other.rate) == (4, 1.0)
    with pytest.raises(ValueError):
        ClusterMiner(800, [4, 9], init="kmeans++").load_state_dict(cm.state_dict())
    with pytest.raises(ValueError):                                           # wrong feature table: loud, state kept
        cm.refresh(x[:10], 0.5)
    assert torch.equal(other.assign, cm.assign)


def test_neighbour_miner_save_load_state(tmp_path):
    x, _ = planted(n=500, d=16, c=5, kappa=3.0, seed=8)
    nm = NeighbourMiner(500, 6, 0.5)
    ids, sims = nm.mine(x)
    ref = semantic_pairs(x, 6, 0.5)
    assert torch.equal(ids, ref[0]) and torch.equal(sims, ref[1]) and nm.mined
    nm.save(str(tmp_path / "spps.npz"))
    loaded = NeighbourMiner(500, 6, 0.5)
    loaded.load(str(tmp_path / "spps.npz"))
    assert torch.equal(loaded.nbr_ids, ids) and torch.equal(loaded.nbr_sims, sims)
    torch.save(nm.state_dict(), tmp_path / "nm.pt")
    again = NeighbourMiner(500, 6, 0.5)
    again.load_state_dict(torch.load(tmp_path / "nm.pt", weights_only=True))
    assert torch.equal(again.nbr_ids, ids) and again.mined
    with pytest.raises(ValueError):
        NeighbourMiner(500, 5, 0.5).load(str(tmp_path / "spps.npz"))


def test_miners_two_processes_gloo(tmp_path):
    """Only rank 0 has the features; both ranks end with rank 0's tables, equal to a single-process run."""
    exe = Path(sys.executable).parent / "torchrun"
    launcher = [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(launcher + ["--standalone", "--nproc_per_node", "2",
                                      str(ROOT / "tests/_dist_miner_worker.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        import _dist_miner_worker as w
    finally:
        sys.path.pop(0)
    ref = w.run(r0["features"], 0)                                           # single process, same features
    for key in ("labels_refresh", "labels_relabel", "assign", "conf", "nbr_ids", "nbr_sims", "epoch_mined"):
        assert torch.equal(torch.as_tensor(r0[key]), torch.as_tensor(r1[key])), key
        assert torch.equal(torch.as_tensor(r0[key]), torch.as_tensor(ref[key])), key
    assert (r0["labels_refresh"] >= 0).any() and (r0["nbr_ids"] >= 0).any()
    assert r0["error"].startswith("ValueError") and r1["error"].startswith("RuntimeError: mining failed on rank 0")


# ---------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_paths_match_cpu():
    x, lab = planted()
    cpu = spherical_kmeans(x, 10, niter=15, seed=0, backend="torch", init="kmeans++")
    gpu = spherical_kmeans(x.cuda(), 10, niter=15, seed=0, backend="torch", init="kmeans++")
    assert gpu.assign.is_cuda and ari(gpu.assign.cpu(), cpu.assign) >= 0.999 and nmi(gpu.assign.cpu(), lab) >= 0.99
    q = F.normalize(torch.randn(2000, 32), dim=1)
    s_c, i_c = knn_search(q, q, 10, backend="torch", exclude_self_ids=torch.arange(2000))
    s_g, i_g = knn_search(q.cuda(), q.cuda(), 10, backend="torch", exclude_self_ids=torch.arange(2000).cuda())
    assert i_g.is_cuda
    assert_same_knn(s_c, i_c, s_g.cpu(), i_g.cpu(), tie=1e-4)
    cm = ClusterMiner(2000, [10], niter=10, init="kmeans++", backend="torch", device="cuda")
    assert cm.refresh(x.cuda(), 0.5).is_cuda
    if faiss_num_gpus() > 0:
        fg = spherical_kmeans(x, 10, niter=15, seed=0, backend="faiss-gpu", init="kmeans++")
        assert ari(fg.assign, cpu.assign) >= 0.999
        s_f, i_f = knn_search(q, q, 10, backend="faiss-gpu", exclude_self_ids=torch.arange(2000))
        assert_same_knn(s_c, i_c, s_f, i_f, tie=1e-4)
