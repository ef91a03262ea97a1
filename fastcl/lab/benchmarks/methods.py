"""Same-budget comparison of every method: `python -m fastcl.bench methods [--epochs 12] [--out runs/compare]`.

Each method trains the same network (configs/exp/compare_cpu.yaml: MoCo-v2 base, ResNet-18, bundled CIFAR-10 sample) for the
same number of epochs with the same optimiser, then the runs are reported side by side (kNN curves, FN
diagnostics, stage times). SePP's partner table is mined from the MoCo-v2 run of the same comparison (its EMA
backbone), so SePP runs after it. Extra `key=value` overrides apply to every run (e.g. data.path=... for full
CIFAR-10). Results table: <out>/report/report.md, JSON summary: <out>/summary.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time

from fastcl.config import load_config
from fastcl.methods import METHODS
from fastcl.train import train

# method -> overrides on top of the shared base. Method hyperparameters are each config's CIFAR values; a method
# without an entry runs with its own section's defaults (`method.name=<name>`), so every registered method is here.
_TUNED = {
    "mocov2": [],
    # SimCLR: global BN over the whole batch (its recipe), not the MoCo base's 8 simulated devices
    "simclr": ["method.name=simclr", "method.queue_size=0", "method.tau=0.2", "model.bn_splits=1"],
    "sce": ["method.name=sce", "method.tau=0.1", "method.sce.tau_m=0.05",
            "data.aug.views.0.jitter_p=0.0", "data.aug.views.0.gray_p=0.0"],  # weak target view (SCE CIFAR)
    "ifnd": ["method.name=ifnd", "method.ifnd.levels=[10,20,40]", "method.ifnd.warmup_epochs={warmup}"],
    "sane": ["method.name=sane", "method.batch_negatives=true", "method.sane.tau_prime=0.8", "method.sane.kappa=2.0"],
    "sepp": ["method.name=sepp", "method.sepp.table_path={table}"],
    "oracle": ["method.name=oracle"],
}
METHOD_RUNS = {name: _TUNED.get(name, [f"method.name={name}"]) for name in ["mocov2", *METHODS]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description="same-budget comparison of the methods")
    ap.add_argument("--config", default="configs/exp/compare_cpu.yaml")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--methods", nargs="+", default=list(METHOD_RUNS), choices=list(METHOD_RUNS))
    ap.add_argument("--out", default="runs/compare")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    if "sepp" in a.methods and "mocov2" not in a.methods and not os.path.isdir(os.path.join(a.out, "mocov2")):
        ap.error(f"SePP mines its partners with this comparison's MoCo-v2 run: add mocov2 to --methods "
                 f"(or keep {os.path.join(a.out, 'mocov2')} from an earlier comparison)")
    os.makedirs(a.out, exist_ok=True)
    base = [f"trainer.epochs={a.epochs}", f"trainer.knn_every={max(a.epochs // 4, 1)}", "trainer.progress=false"]
    base += list(a.overrides)
    # IFND's warm-up: a third of the run, at least one epoch, but never the whole run (then IFND = MoCo-v2)
    fill = {"warmup": min(max(a.epochs // 3, 1), a.epochs - 1), "table": os.path.join(a.out, "sepp_table.npz")}
    summary, dirs = {}, []
    for name in sorted(a.methods, key=lambda m: m == "sepp"):  # SePP needs the MoCo-v2 checkpoint
        run = os.path.join(a.out, name)
        shutil.rmtree(run, ignore_errors=True)
        if name == "sepp":
            from fastcl.mining.sepp import mine
            moco = os.path.join(a.out, "mocov2")
            cfg = load_config(a.config, base)
            summary["sepp_mining"] = mine(moco, cfg.data.path, fill["table"], k=5, threshold=0.5)
        over = [o.format(**fill) for o in METHOD_RUNS[name]] + base + [f"trainer.run_dir={run}"]
        t0 = time.time()
        res = train(load_config(a.config, over))
        summary[name] = {**res, "minutes": round((time.time() - t0) / 60, 2)}
        dirs.append(run)
        print(name, json.dumps(summary[name]), flush=True)
        if res.get("preempted"):  # SIGTERM/SIGUSR1 stopped this run (checkpointed): stop the comparison too
            print(f"stopped by a signal during {name}; its run resumes with --resume auto", flush=True)
            return summary
    with open(os.path.join(a.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    from fastcl.lab import report
    report.main(dirs + ["--out", os.path.join(a.out, "report")])
    return summary


if __name__ == "__main__":
    main()
