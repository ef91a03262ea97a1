"""fastcl data pipelines (installed as `fastcl.pipelines`)."""
from __future__ import annotations

import importlib

from fastcl.pipelines.batch import LOADERS, Batch, Loader

# backend name -> module that registers it. Imported on demand: ffcv/dali are optional extras.
_BACKEND_MODULES = {
    "synthetic": "fastcl.pipelines.synthetic",
    "torch": "fastcl.pipelines.torch_loader",
    "gpu_tensor": "fastcl.pipelines.gpu_tensor",
    "ffcv": "fastcl.pipelines.ffcv_loader",
    "dali": "fastcl.pipelines.dali_loader",
}


def build_loader(cfg, rank: int, world: int, device, split: str = "train") -> Loader:
    """Build the configured backend's Loader for this rank (each backend shards itself)."""
    name = cfg.data.backend
    if name not in _BACKEND_MODULES:
        raise ValueError(f"data.backend: unknown backend {name!r}; choose one of {sorted(_BACKEND_MODULES)}")
    try:
        importlib.import_module(_BACKEND_MODULES[name])
    except ImportError as e:
        raise RuntimeError(f"data.backend={name!r} needs an optional dependency that is not installed: {e}. "
                           f"Install it with `pip install fastcl[{name}]`.") from e
    return LOADERS[name](cfg, rank=rank, world=world, device=device, split=split)


__all__ = ["Batch", "Loader", "LOADERS", "build_loader"]
