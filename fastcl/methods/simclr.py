"""SimCLR: 2B in-batch views, one-hot target on the partner view, self pair masked (METHODS §1)."""
from fastcl.methods.base import ContrastiveMethod


class SimCLR(ContrastiveMethod):
    inbatch_only = True
