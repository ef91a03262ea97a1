"""`python -m fastcl.bench SUBCOMMAND ...`: the benchmark command (its subcommands and evidence files are
described in fastcl/lab/bench.py). It stays at this name because docs/BENCHMARKS.md and every evidence file under
docs/benchmarks/ record it."""
from fastcl.lab.bench import main

if __name__ == "__main__":
    main()
