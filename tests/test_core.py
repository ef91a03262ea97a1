"""Queue, SampleTable, schedules, soft cross-entropy and single-process collectives."""
import math

import numpy as np
import torch
import torch.nn.functional as F

from fastcl import dist
from fastcl.memory import FeatureQueue, SampleTable
from fastcl.objectives import one_hot_target, soft_cross_entropy
from fastcl.schedules import cosine_ramp, warmup_cosine


def test_queue_masks_empty_slots_and_wraps():
    q = FeatureQueue(5, 2)
    assert not q.valid.any()
    q.push(torch.ones(3, 2), torch.tensor([10, 11, 12]))
    assert q.valid.tolist() == [True, True, True, False, False] and int(q.ptr) == 3
    q.push(torch.full((3, 2), 2.0), torch.tensor([13, 14, 15]))  # wraps around
    assert q.ids.tolist() == [15, 11, 12, 13, 14] and int(q.ptr) == 1
    q.push(torch.zeros(1, 2), torch.tensor([16]))  # a short last batch
    assert q.ids.tolist() == [15, 16, 12, 13, 14] and int(q.ptr) == 2
    q.push(torch.arange(14.0).view(7, 2), torch.arange(7))  # more than the queue holds: newest survive
    assert sorted(q.ids.tolist()) == [2, 3, 4, 5, 6]


def test_queue_state_dict_round_trip():
    q = FeatureQueue(4, 3)
    q.push(torch.randn(3, 3), torch.tensor([1, 2, 3]))
    r = FeatureQueue(4, 3)
    r.load_state_dict(q.state_dict())
    assert torch.equal(r.keys, q.keys) and torch.equal(r.ids, q.ids) and int(r.ptr) == 3


def test_sample_table_scatter_by_id():
    t = SampleTable(10, 4)
    t.update(torch.tensor([7, 2]), torch.ones(2, 4))
    assert t.seen.nonzero().flatten().tolist() == [2, 7] and t.feats[7].sum() == 4
    assert math.isclose(t.coverage(), 0.2, rel_tol=1e-6)


def test_schedules_shape_and_endpoints():
    lr = warmup_cosine(1.0, 100, 10)
    assert len(lr) == 100 and lr[9] == 1.0 and lr[0] == 0.1 and lr[-1] < 0.01 and np.all(np.diff(lr[10:]) <= 0)
    m = cosine_ramp(0.99, 1.0, 50)
    assert m[0] == 0.99 and m[-1] == 1.0 and np.all(np.diff(m) >= 0)


def test_soft_ce_equals_cross_entropy_for_one_hot():
    logits, pos = torch.randn(6, 9), torch.randint(0, 9, (6,))
    t = one_hot_target(pos, 9)
    assert torch.allclose(soft_cross_entropy(logits, t.prob), F.cross_entropy(logits, pos), atol=1e-6)


def test_soft_ce_masked_columns_leave_denominator_without_nan():
    logits, pos = torch.randn(4, 6), torch.zeros(4, dtype=torch.long)
    valid = torch.ones(4, 6, dtype=torch.bool)
    valid[:, 3:] = False
    t = one_hot_target(pos, 6, valid)
    loss = soft_cross_entropy(logits, t.prob, valid)
    assert torch.isfinite(loss)
    assert torch.allclose(loss, F.cross_entropy(logits[:, :3], pos), atol=1e-6)


def test_soft_ce_lower_bound_is_target_entropy():
    target = torch.softmax(torch.randn(3, 5), 1)
    ent = -(target * target.log()).sum(1).mean()
    assert soft_cross_entropy(target.log(), target) >= ent - 1e-6
    assert torch.allclose(soft_cross_entropy(target.log(), target), ent, atol=1e-6)


def test_collectives_single_process_paths():
    x = torch.randn(3, 2, requires_grad=True)
    assert dist.world_size() == 1 and dist.rank() == 0
    assert dist.gather(x) is x and dist.gather_with_grad(x) is x
    assert dist.broadcast_object({"a": 1}) == {"a": 1}
    assert torch.equal(dist.all_reduce_mean(x), x)
