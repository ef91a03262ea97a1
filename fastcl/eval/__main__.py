"""The evaluation suite in one command: kNN, linear probe and (with --percent) semi-supervised linear.

    python -m fastcl.eval --checkpoint RUN --data TRAIN --val VAL [--protocol moco] [--percent 1 10 [--make-subset]]

Each part is the corresponding command (fastcl.eval.knn / .linear / .semisup) with shared arguments; they
share the feature cache, so the backbone runs once per folder. Writes every part's JSON under <run>/eval/
(or next to --out) and the combined `suite_<which>.json`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv=None) -> int:
    from fastcl.eval import knn, linear, semisup

    ap = argparse.ArgumentParser(prog="python -m fastcl.eval", description=__doc__.split("\n")[0])
    linear.add_common_args(ap)
    ap.add_argument("--protocol", default="moco", choices=sorted(linear.PROTOCOLS))
    ap.add_argument("--epochs", type=int, default=None, help="linear epochs (default: the protocol's)")
    ap.add_argument("--percent", type=float, nargs="*", default=[], help="semi-supervised label percentages")
    ap.add_argument("--make-subset", action="store_true")
    ap.add_argument("--subset-dir", default=os.path.join("data", "subsets"))
    args = ap.parse_args(argv)

    _, run_dir, _ = linear.checkpoint_context(args.checkpoint)
    out_dir = os.path.dirname(os.path.abspath(args.out)) if args.out else os.path.join(run_dir, "eval")
    common = ["--checkpoint", args.checkpoint, "--data", args.data, "--val", args.val, "--which", args.which,
              "--extract-batch-size", str(args.extract_batch_size), "--workers", str(args.workers),
              "--seed", str(args.seed)]
    for flag, value in (("--cache", args.cache), ("--eval-size", args.eval_size), ("--device", args.device)):
        if value is not None:
            common += [flag, str(value)]
    if args.no_progress:
        common.append("--no-progress")
    epochs = ["--epochs", str(args.epochs)] if args.epochs else []
    parts = {"knn": (knn.main, []), f"linear_{args.protocol}": (linear.main, ["--protocol", args.protocol] + epochs)}
    if args.percent:
        extra = ["--percent", *map(str, args.percent), "--subset-dir", args.subset_dir, "--protocol", args.protocol]
        parts["semisup_linear"] = (semisup.main, extra + epochs + (["--make-subset"] if args.make_subset else []))
    suite = {"checkpoint": args.checkpoint, "which": args.which}
    for name, (fn, extra) in parts.items():
        out = os.path.join(out_dir, f"{name}_{args.which}.json")
        fn(common + extra + ["--out", out])
        with open(out) as f:
            r = json.load(f)
        suite[name] = {"top1": r["top1"], "top5": r["top5"], "json": out}
    out = args.out or os.path.join(out_dir, f"suite_{args.which}.json")
    with open(out, "w") as f:
        json.dump(suite, f, indent=2)
    print(json.dumps({**suite, "out": out}))
    return 0


if __name__ == "__main__":
    from fastcl.eval.linear import run_cli

    sys.exit(run_cli(main))
