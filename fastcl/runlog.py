"""What a run records around its loop: metrics.jsonl and the experiment trackers, the progress bar and the
throughput window, the kNN monitor and the online probe, and result.json. The loop (fastcl/train.py `_train`)
makes one call here per event: a step, a log step, an epoch end, the end of the run.
"""
from __future__ import annotations

import json
import os
import time

import torch
from omegaconf import OmegaConf

from fastcl import dist
from fastcl.config import save_config
from fastcl.eval.monitor import KnnMonitor
from fastcl.health import memory_use


def flat_config(cfg) -> dict:
    """Flat primitive dict of the config for the trackers' hyperparameters (TensorBoard's hparams)."""
    out = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


def diagnose(method, logs: dict, loader) -> dict:
    """The method's false-negative diagnostics of the step's last pair (reads TRUE labels; logging only)."""
    labels = getattr(loader, "labels", None)
    if labels is None or "_sims" not in logs or not bool((torch.as_tensor(labels) >= 0).any()):  # host sync
        return {}
    return method.diagnostics(logs["_sims"], logs["_target"], torch.as_tensor(labels))


class RunLog:
    """Records of one run. Built before anything is written, so that a bad evaluation folder or probe setting is
    one error line (ValueError) before the run directory is touched."""

    def __init__(self, cfg, accelerator, parts, loader, state, last_step: int):
        from fastcl.eval.online_probe import OnlineProbe  # READS LABELS, like the oracle; off by default

        self.cfg, self.t, self.acc, self.parts, self.loader, self.state = cfg, cfg.trainer, accelerator, parts, \
            loader, state
        self.is_main, self.last_step = accelerator.is_main_process, last_step
        self.knn = KnnMonitor(cfg, self.is_main)
        self.backbone = accelerator.unwrap_model(parts.student).encoder.backbone
        self.probe = OnlineProbe.build(cfg, loader, self.knn, self.backbone)
        self.result = {"knn_top1": None, "knn_init": None, "world_size": accelerator.num_processes}
        self.metrics_path = os.path.join(self.t.run_dir, "metrics.jsonl")
        self._knn_step = None  # step of the last kNN evaluation
        self.bar = None

    def open(self, resumed: str | None, expect: dict) -> None:
        """config.yaml and the trackers, the start line, the kNN baseline of a fresh run, the progress bar."""
        from tqdm import tqdm

        from fastcl import kernels
        from fastcl.trackers import init_kwargs

        if self.is_main:
            save_config(self.cfg, os.path.join(self.t.run_dir, "config.yaml"))
        self.acc.init_trackers("fastcl", config=flat_config(self.cfg),
                               init_kwargs=init_kwargs([str(x) for x in self.acc.log_with], self.t.run_dir))
        if self.is_main:
            print(f"fastcl: {self.cfg.method.name} on {self.acc.device} x{self.acc.num_processes}, mining engine "
                  f"{expect['mining_engine']}, target kernels {kernels.describe(self.cfg.method.kernel, self.acc.device)}",
                  flush=True)
        if resumed is None:
            self.evaluate(0)  # the same network at random initialisation: the baseline the run must beat
        elif self.is_main:
            s = self.state
            print(f"resumed from {resumed} at step {s.step} (epoch {s.epoch}, batch {s.batches_done})")
        self.bar = tqdm(total=self.last_step, initial=self.state.step, dynamic_ncols=True, desc=self.cfg.method.name,
                        disable=not (self.is_main and self.t.progress))
        self._window = (time.perf_counter(), 0)

    def record(self, rec: dict) -> None:
        """One record to metrics.jsonl (rank 0) and to every tracker, at rec["step"]."""
        if not rec:
            return
        rec = {k: (float(v) if torch.is_tensor(v) else v) for k, v in rec.items()}  # host sync (log steps)
        if self.is_main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        self.acc.log({k: v for k, v in rec.items() if isinstance(v, (int, float))}, step=rec["step"])

    def evaluate(self, epoch: int) -> None:
        """kNN monitor (trainer.knn_features: backbone | head) and the online probe; a collective."""
        if not self.knn.enabled:
            return
        enc = self.acc.unwrap_model(self.parts.student).encoder
        rec = self.knn(enc if self.t.knn_features == "head" else enc.backbone)
        if self.probe is not None:
            rec.update(self.probe.evaluate(self.backbone, self.knn))
        self.result["knn_top1"] = rec["knn_top1"]
        if self.result["knn_init"] is None:
            self.result["knn_init"] = rec["knn_top1"]
        self.record({"step": self.state.step, "epoch": epoch, **rec})
        self._knn_step = self.state.step

    def epoch_start(self, logs: dict) -> None:
        """The method's epoch-hook metrics (IFND's clustering)."""
        if logs:
            self.record({"step": self.state.step, "epoch": self.state.epoch, **logs})

    def step_done(self, batch, logs: dict, sc: dict, health) -> None:
        """After every step: the online probe's own update, the bar; at log steps the train record."""
        if self.probe is not None:  # detached features, its own optimizer (reads labels)
            self.probe.step(self.backbone, batch)
        self.bar.update(1)
        t0, n = self._window
        self._window = (t0, n + 1)
        s = self.state
        if s.step % self.t.log_every and s.step != self.last_step:
            return
        health.check(self.t.run_dir)  # host sync: the only one of the hot path (with the loss read below)
        loss = float(dist.all_reduce_mean(logs["loss"]))
        now = time.perf_counter()
        ips = (n + 1) * self.cfg.optim.batch_size / max(now - t0, 1e-9)
        self._window = (now, 0)
        self.record({"step": s.step, "epoch": s.epoch, "loss": loss, "lr": float(sc["lr"]), "img_per_s": ips,
                     "pos_sim": logs["pos_sim"], "grad_norm": logs["grad_norm"], "skipped_steps": health.skipped,
                     **memory_use(self.acc.device), **self.parts.timer.read(),
                     **diagnose(self.parts.method, logs, self.loader)})
        self.result["final_loss"] = loss
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{float(sc['lr']):.3g}", img_s=f"{ips:.0f}")

    def epoch_end(self) -> None:
        if self.t.knn_every and self.state.epoch % self.t.knn_every == 0:
            self.evaluate(self.state.epoch)

    def close(self, preempted: bool) -> dict:
        """The final network's kNN (unless just measured or stopped early), end of the trackers, result.json."""
        self.bar.close()
        if preempted:
            self.result["preempted"] = True
        elif self.knn.enabled and self._knn_step != self.state.step:
            self.evaluate(self.state.epoch)
        self.acc.end_training()
        self.result["steps"] = self.state.step
        if self.is_main:
            with open(os.path.join(self.t.run_dir, "result.json"), "w") as f:
                json.dump(self.result, f, indent=2)
        return self.result
