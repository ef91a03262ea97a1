"""fastcl.schedules: per-step arrays."""
import numpy as np

from fastcl.schedules import cosine_ramp, warmup_cosine


def test_schedules_shape_and_endpoints():
    lr = warmup_cosine(1.0, 100, 10)
    assert len(lr) == 100 and lr[9] == 1.0 and lr[0] == 0.1 and lr[-1] < 0.01 and np.all(np.diff(lr[10:]) <= 0)
    m = cosine_ramp(0.99, 1.0, 50)
    assert m[0] == 0.99 and m[-1] == 1.0 and np.all(np.diff(m) >= 0)


def test_epoch_granularity_is_the_moco_demo_schedule():
    """optim.schedule_granularity=epoch: one lr per epoch, held for all its steps, lr_e = 0.06 (1 + cos(pi e / E)) / 2
    with e counted from 1, which is what the MoCo CIFAR demo logs (epoch 1: 0.059996, epoch 2: 0.059985)."""
    import math

    from fastcl.config import load_config
    from fastcl.schedules import build_schedules

    cfg = load_config("configs/exp/cifar10_moco_demo.yaml", [])
    lr = build_schedules(cfg, 97)["lr"]
    assert len(lr) == 200 * 97
    per_epoch = lr.reshape(200, 97)
    assert (per_epoch == per_epoch[:, :1]).all()  # constant inside an epoch
    assert round(per_epoch[0, 0], 6) == 0.059996 and round(per_epoch[1, 0], 6) == 0.059985
    assert math.isclose(per_epoch[99, 0], 0.06 * (1 + math.cos(math.pi * 100 / 200)) / 2) and per_epoch[-1, 0] == 0
    step = build_schedules(load_config("configs/exp/cifar10_moco_demo.yaml", ["optim.schedule_granularity=step"]), 97)
    assert not (step["lr"].reshape(200, 97) == step["lr"].reshape(200, 97)[:, :1]).all()
