"""Shared timing and evidence helpers for the benchmarks."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from typing import Callable

import torch


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def hardware() -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        try:
            q = subprocess.run(["nvidia-smi", "-q"], capture_output=True, text=True, timeout=20).stdout
            info["nvidia_smi"] = [ln.strip() for ln in q.splitlines()
                                  if any(k in ln for k in ("Product Name", "Graphics", "SM ", "Memory  ", "Max Clocks"))][:20]
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def sync(device: torch.device | str | None = None) -> None:
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def time_repeats(fn: Callable[[], object], repeats: int = 5, warmup: int = 1,
                 device: torch.device | str | None = None) -> dict:
    """Run fn warmup times untimed, then `repeats` timed runs (synchronizing CUDA). Seconds per run."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times, "repeats": repeats,
            "warmup": warmup, "method": "time.perf_counter around the call, CUDA synchronized"}


def write_evidence(name: str, result: dict, out_dir: str = "docs/benchmarks") -> str:
    """Write result + commit + hardware as JSON; returns the path."""
    os.makedirs(out_dir, exist_ok=True)
    payload = {"benchmark": name, "commit": git_commit(), "hardware": hardware(),
               "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **result}
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    print(f"wrote {path}")
    return path
