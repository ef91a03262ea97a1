"""fastcl.dist: single-process paths of the collectives (the 2-process paths run in test_train/test_step)."""
import torch

from fastcl import dist


def test_collectives_single_process_paths():
    x = torch.randn(3, 2, requires_grad=True)
    assert dist.world_size() == 1 and dist.rank() == 0
    assert dist.gather(x) is x and dist.gather_with_grad(x) is x
    assert dist.broadcast_object({"a": 1}) == {"a": 1}
    assert torch.equal(dist.all_reduce_mean(x), x)
