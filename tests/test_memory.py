"""fastcl.memory: FeatureQueue (keys + ids, empty slots masked) and SampleTable."""
import math
import torch

from fastcl.memory import FeatureQueue, SampleTable


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
