"""The ladder protocol of the study: one long MoCo-v2 run whose end-of-epoch checkpoints at `--rungs` are bases of
increasing quality, each measured (kNN on the test split, linear probe), then every method continuing from every
rung (the payoff map: which label-assignment fix pays at which encoder quality).

    python -m fastcl.lab.study --protocol ladder --config configs/exp/cifar10_ladder.yaml --rungs 2 5 10 20 30 \
        --epochs E1 [--base-only] [key=value ...]

Layout under <out>/ladder/: `_base/` (the long run: trainer.epochs = the last rung, trainer.keep_epochs = the
rungs, so their checkpoints survive ckpt_keep), `rungs.json` (per rung: its checkpoint, kNN top-1 k=200/20, linear
probe top-1), and per rung `e<R>/<variant>/seed<s>/`: a fresh run of E1 epochs started from the rung's weights,
EMA teacher, optimizer state and queue (trainer.init_from=<rung checkpoint>, trainer.init_position=reset: its own
schedule over E1 epochs, step 0 and its own seeded RNG, so seeds differ in augmentation and data order). Every run
resumes when interrupted and is skipped when finished, as in the other protocols.

The continuations run rung by rung, the top rung first (the closest to the papers' regime); after each rung its summary (e<R>/summary.*) and the payoff map
so far (map.json / map.md / map.png, fastcl/lab/study/payoff.py) are written, so an interrupted map still reports
every finished rung. With `--sweep fn-precision` the degraded-oracle points run last and at one rung only: the
lowest whose oracle interval lies above 0, else the top rung (the break-even reading).
"""
from __future__ import annotations

import json
import os

from fastcl.lab.study.runs import RunSpec, StudyError, evaluate

BASE = "_base"


def shared(a) -> list[str]:
    """The key=value overrides of every ladder run; trainer.keep_epochs is left out: --rungs decide it."""
    return [o for o in a.overrides if not o.startswith("trainer.keep_epochs=")]


def base_spec(a, root: str) -> RunSpec:
    """The long MoCo-v2 run: seed 0, schedule over the last rung's epochs, every rung's checkpoint kept."""
    over = [f"trainer.epochs={max(a.rungs)}", f"trainer.keep_epochs=[{','.join(map(str, sorted(a.rungs)))}]",
            f"trainer.knn_every={a.base_knn_every}", "trainer.progress=false", "trainer.seed=0",
            f"trainer.run_dir={os.path.join(root, BASE)}"] + shared(a)
    return RunSpec(BASE, 0, os.path.join(root, BASE), over, "mocov2")


def rung_checkpoint(base_dir: str, epoch: int) -> str:
    """The checkpoint the base wrote at the end of `epoch` (found by its recorded position, not by name)."""
    from fastcl.checkpoint import META, list_checkpoints

    for path in list_checkpoints(base_dir):
        with open(os.path.join(path, META)) as f:
            m = json.load(f)
        if m.get("epoch") == epoch and m.get("batches_done") == 0:
            return path
    raise StudyError(f"no checkpoint of {base_dir} at the end of epoch {epoch} (trainer.keep_epochs lacks it?)")


def continuation_specs(a, root: str, variants: dict, base_dir: str, rungs: list[int]) -> list[RunSpec]:
    """Per rung (of `rungs`), seed and variant: E1 epochs from the rung checkpoint. SePP's partners are mined once
    per rung (<root>/e<R>/_tables/partners.npz: the rung's teacher, the same for every seed)."""
    common = [f"trainer.epochs={a.epochs}", "trainer.knn_every=0", "trainer.progress=false",
              "trainer.init_position=reset"]
    specs = []
    for r in sorted(rungs):
        ck = rung_checkpoint(base_dir, r)
        table = partner_table(root, r)
        for s in a.seeds:
            for name, v in variants.items():
                run_dir = os.path.join(root, f"e{r}", name, f"seed{s}")
                over = [o.format(table=table, warmup=0) for o in v["overrides"]]
                if v["method"] == "ifnd":  # detect from the first continued epoch, clusters of the rung's encoder
                    over = [o for o in over if not o.startswith(("method.ifnd.warmup_epochs", "method.ifnd.source"))]
                    over += ["method.ifnd.warmup_epochs=0", "method.ifnd.source=pass"]
                over = common + [f"trainer.seed={s}"] + over + [f"trainer.init_from={ck}",
                                                                 f"trainer.run_dir={run_dir}"] + shared(a)
                over.append("trainer.keep_epochs=[]")  # the rungs are the base's; a continuation pins none
                specs.append(RunSpec(name, s, run_dir, over, v["method"],
                                     {"source": ck, "path": table} if v["method"] == "sepp" else {},
                                     {**v["info"], "rung": r}))
    return specs


def partner_table(root: str, rung: int) -> str:
    """SePP's partner table of a rung (mined from the rung checkpoint's teacher)."""
    return os.path.join(root, f"e{rung}", "_tables", "partners.npz")


def partner_precision(root: str, base_dir: str, rung: int, threshold: float) -> float | None:
    """SePP's partner precision at a rung: the share of same-class pairs among the rung table's partners with
    cosine >= `threshold` (true labels, read for the report only); None before the table is mined."""
    from fastcl.lab.study.runs import mine_partners, partner_precision_curve

    path = partner_table(root, rung)
    if not os.path.isfile(path):
        return None
    table = mine_partners(rung_checkpoint(base_dir, rung), path)  # mined already: loads it with the labels
    return partner_precision_curve(table, [threshold])[0]["partner_precision"]


def linear_probe(ckpt: str, bank: str, test: str, workers: int) -> float | None:
    """Top-1 (%) of the sound linear probe (fastcl.eval.linear, moco protocol, lr sweep) of a rung's student
    backbone; cached in <ckpt>/study_linear.json. None on synthetic data (no labelled folders)."""
    if not test:
        return None
    out = os.path.join(ckpt, "study_linear.json")
    if not os.path.isfile(out):
        from fastcl.eval import linear

        tmp = out + ".tmp.json"
        args = ["--checkpoint", ckpt, "--data", bank, "--val", test, "--out", tmp, "--no-progress",
                "--workers", str(workers), "--device", "cpu"]
        if linear.main(args) != 0:
            raise StudyError(f"linear probe of {ckpt} failed")
        os.replace(tmp, out)
    with open(out) as f:
        r = json.load(f)
    return float(r["top1"])


def measure_rungs(a, base_dir: str, bank: str, test: str, out: str) -> list[dict]:
    """kNN and linear probe of every rung; written to `out` (rungs.json) and returned."""
    rungs = []
    for r in sorted(a.rungs):
        ck = rung_checkpoint(base_dir, r)
        knn = evaluate(ck, bank, test, a.workers)
        lin = linear_probe(ck, bank, test, a.workers) if a.rung_probe else None
        rungs.append({"epoch": r, "checkpoint": os.path.relpath(ck, os.path.dirname(out)), "knn": knn,
                      "linear_top1": lin})
        print(f"rung e{r}: kNN top-1 k=200 {knn['200']:.2f} k=20 {knn['20']:.2f}"
              + (f", linear {lin:.2f}" if lin is not None else ""), flush=True)
    with open(out, "w") as f:
        json.dump({"rungs": rungs, "base": os.path.relpath(base_dir, os.path.dirname(out)),
                   "curve": base_curve(base_dir)}, f, indent=1)
    return rungs


def base_curve(base_dir: str) -> list[dict]:
    """The base run's kNN monitor records [{epoch, knn_top1}] (metrics.jsonl)."""
    path = os.path.join(base_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    recs = [json.loads(line) for line in open(path)]
    return [{"epoch": r["epoch"], "knn_top1": r["knn_top1"]} for r in recs if "knn_top1" in r]


def check(a, cfg) -> None:
    """Ladder arguments that argparse cannot check alone."""
    if not a.rungs:
        raise StudyError("--protocol ladder needs --rungs (epochs of the base whose checkpoints are the rungs)")
    if min(a.rungs) < 1 or len(set(a.rungs)) != len(a.rungs):
        raise StudyError(f"--rungs must be distinct epochs >= 1, got {a.rungs}")
    if cfg.trainer.keep_epochs and sorted(cfg.trainer.keep_epochs) != sorted(a.rungs):
        print(f"study: --rungs {sorted(a.rungs)} replace the config's trainer.keep_epochs "
              f"{list(cfg.trainer.keep_epochs)}", flush=True)
