"""Which engine a miner uses: faiss on GPU, faiss on CPU, or plain torch.

`choose_engine("auto", device)`: on a CUDA device faiss-gpu when faiss sees a GPU, else torch on that device (a
faiss-cpu search of GPU-resident features would copy them to the host and run on a few cores); on the CPU faiss-cpu
when installed, else torch. The trainer prints the engine it resolved and records it in fastcl_meta.json. The GPU check is explicit because faiss fails *silently* without GPUs (seen with faiss 1.x):
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


FAISS_DISTRIBUTIONS = ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cu11")
DEFAULT_GPU_TEMP_BYTES = 512 << 20  # faiss GPU scratch per device; its own default (~18 % of the GPU) competes
                                    # with the training step for memory


def installed_faiss() -> list[str]:
    """The faiss distributions pip installed here. Each installs the same top-level `faiss` package, so with two
    of them one silently shadows the other's files."""
    from importlib import metadata

    out = []
    for name in FAISS_DISTRIBUTIONS:
        try:
            metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        out.append(name)
    return out


def faiss_module():
    """The faiss module, or None when it is not installed (the torch fallback then does all mining). Two faiss
    distributions installed at once is an error naming both (`pip uninstall` one of them)."""
    both = installed_faiss()
    if len(both) > 1:
        raise ImportError(f"{' and '.join(both)} are both installed and share the top-level `faiss` package (one "
                          f"shadows the other); keep one: pip uninstall {both[0]}  (CPU: faiss-cpu, GPU: faiss-gpu)")
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


def choose_engine(pref: str = "auto", device=None) -> str:
    """Resolve a backend preference to one of "faiss-gpu" | "faiss-cpu" | "torch".

    pref: "auto" (see the module docstring; `device` is where the features live, default the CPU), "faiss" (the
    best faiss one; error without faiss), or a concrete backend name. Asking for a backend that cannot run here
    raises ValueError instead of silently running elsewhere.
    """
    if pref not in PREFERENCES:
        raise ValueError(f"unknown mining engine {pref!r}; expected one of {PREFERENCES}")
    on_cuda = device is not None and torch.device(device).type == "cuda"
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
    gpu = have_faiss and faiss_num_gpus() > 0
    if pref == "faiss":
        return "faiss-gpu" if gpu else "faiss-cpu"
    if on_cuda:
        return "faiss-gpu" if gpu else "torch"
    return "faiss-cpu" if have_faiss else "torch"


def gpu_resources(temp_memory_bytes: int | None = None):
    """The process-wide faiss.StandardGpuResources (created on first use).

    temp_memory_bytes: scratch budget faiss may reserve per device (None: DEFAULT_GPU_TEMP_BYTES, 512 MiB; faiss'
    own default, about 18% of the GPU memory, would compete with the training step).
    Only the first call's budget takes effect unless it changes, in which case the resource is rebuilt.
    """
    global _GPU_RES, _GPU_RES_TEMP
    faiss = faiss_module()
    if faiss is None or faiss_num_gpus() == 0:
        raise RuntimeError("faiss GPU resources requested but faiss sees no GPU")
    budget = DEFAULT_GPU_TEMP_BYTES if temp_memory_bytes is None else int(temp_memory_bytes)
    if _GPU_RES is None or budget != _GPU_RES_TEMP:
        res = faiss.StandardGpuResources()
        res.setTempMemory(budget)
        _GPU_RES, _GPU_RES_TEMP = res, budget
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
