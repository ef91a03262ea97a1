"""`make demo`: pretrain on the bundled CIFAR-10 sample on CPU, then report kNN top-1 vs random init.

    python -m fastcl.lab.demo [key=value ...]     (overrides apply to configs/exp/demo.yaml)
"""
from __future__ import annotations

import os
import shutil
import sys
import time

from fastcl.config import load_config
from fastcl.lab.report import plot_curves
from fastcl.train import train
from fastcl.lab import REPO

SAMPLE_TAR = os.path.join(REPO, "data/cifar10_sample.tar.gz")
SAMPLE = os.path.join(REPO, "data/extracted/cifar10_sample")


def ensure_sample() -> str:
    """The bundled CIFAR-10 sample (5,000 train / 1,000 test JPEGs), extracted once into the ignored
    data/extracted/ (the same folder and marker as `make sample`)."""
    from fastcl.pipelines.extract import extract_once

    if not os.path.isfile(SAMPLE_TAR):
        sys.exit(f"the bundled sample {SAMPLE_TAR} is missing: this is not a complete fastcl checkout")
    return extract_once(SAMPLE_TAR, SAMPLE)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.chdir(REPO)  # the demo config uses repo-relative paths
    cfg = load_config("configs/exp/demo.yaml", argv)
    ensure_sample()
    shutil.rmtree(cfg.trainer.run_dir, ignore_errors=True)  # the demo always starts fresh
    t0 = time.time()
    result = train(cfg)
    minutes = (time.time() - t0) / 60
    png = plot_curves([cfg.trainer.run_dir], os.path.join(cfg.trainer.run_dir, "curves.png"))
    init, final = result["knn_init"], result["knn_top1"]
    print("\n" + "=" * 72)
    print(f"fastcl demo: {cfg.method.name} / {cfg.model.arch} on {cfg.data.path} ({result['steps']} steps, "
          f"{minutes:.1f} min)")
    print(f"kNN top-1 (k={cfg.trainer.knn_k}, T={cfg.trainer.knn_t}) on the 1,000 held-out test images:")
    print(f"  random initialisation: {init:6.2f} %")
    print(f"  after pretraining:     {final:6.2f} %   ({final - init:+.2f} points)")
    print(f"curves: {png}   metrics: {cfg.trainer.run_dir}/metrics.jsonl")
    print("=" * 72)
    return 0 if final > init else 1


if __name__ == "__main__":
    sys.exit(main())
