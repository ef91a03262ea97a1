"""Pure target/loss functions (DESIGN.md "Objective contract") and the one targets API the methods call.

The label-assignment targets (`sce_target`, `slr_target`, `ifnd_valid`, `ifnd_attraction_target`) take a keyword
`backend`: "torch" runs the reference in `targets.py` (the default: what tests and the contract read), "numba" and
"auto" go through `fastcl.kernels` (numba CPU / numba.cuda, chosen by the tensors' device and size; see its
docstring), which is imported on the first such call only: importing the objectives, the methods or the config
loads no kernel.
"""
from __future__ import annotations

from fastcl.objectives import targets as _targets
from fastcl.objectives.backend import ifnd_attraction_target, ifnd_valid, label_target, lookup, sce_target, slr_target
from fastcl.objectives.loss import (Target, masked_log_softmax, mean_soft_cross_entropy, one_hot_target,
                                    soft_cross_entropy)
from fastcl.objectives.targets import ifnd_false_negatives, multi_positive_target

__all__ = ["Target", "masked_log_softmax", "mean_soft_cross_entropy", "one_hot_target", "soft_cross_entropy",
           "label_target", "lookup", *_targets.__all__]
