"""The study command: argument checks, the run plan, the loop (fastcl/lab/study/__init__.py says what it does)."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

from fastcl.lab.study.runs import (RunSpec, StudyError, check_spec, evaluate, finished, fn_variant, mine_partners,
                                   sepp_variant, train_run)

SWEEPS = ("fn-precision", "sepp-threshold")
PRECISIONS = (1.0, 0.75, 0.5, 0.25, 0.1)
REFERENCE = "mocov2"


def method_runs() -> dict[str, list[str]]:
    """method -> overrides: today's comparison (fastcl/lab/benchmarks/methods.py), so both measure the same runs."""
    from fastcl.lab.benchmarks.methods import METHOD_RUNS
    return METHOD_RUNS


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m fastcl.lab.study", description="seeded same-budget study of the methods")
    ap.add_argument("--config", default="configs/exp/compare_cpu.yaml")
    ap.add_argument("--methods", nargs="+", default=list(method_runs()), choices=list(method_runs()))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=6, help="scratch: training epochs; warm: E1, epochs after the base")
    ap.add_argument("--protocol", default="scratch", choices=["scratch", "warm", "ladder"])
    ap.add_argument("--warm-epochs", type=int, default=0, help="warm: E0, epochs of the shared MoCo-v2 base")
    ap.add_argument("--rungs", type=int, nargs="+", default=[],
                    help="ladder: epochs of the long MoCo-v2 base whose checkpoints are the rungs (the last = its length)")
    ap.add_argument("--base-only", action="store_true", help="ladder: train and measure the rungs, no continuations")
    ap.add_argument("--base-knn-every", type=int, default=5, help="ladder: epochs between the base's kNN monitor runs")
    ap.add_argument("--rung-probe", action=argparse.BooleanOptionalAction, default=True,
                    help="ladder: linear probe of every rung (fastcl.eval.linear)")
    ap.add_argument("--sweep", nargs="*", default=[], choices=SWEEPS)
    ap.add_argument("--precisions", type=float, nargs="+", default=list(PRECISIONS))
    ap.add_argument("--degrade", default="add", choices=["add", "replace"], help="method.oracle.degrade of the sweep")
    ap.add_argument("--sepp-thresholds", type=float, nargs="+", default=[0.3, 0.7])  # 0.5: plain sepp
    ap.add_argument("--test", default=None, help="labelled test image folder (default: the config's data.eval_path)")
    ap.add_argument("--bank", default=None, help="labelled kNN bank folder (default: data.eval_train_path or data.path)")
    ap.add_argument("--workers", type=int, default=2, help="decode threads of the kNN evaluation")
    ap.add_argument("--out", default="runs/study")
    ap.add_argument("overrides", nargs="*", help="key=value overrides applied to every run")
    # key=value overrides may stand anywhere: after a list option (--precisions 1 0.5 data.path=...) argparse would
    # read them as one more list value, so they are taken out before parsing
    argv = list(sys.argv[1:] if argv is None else argv)
    is_over = [bool(re.match(r"[A-Za-z_][\w.]*=", t)) for t in argv]  # a dotted config key, then '='
    over = [t for t, o in zip(argv, is_over) if o]
    a = ap.parse_args([t for t, o in zip(argv, is_over) if not o])
    a.overrides = list(a.overrides) + over
    checks = ((len(set(a.seeds)) != len(a.seeds) or min(a.seeds) < 0, f"--seeds must be distinct and >= 0, got {a.seeds}"),
              (a.epochs < 1, f"--epochs must be >= 1, got {a.epochs}"),
              (a.protocol == "warm" and a.warm_epochs < 1, "--protocol warm needs --warm-epochs E0 >= 1"),
              (a.protocol != "warm" and a.warm_epochs, "--warm-epochs is for --protocol warm"),
              (a.protocol != "ladder" and (a.rungs or a.base_only), "--rungs / --base-only are for --protocol ladder"),
              (a.protocol == "ladder" and not a.rungs, "--protocol ladder needs --rungs E1 E2 ..."),
              (a.base_knn_every < 0, f"--base-knn-every must be >= 0, got {a.base_knn_every}"),
              (not all(0 < p <= 1 for p in a.precisions), f"--precisions must lie in (0, 1], got {a.precisions}"),
              (not all(-1 <= t <= 1 for t in a.sepp_thresholds), f"--sepp-thresholds are cosines in [-1, 1], "
                                                                   f"got {a.sepp_thresholds}"),
              (a.workers < 0, f"--workers must be >= 0, got {a.workers}"))
    for bad, msg in checks:
        if bad:
            ap.error(msg)
    return a


def variants(a) -> dict[str, dict]:
    """variant name -> {"method", "overrides", "info"}; MoCo-v2 (the reference) first, SePP variants last."""
    runs = method_runs()
    names = [REFERENCE] + [m for m in a.methods if m != REFERENCE]
    out = {m: {"method": m, "overrides": list(runs[m]), "info": {}} for m in names}
    if "fn-precision" in a.sweep:
        for m in (REFERENCE, "ifnd"):  # the plot's reference line and IFND's measured precision
            out.setdefault(m, {"method": m, "overrides": list(runs[m]), "info": {}})
        for p in a.precisions:
            name = fn_variant(p, a.degrade)
            over = list(runs["oracle"]) + ([f"method.oracle.precision={p}", f"method.oracle.degrade={a.degrade}"]
                                           if p < 1 else [])
            out[name] = {"method": "oracle", "overrides": over, "info": {"precision": p}}
    if "sepp-threshold" in a.sweep:
        for t in a.sepp_thresholds:
            out[sepp_variant(t)] = {"method": "sepp", "overrides": list(runs["sepp"]) + [f"method.sepp.threshold={t}"],
                                       "info": {"threshold": t}}
    return dict(sorted(out.items(), key=lambda kv: (kv[1]["method"] == "sepp", kv[0] != REFERENCE)))


def steps_per_epoch(cfg) -> int:
    """Optimizer steps per epoch of cfg's training set (the warm base stops after E0 of them)."""
    d = cfg.data
    if d.backend == "synthetic":
        n = d.num_samples
    else:
        from fastcl.pipelines.folder import cfg_classes, scan_folder
        n = len(scan_folder(d.path, d.max_samples, cfg_classes(cfg)).paths)
    b = cfg.optim.batch_size
    return n // b if d.drop_last else -(-n // b)


def plan(a, cfg) -> list[RunSpec]:
    """Every run in execution order: per seed, (the warm base,) MoCo-v2, the other methods, SePP (needs a table)."""
    root = os.path.join(a.out, a.protocol)
    total = a.epochs + a.warm_epochs
    common = [f"trainer.epochs={total}", "trainer.knn_every=0", "trainer.progress=false"]
    specs = []
    for s in a.seeds:
        seed = [f"trainer.seed={s}"]
        base_dir = os.path.join(root, "_base", f"seed{s}")
        if a.protocol == "warm":
            over = common + seed + [f"trainer.max_steps={a.warm_epochs * steps_per_epoch(cfg)}",
                                    f"trainer.run_dir={base_dir}"] + list(a.overrides)
            specs.append(RunSpec("_base", s, base_dir, over, REFERENCE))
        source = base_dir if a.protocol == "warm" else os.path.join(root, REFERENCE, f"seed{s}")
        table = os.path.join(root, "_tables", f"seed{s}.npz")
        for name, v in variants(a).items():
            run_dir = os.path.join(root, name, f"seed{s}")
            fill = {"table": table, "warmup": min(max(a.epochs // 3, 1), a.epochs - 1) if a.epochs > 1 else 0}
            over = [o.format(**fill) for o in v["overrides"]]
            if a.protocol == "warm":
                over += [f"trainer.init_from={base_dir}"]
                if v["method"] == "ifnd":  # detect from the first continued epoch, clusters of the warm encoder
                    over = [o for o in over if not o.startswith("method.ifnd.warmup_epochs")]
                    over += [f"method.ifnd.warmup_epochs={a.warm_epochs}", "method.ifnd.source=pass"]
            over = common + seed + over + [f"trainer.run_dir={run_dir}"] + list(a.overrides)
            specs.append(RunSpec(name, s, run_dir, over, v["method"],
                                 {"source": source, "path": table} if v["method"] == "sepp" else {}, v["info"]))
    return specs


def main(argv=None) -> int:
    a = parse(argv)
    try:
        return _main(a)
    except StudyError as e:
        print(f"fastcl.lab.study: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:  # ConfigError, SetupError and bad folders included
        print(f"fastcl.lab.study: error: {e}", file=sys.stderr)
        return 2


def _main(a) -> int:
    from fastcl.config import load_config
    from fastcl.lab.study import report

    cfg = load_config(a.config, list(a.overrides))
    synthetic = cfg.data.backend == "synthetic"
    test = "" if synthetic else (a.test or cfg.data.eval_path)
    bank = "" if synthetic else (a.bank or cfg.data.eval_train_path or cfg.data.path)
    if not synthetic:
        if not test:
            raise StudyError("no test split: pass --test FOLDER or set data.eval_path")
        for flag, path in (("--test", test), ("--bank", bank)):
            if not os.path.isdir(path):
                raise StudyError(f"{flag}: image folder not found: {path}")
    root = os.path.join(a.out, a.protocol)
    if a.protocol == "ladder":
        return _ladder(a, cfg, bank, test, root)
    specs = plan(a, cfg)
    print(f"study: {len(specs)} runs ({a.protocol}, seeds {a.seeds}, epochs {a.epochs}"
          f"{f' after {a.warm_epochs} warm' if a.warm_epochs else ''}) in {root}", flush=True)
    results, tables = _train_all(a, specs, bank, test)
    if results is None:
        return 3
    if "sepp-threshold" in a.sweep:
        for s in a.seeds:  # the curve needs every seed's table, also when SePP's runs were all skipped
            src = os.path.join(root, "_base" if a.protocol == "warm" else REFERENCE, f"seed{s}")
            tables.setdefault(s, mine_partners(src, os.path.join(root, "_tables", f"seed{s}.npz")))
    summary = report.write(a, results, tables, root)
    print(f"study: wrote {summary}", flush=True)
    return 0


def _train_all(a, specs: list[RunSpec], bank: str, test: str):
    """Train (skip / resume) and evaluate every spec in order. Returns (results, SePP tables by seed), or
    (None, None) when a run was stopped by a signal (the same command continues it)."""
    from fastcl.checkpoint import META

    results, tables = [], {}
    for i, spec in enumerate(specs, 1):
        head = f"[{i}/{len(specs)}] {spec.variant} seed {spec.seed}" + (f" rung e{spec.info['rung']}"
                                                                         if "rung" in spec.info else "")
        code = check_spec(spec)  # a run made by other training code is removed here, before it could be skipped
        if spec.table and not finished(spec.run_dir):
            src = spec.table["source"]  # a finished run, or a checkpoint directory (a ladder rung)
            if not (finished(src) or os.path.isfile(os.path.join(src, META))):
                raise StudyError(f"{spec.variant} needs the partner table mined from {src}, which did not finish")
            tables[spec.seed] = mine_partners(src, spec.table["path"])
        t0 = time.time()
        print(f"{head}: {'done, skipped' if finished(spec.run_dir) else 'training'}", flush=True)
        how, res = train_run(a.config, spec, code)
        if res.get("preempted"):
            print(f"{head}: stopped by a signal (checkpoint written); run the same command again to continue",
                  flush=True)
            return None, None
        if spec.variant == "_base":
            continue
        knn = evaluate(spec.run_dir, bank, test, a.workers)
        if how != "done":
            print(f"{head}: {how}, {(time.time() - t0) / 60:.1f} min, kNN top-1 k=200 {knn['200']:.2f} "
                  f"k=20 {knn['20']:.2f}", flush=True)
        results.append({"variant": spec.variant, "method": spec.method, "seed": spec.seed, "run_dir": spec.run_dir,
                        "knn": knn, **spec.info})
    return results, tables


def _ladder(a, cfg, bank: str, test: str, root: str) -> int:
    """The ladder protocol (fastcl/lab/study/ladder.py): the long base, its rungs measured, then the continuations."""
    from fastcl.lab.study import ladder, payoff

    ladder.check(a, cfg)
    base = ladder.base_spec(a, root)
    print(f"study: ladder base ({max(a.rungs)} epochs, rungs {sorted(a.rungs)}) in {base.run_dir}", flush=True)
    t0 = time.time()
    how, res = train_run(a.config, base)
    if res.get("preempted"):
        print("study: the ladder base was stopped by a signal (checkpoint written); run the same command again",
              flush=True)
        return 3
    if how != "done":
        print(f"study: ladder base {how}, {(time.time() - t0) / 60:.1f} min", flush=True)
    ladder.measure_rungs(a, base.run_dir, bank, test, os.path.join(root, "rungs.json"))
    if a.base_only:
        return 0
    rungs = json.load(open(os.path.join(root, "rungs.json")))["rungs"]
    every = variants(a)
    main_v = {k: v for k, v in every.items() if v["info"].get("precision", 1) == 1}  # the sweep runs at one rung
    sweep_v = {k: v for k, v in every.items() if k not in main_v}
    lines = [k for k in main_v if k != REFERENCE]
    n = len(a.rungs) * len(a.seeds) * len(main_v) + len(a.seeds) * len(sweep_v)
    print(f"study: {n} continuations (rungs {sorted(a.rungs)}, seeds {a.seeds}, {a.epochs} epochs each"
          f"{', the precision sweep at one rung' if sweep_v else ''})", flush=True)
    results, pp = [], {}
    for r in sorted(a.rungs, reverse=True):  # top rung first: an interrupted map has its most telling rung
        res, _ = _train_all(a, ladder.continuation_specs(a, root, main_v, base.run_dir, [r]), bank, test)
        if res is None:
            return 3
        results += res
        pp[r] = ladder.partner_precision(root, base.run_dir, r, cfg.method.sepp.threshold) if "sepp" in main_v else None
        _ladder_reports(a, root, r, res, rungs, results, pp, lines, None)
    if sweep_v:
        mp = payoff.build(rungs, results, pp, None, lines)
        at = payoff.sweep_rung(a.rungs, {row["epoch"]: row["diff"].get("oracle", {}) for row in mp["rows"]})
        print(f"study: the false-negative precision sweep runs at rung e{at}", flush=True)
        res, _ = _train_all(a, ladder.continuation_specs(a, root, sweep_v, base.run_dir, [at]), bank, test)
        if res is None:
            return 3
        results += res
        points = [{"precision": v["info"]["precision"], "variant": k} for k, v in every.items()
                  if "precision" in v["info"]]
        _ladder_reports(a, root, at, [x for x in results if x["rung"] == at], rungs, results, pp, lines,
                        {"rung": at, "points": points})
    return 0


def _ladder_reports(a, root, rung, res, rungs, results, pp, lines, sweep) -> None:
    """One rung's summary (the precision sweep's plots only at the sweep rung) and the payoff map so far."""
    import copy

    from fastcl.lab.study import payoff, report

    ra = copy.copy(a)
    if sweep is None:
        ra.sweep = [s for s in a.sweep if s != "fn-precision"]
    ra.sweep = [s for s in ra.sweep if s != "sepp-threshold"]  # the threshold curve belongs to the warm/scratch study
    summary = report.write(ra, res, {}, os.path.join(root, f"e{rung}"))
    print(f"study: wrote {summary}", flush=True)
    path = payoff.write(payoff.build(rungs, results, pp, sweep, lines), a.epochs, root)
    print(f"study: wrote {path}", flush=True)
