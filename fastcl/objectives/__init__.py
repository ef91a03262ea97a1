"""Pure target/loss functions (DESIGN.md "Objective contract")."""
from fastcl.objectives.loss import Target, masked_log_softmax, one_hot_target, soft_cross_entropy

__all__ = ["Target", "masked_log_softmax", "one_hot_target", "soft_cross_entropy"]
