"""fastcl.schedules: per-step arrays."""
import numpy as np

from fastcl.schedules import cosine_ramp, warmup_cosine


def test_schedules_shape_and_endpoints():
    lr = warmup_cosine(1.0, 100, 10)
    assert len(lr) == 100 and lr[9] == 1.0 and lr[0] == 0.1 and lr[-1] < 0.01 and np.all(np.diff(lr[10:]) <= 0)
    m = cosine_ramp(0.99, 1.0, 50)
    assert m[0] == 0.99 and m[-1] == 1.0 and np.all(np.diff(m) >= 0)
