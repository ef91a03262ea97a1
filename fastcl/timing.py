"""Per-stage step timing without host syncs in the hot path.

CUDA: each stage records a pair of CUDA events; elapsed times are read (one synchronize) only when the
trainer logs. CPU: perf_counter deltas. `read()` returns mean seconds per step of each stage since the
last read, as `t_<stage>` keys for metrics.jsonl.
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch


class StageTimer:
    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self._cpu: dict[str, float] = defaultdict(float)
        self._events: dict[str, list] = defaultdict(list)
        self._steps = 0

    @contextmanager
    def __call__(self, stage: str):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events[stage].append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._cpu[stage] += time.perf_counter() - t0

    def step_done(self) -> None:
        self._steps += 1

    def read(self) -> dict[str, float]:
        """Mean seconds per step per stage since the last read (synchronizes CUDA once)."""
        n = max(self._steps, 1)
        out = {f"t_{k}": v / n for k, v in self._cpu.items()}
        if self._events:
            torch.cuda.synchronize()  # host sync: log steps only
            for k, pairs in self._events.items():
                out[f"t_{k}"] = sum(s.elapsed_time(e) for s, e in pairs) / 1000 / n
        self._cpu.clear()
        self._events.clear()
        self._steps = 0
        return out
