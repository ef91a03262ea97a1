"""IFND pseudo labels: confidence, incremental acceptance and its schedule (METHODS.md §3.1, §3.7).

The paper's exact confidence score and acceptance rule were not retrievable (METHODS.md §0, §3.6), so
everything here is one of our [U] defaults, each selectable:
* confidence "centroid": cosine of a sample to its own centroid (the teaser's per-centroid radius) [U default];
  "margin": nearest minus second-nearest centroid cosine (how unambiguous the assignment is) [U option].
* acceptance per cluster: the ⌈rate·n_c⌉ most confident members of every cluster c keep their label [U default],
  so small clusters are not starved; or globally: the ⌈rate·N⌉ most confident samples overall [U option].
* schedule: zeros during warm-up, then linear from `start` to `end`, reaching `end` at the last epoch [U].
Rejected samples get label -1, which never matches anything (fastcl.objectives.ifnd_valid).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from fastcl.mining.kmeans import KMeansResult

CONFIDENCES = ("centroid", "margin")
_EPS = 1e-9   # ⌈rate·n⌉ of decimal rates: 0.3·10 is 3.0000000000000004 in binary floating point, which is 3


def confidence(result: KMeansResult, kind: str = "centroid") -> Tensor:
    """Per-sample confidence [N] float32 of a k-means result: "centroid" = sims[:, 0] (cos to own centroid),
    "margin" = sims[:, 0] - sims[:, 1] (nearest minus second-nearest centroid). Higher = more confident."""
    if kind == "centroid":
        return result.sims[:, 0].clone()
    if kind == "margin":
        return result.sims[:, 0] - result.sims[:, 1]
    raise ValueError(f"confidence kind must be one of {CONFIDENCES}, got {kind!r}")


def quota(count: Tensor, rate: float) -> Tensor:
    """⌈rate·count⌉ as int64, exact for decimal rates (see _EPS). count: any int tensor."""
    return torch.ceil(count.double() * rate - _EPS).clamp_min_(0).long()


def accept(assign: Tensor, conf: Tensor, rate: float, per_cluster: bool = True) -> Tensor:
    """Incremental acceptance: labels [N] int64 = assign where accepted, -1 elsewhere.

    assign [N] int64 cluster ids >= 0; conf [N] confidences; rate in [0, 1].
    per_cluster: accept the ⌈rate·n_c⌉ most confident members of each cluster c; else the ⌈rate·N⌉ most
    confident samples overall. rate 0 accepts nothing, rate 1 everything. Equal confidences are broken by the
    lower sample index (stable sort), so every rank computes the same labels from the same inputs.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"acceptance rate must be in [0, 1], got {rate}")
    n = assign.shape[0]
    order = torch.sort(conf, descending=True, stable=True).indices      # most confident first
    if per_cluster:
        # regroup by cluster keeping the confidence order inside each cluster
        order = order[torch.sort(assign[order], stable=True).indices]
        counts = torch.bincount(assign, minlength=int(assign.max()) + 1 if n else 0)
        starts = torch.cumsum(counts, 0) - counts
        a_sorted = assign[order]
        rank_in_cluster = torch.arange(n, device=assign.device) - starts[a_sorted]
        take = rank_in_cluster < quota(counts, rate)[a_sorted]
    else:
        take = torch.arange(n, device=assign.device) < quota(torch.tensor(n), rate)
    labels = torch.full_like(assign, -1)
    labels[order[take]] = assign[order[take]]
    return labels


def acceptance_schedule(epochs: int, warmup_epochs: int = 0, start: float = 0.0, end: float = 1.0) -> np.ndarray:
    """Per-epoch acceptance rate a [epochs] float64 [U: METHODS.md §3.1 default a(e) ~ e/E].

    a[e] = 0 for e < warmup_epochs, then linear from `start` (at e = warmup_epochs) to `end` (at e = epochs-1);
    a single post-warm-up epoch gets `end`. Needs 0 <= start <= end <= 1, so a is monotone with a[-1] = end.
    """
    if not 0.0 <= start <= end <= 1.0:
        raise ValueError(f"need 0 <= start <= end <= 1, got start={start}, end={end}")
    if not 0 <= warmup_epochs < epochs:
        raise ValueError(f"need 0 <= warmup_epochs < epochs, got warmup_epochs={warmup_epochs}, epochs={epochs}")
    a = np.zeros(epochs, dtype=np.float64)
    ramp = epochs - warmup_epochs
    a[warmup_epochs:] = np.linspace(start, end, ramp) if ramp > 1 else end
    assert a.shape == (epochs,) and a[-1] == end
    return a
