"""Benchmarks: `python -m fastcl.bench SUBCOMMAND ...` (SUBCOMMANDS below) -> printed table + JSON evidence.

Each subcommand lives in fastcl/lab/benchmarks/<name>.py with `main(argv) -> dict`; results are written by
fastcl.lab.benchmarks.common.write_evidence under docs/benchmarks/ (commit, resolved config, hardware,
timing method, repeats); docs/BENCHMARKS.md reads them.
"""
from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "loader": "data-loader throughput per backend (img/s), JSON evidence",
    "kernels": "numba target kernels against their torch references",
    "step": "training-step time per method against MoCo-v2; images encoded per step",
    "mining": "faiss / torch k-means and kNN engines",
    "methods": "train every method on one budget and compare (kNN, diagnostics, report)",
    "scaling": "per-rank memory and mining/monitor time at ImageNet-1k, from measurements at a scaled N",
}
USAGE = "usage: python -m fastcl.bench {" + ",".join(SUBCOMMANDS) + "} [options]   (SUBCOMMAND --help for its options)"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE + "\n\nsubcommands:\n" + "\n".join(f"  {k:8s} {v}" for k, v in SUBCOMMANDS.items()))
        return
    if not argv or argv[0] not in SUBCOMMANDS:
        sys.exit(f"{USAGE}   (got {argv[:1]})")
    mod = importlib.import_module(f"fastcl.lab.benchmarks.{argv[0]}")
    from fastcl.config import ConfigError
    from fastcl.train import SetupError
    try:
        mod.main(argv[1:])
    except (ConfigError, SetupError, FileNotFoundError, ValueError) as e:  # user input: one line, exit 2
        sys.exit(f"fastcl.bench {argv[0]}: error: {e}")


if __name__ == "__main__":
    main()
