"""Seeded same-budget study: `python -m fastcl.lab.study` (docs/RESULTS.md "Seeded same-budget study").

    python -m fastcl.lab.study --config configs/exp/compare_cpu.yaml --methods mocov2 ifnd sepp oracle \
        --seeds 0 1 2 --epochs 6 [--protocol warm --warm-epochs 4] [--sweep fn-precision sepp-threshold] \
        [--out runs/study] [key=value ...]

Runs every method x seed under one budget (the config + overrides), each in <out>/<protocol>/<variant>/seed<s>.
A finished run (result.json, not preempted) is skipped; an interrupted one resumes from its newest checkpoint
(`--resume auto`), so an interrupted study continues where it stopped when the same command is run again. Each run
records its overrides, the commit and a fingerprint of the training code (every module but fastcl.lab, comments and
docstrings not counted) in <run>/study_spec.json: a run made by other training code is trained again. Each
finished run is evaluated once with `fastcl.eval.knn` (k = 200 and 20) on the test split (--test, default
data.eval_path) against the training split. Then <out>/<protocol>/ gets summary.json, summary.md and PNGs: per
method mean ± std of kNN top-1 and the paired difference to MoCo-v2 (pairs share the seed, hence the data order and
the initialisation) with its 95 % Student-t confidence interval; a difference whose interval contains 0 is
reported as inside the noise.

Protocols: `scratch` (every method trains --epochs from random init) and `warm` (one shared MoCo-v2 checkpoint of
--warm-epochs E0 per seed, then every method, MoCo-v2 included, continues for --epochs E1 from it with the same
optimizer state and schedule position: trainer.init_from). The warm base run has trainer.epochs = E0 + E1 and stops
after E0 epochs, so its schedule is the continuation's. In `warm`, IFND detects from the first continued epoch
(warmup_epochs = E0, source = pass: its clusters come from the warm encoder, not from an empty SampleTable) and
SePP mines its partners from the E0 checkpoint; in `scratch` SePP mines from the same-seed MoCo-v2 run.

Sweeps (--sweep): `fn-precision` runs the degraded oracle (method.oracle.precision p, --precisions, --degrade) and
plots kNN against p with IFND's measured detection precision (its fn_masked_precision, last epoch); `sepp-threshold`
plots SePP's partner precision against the similarity threshold (the mined table, true labels read for the report
only) and trains SePP at the --sepp-thresholds.
"""
from fastcl.lab.study.cli import main

__all__ = ["main"]
