"""Pure target/loss functions (DESIGN.md "Objective contract")."""
from fastcl.objectives.loss import (Target, masked_log_softmax, mean_soft_cross_entropy, one_hot_target,
                                    soft_cross_entropy)
from fastcl.objectives.targets import (
    ifnd_attraction_target,
    ifnd_false_negatives,
    ifnd_valid,
    multi_positive_target,
    sce_target,
    slr_target,
)

from fastcl.objectives import targets as _targets

__all__ = ["Target", "masked_log_softmax", "mean_soft_cross_entropy", "one_hot_target", "soft_cross_entropy",
           *_targets.__all__]
