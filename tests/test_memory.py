"""fastcl.memory: FeatureQueue (keys + ids, empty slots masked) and SampleTable."""
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


def test_sample_table_repeated_ids_write_the_last_occurrence_in_any_order():
    """A symmetric step pushes every id twice. Whatever order the device applies the writes in (CUDA leaves it to
    the scheduler), the table ends with each id's LAST row: every occurrence writes that row."""
    from fastcl.memory.sample_table import last_occurrence

    ids = torch.tensor([3, 5, 3, 7, 5, 3])
    feats = torch.arange(6, dtype=torch.float32)[:, None].expand(6, 4).clone()
    src = last_occurrence(ids, 10)
    assert src.tolist() == [5, 4, 5, 3, 4, 5]
    want = SampleTable(10, 4, torch.float32)
    want.update(ids, feats)
    assert want.feats[3, 0] == 5 and want.feats[5, 0] == 4 and want.feats[7, 0] == 3
    g = torch.Generator().manual_seed(0)
    for _ in range(5):  # the writes applied one by one in a random order give the same table
        table = torch.zeros(10, 4)
        for i in torch.randperm(6, generator=g).tolist():
            table[ids[i]] = feats[src[i]]
        assert torch.equal(table, want.feats)
