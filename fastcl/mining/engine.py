"""Which engine a miner uses: faiss on GPU, faiss on CPU, or plain torch.

DESIGN.md "State contract": miners run on rank 0 with faiss GPU if `faiss.get_num_gpus() > 0`, else faiss CPU,
else torch. The GPU check is explicit because faiss fails *silently* without GPUs (seen with faiss 1.x):
`index_cpu_to_all_gpus` returns an empty index and `Kmeans(gpu=True)` quietly runs on CPU. So nothing here ever
asks faiss to "use all GPUs"; GPU indexes are built one by one on the current CUDA device with a shared
`StandardGpuResources`.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

ENGINES = ("faiss-gpu", "faiss-cpu", "torch")
PREFERENCES = ("auto", "faiss") + ENGINES

_GPU_RES = None          # lazily created faiss.StandardGpuResources, reused by every GPU index (allocating one
_GPU_RES_TEMP = None     # costs ~100s of ms and reserves its temp memory, so one per process is the right amount)


def faiss_module():
    """The faiss module, or None when it is not installed (the torch fallback then does all mining)."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def faiss_num_gpus() -> int:
    """GPUs faiss itself can use (0 for faiss-cpu builds, and for faiss-gpu builds on a machine without GPUs)."""
    faiss = faiss_module()
    if faiss is None or not hasattr(faiss, "get_num_gpus"):
        return 0
    return int(faiss.get_num_gpus())


def choose_engine(pref: str = "auto") -> str:
    """Resolve a backend preference to one of "faiss-gpu" | "faiss-cpu" | "torch".

    pref: "auto" (faiss-gpu if faiss imports and faiss.get_num_gpus() > 0, else faiss-cpu if faiss imports,
    else torch), "faiss" (the best faiss one; error without faiss), or a concrete backend name. Asking for a
    backend that cannot run here raises ValueError instead of silently running elsewhere.
    """
    if pref not in PREFERENCES:
        raise ValueError(f"unknown mining engine {pref!r}; expected one of {PREFERENCES}")
    have_faiss = faiss_module() is not None
    if pref == "torch":
        return "torch"
    if pref == "faiss-gpu":
        if faiss_num_gpus() == 0:
            raise ValueError("backend 'faiss-gpu' requested but faiss sees no GPU (faiss.get_num_gpus() == 0)")
        return "faiss-gpu"
    if pref in ("faiss-cpu", "faiss") and not have_faiss:
        raise ValueError(f"backend {pref!r} requested but faiss is not installed")
    if pref == "faiss-cpu":
        return "faiss-cpu"
    if have_faiss:
        return "faiss-gpu" if faiss_num_gpus() > 0 else "faiss-cpu"
    return "torch"


def gpu_resources(temp_memory_bytes: int | None = None):
    """The process-wide faiss.StandardGpuResources (created on first use).

    temp_memory_bytes: scratch budget faiss may reserve per device (None keeps faiss' default, about 18% of the
    GPU memory, which competes with the training step; give e.g. 512 MiB when mining between steps).
    Only the first call's budget takes effect unless it changes, in which case the resource is rebuilt.
    """
    global _GPU_RES, _GPU_RES_TEMP
    faiss = faiss_module()
    if faiss is None or faiss_num_gpus() == 0:
        raise RuntimeError("faiss GPU resources requested but faiss sees no GPU")
    if _GPU_RES is None or (temp_memory_bytes is not None and temp_memory_bytes != _GPU_RES_TEMP):
        res = faiss.StandardGpuResources()
        if temp_memory_bytes is not None:
            res.setTempMemory(int(temp_memory_bytes))
        _GPU_RES, _GPU_RES_TEMP = res, temp_memory_bytes
    return _GPU_RES


def gpu_device() -> int:
    """CUDA device for faiss GPU indexes: torch's current device, so miner and trainer share one GPU."""
    return torch.cuda.current_device() if torch.cuda.is_available() else 0


def flat_ip_index(d: int, backend: str):
    """Exact inner-product index (faiss.IndexFlatIP, or GpuIndexFlatIP on the current device)."""
    faiss = faiss_module()
    if backend == "faiss-gpu":
        cfg = faiss.GpuIndexFlatConfig()
        cfg.device = gpu_device()
        return faiss.GpuIndexFlatIP(gpu_resources(), d, cfg)
    if backend == "faiss-cpu":
        return faiss.IndexFlatIP(d)
    raise ValueError(f"flat_ip_index needs a faiss backend, got {backend!r}")


def to_gpu_index(index):
    """Move a CPU faiss index to the current GPU (single device: never index_cpu_to_all_gpus, see module doc)."""
    faiss = faiss_module()
    return faiss.index_cpu_to_gpu(gpu_resources(), gpu_device(), index)


def as_f32_numpy(x: Tensor) -> np.ndarray:
    """[N, D] tensor (any device/dtype) -> C-contiguous float32 host array, as faiss requires. Host sync."""
    return np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
