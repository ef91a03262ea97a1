"""MoCo-v2: EMA key encoder + queue, one-hot target on the own key (METHODS §1).

Columns are [gathered batch keys ; queue]; with method.batch_negatives=False (MoCo default) the other
batch keys are masked, which gives exactly MoCo's [k_i ; queue] logits.
"""
from fastcl.methods.base import ContrastiveMethod


class MoCoV2(ContrastiveMethod):
    pass
