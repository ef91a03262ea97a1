"""The research tooling around the trainer: the seeded study and its ladder (`python -m fastcl.lab.study`), the
benchmarks (`python -m fastcl.bench`), the accuracy regression guard, the recipe cards, the run reports, the GPU
device check and the demo. Everything here imports the training core; the core never imports this package
(tests/test_imports.py), so the trainer installs and runs without it being read."""
import os

# the repository checkout the tools read configs, docs and data from (the package is installed editable)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
