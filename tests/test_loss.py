"""fastcl.objectives.loss: the one soft cross-entropy."""
import torch
import torch.nn.functional as F

from fastcl.objectives import one_hot_target, soft_cross_entropy


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
