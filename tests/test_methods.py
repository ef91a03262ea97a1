"""Every method through the real trainer on the tiny config: METHODS.md identities, resume, 2 processes."""
import json
import os
import subprocess
import sys

import pytest
import torch

from fastcl.checkpoint import object_path
from fastcl.config import load_config
from fastcl.methods import METHODS
from fastcl.train import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs/test/tiny.yaml")
IFND = ["method.name=ifnd", "method.ifnd.levels=[4,8]", "method.ifnd.warmup_epochs=1"]


def losses(tmp_path, name, over, epochs=3):
    run = str(tmp_path / name)
    train(load_config(TINY, over + [f"trainer.run_dir={run}", f"trainer.epochs={epochs}"]))
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


def test_sce_lambda_one_is_moco(tmp_path):
    assert losses(tmp_path, "sce", ["method.name=sce", "method.sce.lam=1.0"]) == pytest.approx(
        losses(tmp_path, "moco", []), abs=1e-6)


def test_sce_soft_targets_change_training(tmp_path):
    assert losses(tmp_path, "sce", ["method.name=sce"])[3:] != pytest.approx(losses(tmp_path, "moco", [])[3:], abs=1e-3)


def test_sane_lambda_zero_is_moco_with_batch_negatives(tmp_path):
    base = ["method.batch_negatives=true"]
    assert losses(tmp_path, "sane", base + ["method.name=sane", "method.sane.lam=0.0"]) == pytest.approx(
        losses(tmp_path, "moco", base), abs=1e-6)


def test_ifnd_acceptance_zero_is_moco(tmp_path):
    assert losses(tmp_path, "ifnd", IFND + ["method.ifnd.accept_end=0.0"]) == pytest.approx(
        losses(tmp_path, "moco", []), abs=1e-6)


def test_ifnd_labels_follow_the_acceptance_schedule(tmp_path):
    run = tmp_path / "ifnd"
    train(load_config(TINY, IFND + [f"trainer.run_dir={run}", "trainer.epochs=4"]))
    recs = [json.loads(line) for line in open(run / "metrics.jsonl")]
    rates = [r["ifnd_rate"] for r in recs if "ifnd_rate" in r]
    accepted = [r["ifnd_accepted"] for r in recs if "ifnd_accepted" in r]
    assert rates[0] == 0.0 and rates == sorted(rates) and rates[-1] == 1.0  # warm-up, monotone, a(E) = 1
    assert accepted == sorted(accepted) and accepted[-1] == 1.0


def test_sepp_rho_zero_or_empty_table_is_moco(tmp_path, sepp_table):
    table, empty = sepp_table
    moco = losses(tmp_path, "moco", [])
    assert losses(tmp_path, "r0", ["method.name=sepp", f"method.sepp.table_path={table}", "method.sepp.rho=0.0",
                                   "method.sepp.mask_partners=false"]) == pytest.approx(moco, abs=1e-6)
    assert losses(tmp_path, "empty", ["method.name=sepp", f"method.sepp.table_path={empty}",
                                      "method.sepp.mode=multi"]) == pytest.approx(moco, abs=1e-6)
    assert losses(tmp_path, "pair", ["method.name=sepp", f"method.sepp.table_path={table}", "method.sepp.rho=1.0"]
                  )[3:] != pytest.approx(moco[3:], abs=1e-3)


def test_sepp_missing_table_is_a_clear_error(tmp_path, capsys):
    from fastcl.train import main
    assert main(["--config", TINY, "method.name=sepp", "method.sepp.table_path=/nope.npz",
                 f"trainer.run_dir={tmp_path}"]) == 2
    assert "method.sepp.table_path='/nope.npz'" in capsys.readouterr().err


# every registered method except the two baselines (tested everywhere else); a method without an entry here runs
# with its own defaults, so a new method is covered without editing this file
_SETTINGS = {
    "sane": ["method.name=sane", "method.batch_negatives=true"],
    "ifnd": IFND,
    "sepp": ["method.name=sepp"],  # table added per test
}
METHOD_OVERRIDES = {name: _SETTINGS.get(name, [f"method.name={name}"]) for name in METHODS
                    if name not in ("simclr", "mocov2")}


def _over(method, sepp_table):
    over = list(METHOD_OVERRIDES[method])
    if method == "sepp":
        over.append(f"method.sepp.table_path={sepp_table[0]}")
    return over


@pytest.mark.parametrize("method", sorted(METHOD_OVERRIDES))
def test_resume_is_exact_for_every_method(tmp_path, method, sepp_table):
    over = _over(method, sepp_table) + ["trainer.epochs=3", "trainer.ckpt_every=5"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    train(load_config(TINY, over + [f"trainer.run_dir={full}"]))
    train(load_config(TINY, over + [f"trainer.run_dir={part}", "trainer.max_steps=5"]))  # mid-epoch 1
    train(load_config(TINY, over + [f"trainer.run_dir={part}", "trainer.resume=auto"]))
    get = lambda d: {r["step"]: r["loss"] for r in map(json.loads, open(os.path.join(d, "metrics.jsonl"))) if "loss" in r}
    a, b = get(full), get(part)
    assert [abs(a[s] - b[s]) < 1e-6 for s in range(6, 13)] == [True] * 7, (a, b)
    sa = torch.load(object_path(os.path.join(full, "checkpoints/step_00000012"), "method"), weights_only=True)
    sb = torch.load(object_path(os.path.join(part, "checkpoints/step_00000012"), "method"), weights_only=True)
    for k in sa:
        if torch.is_tensor(sa[k]):
            assert torch.allclose(sa[k].float(), sb[k].float(), atol=1e-6), k
    if method == "ifnd":  # the miner's labels travel in the method's extra state
        la, lb = sa["_extra_state"]["miner"]["labels"], sb["_extra_state"]["miner"]["labels"]
        assert torch.equal(la, lb) and (la >= 0).any()


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHOD_OVERRIDES))
def test_two_processes(tmp_path, method, sepp_table):
    """2 gloo processes: queues identical across ranks, each id once per epoch; deterministic methods give
    the loss of the 1-process run (SANE permutes partners within each rank's batch, so it differs)."""
    n_samples = 64 if method == "sepp" else 48  # the SePP table is mined for all 64 synthetic samples
    over = _over(method, sepp_table) + [f"data.num_samples={n_samples}", "optim.lr=0.002"]
    worker = os.path.join(REPO, "tests/_dist_train_worker.py")
    bin_dir = os.path.dirname(sys.executable)
    for n in (1, 2) if method != "sane" else (2,):
        os.makedirs(tmp_path / f"w{n}")
        r = subprocess.run([os.path.join(bin_dir, "torchrun"), "--standalone", f"--nproc_per_node={n}", worker, TINY,
                            str(tmp_path / f"w{n}")] + over + [f"trainer.run_dir={tmp_path / f'r{n}'}"],
                           capture_output=True, text=True, timeout=300, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"w2/rank{r}.pt", weights_only=False) for r in (0, 1))
    assert torch.equal(r0["queue_ids"], r1["queue_ids"]) and torch.allclose(r0["queue_keys"], r1["queue_keys"])
    for ids in r0["ids"].values():
        assert sorted(ids) == list(range(n_samples))
    assert r0["losses"] == r1["losses"]  # all-reduced: every rank logs the same loss
    if method != "sane":
        one = torch.load(tmp_path / "w1/rank0.pt", weights_only=False)
        assert r0["losses"] == pytest.approx(one["losses"], abs=2e-5)


@pytest.mark.parametrize("method", ["mocov2", "simclr", "sce", "ifnd", "sane"])
def test_training_never_reads_labels(tmp_path, monkeypatch, method):
    """Permuting every label the loader hands out leaves training bit-identical (labels reach diagnostics only)."""
    over = {"mocov2": [], "simclr": ["method.name=simclr", "method.queue_size=0"],
            **{k: v for k, v in METHOD_OVERRIDES.items() if k in ("sce", "ifnd", "sane")}}[method]
    ref = losses(tmp_path, "ref", over)
    from fastcl.pipelines.batch import Batch
    from fastcl.pipelines.synthetic import SyntheticLoader
    orig_iter = SyntheticLoader.__iter__

    def permuted(self):
        self.labels = (self.labels * 7 + 3) % 11  # the label table too
        for b in orig_iter(self):
            yield Batch(b.views, b.index, (b.label * 7 + 3) % 11)

    monkeypatch.setattr(SyntheticLoader, "__iter__", permuted)
    assert losses(tmp_path, "perm", over) == ref


def test_ifnd_pseudo_label_precision_logged_only_once_clustered(tmp_path):
    """During IFND's warm-up there are no pseudo-labels: the diagnostic is absent, not a misleading 0."""
    run = tmp_path / "ifnd"
    train(load_config(TINY, IFND + [f"trainer.run_dir={run}", "trainer.epochs=3"]))
    recs = [json.loads(line) for line in open(run / "metrics.jsonl") if '"loss"' in line]
    assert recs and all("pseudo_label_precision_l0" not in r for r in recs if r["epoch"] == 0)
    last = [r["pseudo_label_precision_l0"] for r in recs if r["epoch"] == 2]  # clustered once acceptance > 0
    assert last and all(0.0 <= v <= 1.0 for v in last)


def test_ifnd_hierarchy_wiring():
    """method.ifnd.hierarchy: per_level replaces the pair's loss by the mean of the per-level losses (pair_loss),
    union keeps the one union-masked loss."""
    from fastcl.methods import build_method
    from fastcl.methods.base import Pair, Sims
    from fastcl.objectives import mean_soft_cross_entropy, one_hot_target, soft_cross_entropy
    from fastcl.objectives.loss import Target
    from fastcl.objectives.targets import ifnd_valid

    base = ["method.name=ifnd", "method.ifnd.levels=[2,3]", "method.queue_size=8", "method.kernel=torch"]
    g = torch.Generator().manual_seed(0)
    student = torch.rand(4, 10, generator=g) * 2 - 1
    pos = torch.arange(4)
    col_ids = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, -1, -1])
    valid = (col_ids >= 0).expand(4, -1).clone()
    sims = Sims(student, None, pos, valid, torch.arange(4), col_ids)
    labels = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 2, 2, 2, 2]])  # level 1 nested in level 0
    losses = {}
    for rule in ("per_level", "union"):
        m = build_method(load_config(None, base + [f"method.ifnd.hierarchy={rule}", "model.proj_dim=4"]), 8)
        m.miner.labels.copy_(labels)
        target = m.assign(sims, {})
        base_loss = soft_cross_entropy(student / m.tau, target.prob, target.valid)
        losses[rule] = m.pair_loss(Pair(0, 2, 1, 0, sims, torch.zeros(10, 4), target, base_loss), [], {}, 0)
    rows, cols = labels[:, :4], labels[:, col_ids.clamp(min=0)].masked_fill(col_ids < 0, -1)
    per_level = [ifnd_valid(pos, rows[lv:lv + 1], cols[lv:lv + 1], valid) for lv in range(2)]  # each level alone
    want = mean_soft_cross_entropy(student / 0.2, [Target(one_hot_target(pos, 10).prob, v) for v in per_level])
    torch.testing.assert_close(losses["per_level"], want)
    assert float(losses["union"]) < float(losses["per_level"])  # union = the coarse level: eliminates more


def test_a_method_is_lent_only_the_services_it_declares():
    """train.services fills exactly the method's `needs`: the oracle alone gets the true labels, SePP the loader's
    key-partner hook, IFND the embedding pass; MoCo-v2 gets none of them."""
    from types import SimpleNamespace

    from fastcl.methods import METHODS
    from fastcl.train import services

    loader = SimpleNamespace(labels=[3, 1, 2], set_key_partners=lambda ids, rho: None)
    lent = {name: services(cls, torch.device("cpu"), None, loader, None) for name, cls in METHODS.items()}
    filled = {name: {k for k in ("embed_pass", "key_partners", "dataset_labels") if getattr(s, k) is not None}
              for name, s in lent.items()}
    assert filled["oracle"] == {"dataset_labels"} and filled["sepp"] == {"key_partners"}
    assert filled["ifnd"] == {"embed_pass"} and filled["mocov2"] == set() and filled["sce"] == set()
    assert [n for n, f in filled.items() if "dataset_labels" in f] == ["oracle"]  # training never reads labels
    assert lent["oracle"].dataset_labels().tolist() == [3, 1, 2]
