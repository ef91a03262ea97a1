"""Experiment trackers: `trainer.trackers` -> accelerate's `log_with` + per-tracker init arguments.

    trainer.trackers=[tensorboard]            # default: <run_dir>/tb event files
    trainer.trackers=[tensorboard,wandb]      # + Weights & Biases (WANDB_MODE=offline: local run files only)
    trainer.trackers=[mlflow]                 # MLflow (default: a file store in <run_dir>/mlruns;
                                              #   MLFLOW_TRACKING_URI, e.g. sqlite:///mlflow.db or a server, wins)
    trainer.trackers=[]                       # metrics.jsonl only

Every tracker receives the numbers metrics.jsonl gets (the trainer's `log()` sends the same record to both),
at the same `step`, and the flattened config as hyperparameters. Run names: the basename of trainer.run_dir;
W&B project / MLflow experiment: "fastcl" (MLFLOW_EXPERIMENT_NAME overrides the latter).

A tracker whose package is missing fails before training starts, with the pip command that installs it
(accelerate itself would silently drop it). TensorBoard keeps its old lenient behaviour: without it the run
trains with a warning (metrics.jsonl has every number anyway).
"""
from __future__ import annotations

import importlib.util
import os
import warnings

# name -> (importable module, pip command)
TRACKERS = {
    "tensorboard": ("tensorboard", "pip install tensorboard"),
    "wandb": ("wandb", "pip install 'fastcl[trackers]'  (or: pip install wandb)"),
    "mlflow": ("mlflow", "pip install 'fastcl[trackers]'  (or: pip install mlflow-skinny)"),
}
PROJECT = "fastcl"


class TrackerError(ValueError):
    """An unknown tracker name or a tracker package that is not installed; the message says how to fix it."""


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def resolve(names) -> list[str]:
    """`trainer.trackers` -> the list for accelerate's `log_with` (checked: known names, packages installed)."""
    out = []
    for name in list(names or []):
        name = str(name).strip().lower()
        if name not in TRACKERS:
            raise TrackerError(f"trainer.trackers: unknown tracker {name!r}; choose from {sorted(TRACKERS)}")
        module, pip = TRACKERS[name]
        if not _importable(module) and not (name == "tensorboard" and _importable("tensorboardX")):
            if name == "tensorboard":
                warnings.warn("TensorBoard is not installed: no tb/ event files (metrics.jsonl is written as always)")
                continue
            raise TrackerError(f"trainer.trackers: {name!r} is not installed; install it with `{pip}`, or remove "
                               f"it from trainer.trackers")
        if name not in out:
            out.append(name)
    return out


def init_kwargs(names: list[str], run_dir: str) -> dict:
    """accelerate `init_trackers(init_kwargs=...)`: W&B and MLflow write under the run directory by default."""
    run_name = os.path.basename(os.path.normpath(os.path.abspath(run_dir))) or "run"
    kw: dict = {}
    if "wandb" in names:
        os.makedirs(run_dir, exist_ok=True)
        kw["wandb"] = {"dir": os.path.abspath(run_dir), "name": run_name}
    if "mlflow" in names:
        kw["mlflow"] = {"run_name": run_name}
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            import mlflow

            # MLflow 3.x refuses the file store unless opted in: it is the dependency-free local store
            # (mlflow-skinny has no SQL backend); set MLFLOW_TRACKING_URI for sqlite or a tracking server
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri(f"file://{os.path.abspath(os.path.join(run_dir, 'mlruns'))}")
    return kw
