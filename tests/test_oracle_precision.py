"""The degraded oracle (method.oracle.precision): detections of a chosen precision, recall or count
held fixed, seeded by (seed, step); p = 1 is the oracle itself."""
import os

import pytest
import torch

from fastcl.config import ConfigError, load_config
from fastcl.eval.diagnostics import fn_diagnostics
from fastcl.methods import Sims, build_method
from fastcl.methods.oracle import degrade_detections

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs/test/tiny.yaml")
N, CLASSES = 400, 4


def _oracle(precision, degrade="add", mode="elim"):
    cfg = load_config(TINY, ["method.name=oracle", f"method.oracle.precision={precision}",
                             f"method.oracle.degrade={degrade}", f"method.oracle.mode={mode}",
                             f"data.num_samples={N}"])
    m = build_method(cfg, N)
    m.labels.copy_((torch.arange(N) % CLASSES).view(1, -1))
    return m


def _sims(b=16, c=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    col_ids = torch.randperm(N, generator=g)[:c]
    row_ids = col_ids[:b]  # own key in the first b columns (MoCo layout)
    pos = torch.arange(b)
    valid = torch.ones(b, c, dtype=torch.bool)
    valid[:, :b] = False
    valid[pos, pos] = True
    return Sims(None, None, pos, valid, row_ids, col_ids)


def _measure(method, sims, step=3):
    target = method.assign(sims, {"step": step})
    return target, fn_diagnostics(sims, target, torch.arange(N) % CLASSES)


def test_precision_one_is_the_oracle():
    sims = _sims()
    a, b = _oracle(1.0).assign(sims, {}), _oracle(1.0, "replace").assign(sims, {})
    d = _measure(_oracle(1.0), sims)[1]
    assert torch.equal(a.prob, b.prob) and torch.equal(a.valid, b.valid)
    assert float(d["fn_masked_precision"]) == 1.0 and float(d["fn_masked_recall"]) == 1.0


@pytest.mark.parametrize("p", [0.75, 0.5, 0.25])
def test_add_keeps_recall_and_reaches_precision(p):
    sims = _sims()
    target, d = _measure(_oracle(p, "add"), sims)
    assert float(d["fn_masked_recall"]) == 1.0
    assert abs(float(d["fn_masked_precision"]) - p) < 0.03, float(d["fn_masked_precision"])
    assert bool(target.valid[torch.arange(16), sims.pos].all())  # the positive is never eliminated


@pytest.mark.parametrize("p", [0.75, 0.5, 0.25])
def test_replace_keeps_the_count(p):
    sims = _sims()
    oracle_t = _oracle(1.0).assign(sims, {})
    target, d = _measure(_oracle(p, "replace"), sims)
    assert int((~target.valid & sims.valid).sum()) == int((~oracle_t.valid & sims.valid).sum())
    assert abs(float(d["fn_masked_precision"]) - p) < 0.03 and abs(float(d["fn_masked_recall"]) - p) < 0.03


def test_below_base_rate_add_eliminates_every_negative():
    sims = _sims()
    target, _ = _measure(_oracle(0.1, "add"), sims)  # 4 classes: base rate 0.25 > 0.1
    assert int(target.valid.sum()) == 16  # only the positives remain


def test_draws_follow_the_step_and_attr_mode():
    sims = _sims()
    m = _oracle(0.5)
    a, b, c = (m.assign(sims, {"step": s}).valid for s in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    t = _oracle(0.5, mode="attr").assign(sims, {"step": 3})
    assert torch.allclose(t.prob.sum(1), torch.ones(16))
    assert int((t.prob > 0).sum()) > 16  # detections became positives


def test_degrade_detections_counts():
    det = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    gen = torch.Generator().manual_seed(0)
    out = degrade_detections(det, ~det, 0.5, "replace", gen)
    assert int((out & det).sum()) == 2 and int((out & ~det).sum()) == 2
    out = degrade_detections(det, ~det, 0.5, "add", gen)
    assert int((out & det).sum()) == 4 and int((out & ~det).sum()) == 4


@pytest.mark.parametrize("over", ["method.oracle.precision=0", "method.oracle.precision=1.5",
                                  "method.oracle.degrade=drop"])
def test_bad_values_name_the_key(over):
    with pytest.raises(ConfigError, match=over.split("=")[0]):
        load_config(TINY, ["method.name=oracle", over])
