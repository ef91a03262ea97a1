"""Host -> device copies that never stall the host (used by the loaders' device stage and the step)."""
from __future__ import annotations

import torch
from torch import Tensor


def host_to_device(t: Tensor, device: torch.device) -> Tensor:
    """Host tensor -> device without a sync (pinned + non_blocking for CUDA; the caching host allocator keeps the
    pinned copy alive until the transfer is done). A tensor already on a device is moved with .to()."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
