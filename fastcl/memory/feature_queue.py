"""FeatureQueue: a FIFO ring of past keys AND their global sample ids (MoCo's dictionary).

Ids travel with the keys so that label-assignment methods can look up per-sample state (IFND pseudo-labels,
SePP partners, diagnostics) for queue columns. Empty slots carry id -1 and are reported invalid: they are
never treated as zero vectors in the softmax.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class FeatureQueue(nn.Module):
    def __init__(self, size: int, dim: int):
        super().__init__()
        self.size = size
        self.register_buffer("keys", torch.zeros(size, dim))
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))  # checkpointed copy of the pointer
        self._host_ptr: int | None = 0  # host mirror: the pointer only depends on push sizes, no device read
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "_host_ptr", None))

    @property
    def valid(self) -> Tensor:
        """[K] bool: slots that hold a key."""
        return self.ids >= 0

    @torch.no_grad()
    def push(self, keys: Tensor, ids: Tensor) -> None:
        """Write keys [n,D] / ids [n] at the pointer, wrapping around. Any n (a short last batch too).

        Called with the keys gathered from ALL ranks, so every rank holds the same queue.
        """
        n = keys.shape[0]
        if n == 0 or self.size == 0:
            return
        if n > self.size:  # only the newest `size` keys can survive
            keys, ids, n = keys[-self.size:], ids[-self.size:], self.size
        if self._host_ptr is None:  # first push after loading a checkpoint
            self._host_ptr = int(self.ptr)  # host sync, once per resume
        p = self._host_ptr
        slots = (torch.arange(n, device=self.keys.device) + p) % self.size
        self.keys[slots] = keys.to(self.keys.dtype)
        self.ids[slots] = ids.to(self.ids.device)
        self._host_ptr = (p + n) % self.size
        self.ptr.fill_(self._host_ptr)
