"""Exact inner-product kNN and SePP's semantic-pair mining (METHODS.md §4.2–4.3, §4.6).

`knn_search` is exact (faiss IndexFlatIP / GpuIndexFlatIP, or a chunked torch matmul + topk) unless `ivf_nlist`
asks for an IndexIVFFlat; both exact engines return the same neighbours up to float rounding of near-ties.
`semantic_pairs` builds the SPPS table: for every image its at most k nearest other images with cosine >= t.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fastcl.mining.engine import as_f32_numpy, choose_engine, faiss_module, flat_ip_index, to_gpu_index

_CHUNK_ELEMS = 1 << 24   # similarity elements per (query chunk x bank chunk) block in the torch engine (64 MiB)


def knn_search(queries: Tensor, bank: Tensor, k: int, backend: str = "auto", exclude_self_ids: Tensor | None = None,
               batch: int = 16384, ivf_nlist: int = 0, nprobe: int = 16, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Top-k inner product of queries [M, D] against bank [N, D] -> (sims [M, k] float32, ids [M, k] int64).

    Rows are sorted by decreasing similarity; results live on queries' device. No normalisation here: pass unit
    rows for cosine. exclude_self_ids [M]: bank id that row r must never return (its own id when the queries
    are the bank); done by asking k+1 neighbours and dropping that id, or the (k+1)-th when it is absent.
    When fewer than k candidates exist the tail is padded with id -1 and sim -inf.
    batch: queries per search call (bounds the result and scratch memory). faiss-gpu caps k at 2048.
    ivf_nlist > 0: approximate search with faiss IndexIVFFlat(nlist, inner product), trained on at most
    256·nlist bank rows drawn with `seed`, probing `nprobe` lists (faiss backends only): the ImageNet-scale option
    (1.28 M x 2048 exact is ~10^13 multiply-adds). Exact search is the default and what the tests check.
    """
    m, d = queries.shape
    n = bank.shape[0]
    if bank.shape[1] != d:
        raise ValueError(f"queries have D={d} but bank has D={bank.shape[1]}")
    if k < 1:
        raise ValueError("k must be >= 1")
    if exclude_self_ids is not None and exclude_self_ids.shape != (m,):
        raise ValueError(f"exclude_self_ids must have shape [{m}], got {tuple(exclude_self_ids.shape)}")
    backend = choose_engine(backend, queries.device)
    if ivf_nlist > 0 and backend == "torch":
        raise ValueError("ivf_nlist > 0 needs a faiss backend; the torch engine only does exact search")
    k_ask = min(n, k + (exclude_self_ids is not None))
    if backend == "torch":
        sims, ids = _search_torch(queries.detach().float(), bank.detach().float().to(queries.device), k_ask, batch)
    else:
        sims, ids = _search_faiss(queries, bank, k_ask, backend, batch, ivf_nlist, nprobe, seed)
        sims, ids = sims.to(queries.device), ids.to(queries.device)
    sims = sims.masked_fill(ids < 0, -float("inf"))        # faiss pads missing results with -FLT_MAX
    if exclude_self_ids is not None:
        # pad to k+1 first so that, when the own id is absent, what gets dropped is padding or the (k+1)-th
        sims, ids = _drop_ids(*_pad(sims, ids, k + 1), exclude_self_ids.to(ids.device).long())
    return _pad(sims, ids, k)


def semantic_pairs(emb: Tensor, k: int, threshold: float, backend: str = "auto", batch: int = 16384,
                   ivf_nlist: int = 0, nprobe: int = 16, pca_dim: int = 0, seed: int = 0,
                   center: bool = False) -> tuple[Tensor, Tensor]:
    """SePP's semantic positive pairs of emb [N, D] -> (nbr_ids [N, k] int64, nbr_sims [N, k] float32).

    Row i holds the at most k other images with the largest cosine to image i that reach `threshold`, sorted by
    decreasing cosine and left-aligned; empty slots are id -1 with sim -inf (so `nbr_sims >= threshold` is
    exactly `nbr_ids >= 0`). Facts (METHODS.md §4.6): i is never its own neighbour; every kept sim >= threshold.
    emb is L2-normalised here, so inner product = cosine. Exact unless ivf_nlist > 0 (see knn_search).
    pca_dim > 0: project onto the top pca_dim principal components first (faiss.PCAMatrix on faiss backends,
    a torch eigen-decomposition otherwise; both centre the data) and re-normalise, so the threshold then applies
    to cosines in the reduced space: the 2048-d -> 256-d option METHODS.md §4.3 suggests for ImageNet.
    center: subtract the mean of the L2-normalised features and re-normalise before the search, so the cosine is
    that of the deviations from the average image: ~0 for unrelated images and negative for opposite ones. On
    pooled post-ReLU backbone features every cosine is >= 0 (typically 0.3-0.9), so a threshold there filters
    little (`center_features`). PCA centres anyway.
    """
    x = F.normalize(emb.detach().float(), dim=1)
    if center:
        x = center_features(x)
    if pca_dim > 0:
        x = F.normalize(pca_reduce(x, pca_dim, backend=backend, seed=seed), dim=1)
    n = x.shape[0]
    self_ids = torch.arange(n, device=x.device)
    sims, ids = knn_search(x, x, k, backend=backend, exclude_self_ids=self_ids, batch=batch, ivf_nlist=ivf_nlist,
                           nprobe=nprobe, seed=seed)
    keep = (sims >= threshold) & (ids >= 0) & (ids != self_ids[:, None])
    return ids.masked_fill(~keep, -1), sims.masked_fill(~keep, -float("inf"))


def center_features(x: Tensor) -> Tensor:
    """L2-normalised rows of x [N, D] minus their mean, re-normalised -> [N, D] float32 (cosines can be < 0)."""
    x = F.normalize(x.detach().float(), dim=1)
    return F.normalize(x - x.mean(0, keepdim=True), dim=1)


def threshold_for_precision(nbr_ids: Tensor, nbr_sims: Tensor, labels: Tensor, target: float,
                            rows: Tensor | None = None) -> tuple[float, float, int]:
    """Calibrate SePP's threshold from the partner-precision diagnostic on a labelled subset.

    nbr_ids, nbr_sims [N, k] (a table mined with a low threshold, -1 / -inf = empty), labels [N] (-1 = unknown),
    target in (0, 1], rows: the ids of the labelled subset (default: every row whose label and partners' labels
    are known) -> (threshold, precision, pairs): the lowest cosine t such that the subset's pairs with
    sim >= t have a same-class share (`pair_precision`) >= target, that share, and how many subset pairs reach
    t. None reaching the target: (inf, nan, 0), i.e. no partner. Labels are read here only, to choose one number
    before training; the training loss never sees them.
    """
    if not 0 < target <= 1:
        raise ValueError(f"target precision must lie in (0, 1], got {target}")
    labels = labels.to(nbr_ids.device).long()
    rows = torch.arange(nbr_ids.shape[0], device=nbr_ids.device) if rows is None else rows.to(nbr_ids.device)
    ids, sims, own = nbr_ids[rows], nbr_sims[rows], labels[rows]
    other = labels[ids.clamp_min(0)]
    ok = (ids >= 0) & (own[:, None] >= 0) & (other >= 0)
    s = sims[ok].double()
    same = (other == own[:, None])[ok].double()
    if s.numel() == 0:
        return float("inf"), float("nan"), 0
    order = torch.argsort(s, descending=True)
    s, same = s[order], same[order]
    prec = same.cumsum(0) / torch.arange(1, s.numel() + 1, dtype=torch.float64, device=s.device)
    # a threshold keeps every pair with sim >= t: only the last position of a run of equal sims is a cut
    cut = torch.ones_like(s, dtype=torch.bool)
    cut[:-1] = s[1:] < s[:-1]
    good = torch.nonzero((prec >= target) & cut).flatten()
    if good.numel() == 0:
        return float("inf"), float("nan"), 0
    j = int(good[-1])
    return float(s[j]), float(prec[j]), j + 1


def pair_precision(nbr_ids: Tensor, labels: Tensor) -> float:
    """Share of kept pairs (nbr_ids >= 0) whose two images have the same label: SePP's quality diagnostic.
    nbr_ids [N, k], labels [N] (test fixtures / eval only; training never reads labels). NaN when no pairs."""
    valid = nbr_ids >= 0
    if not bool(valid.any()):
        return float("nan")
    labels = labels.to(nbr_ids.device)
    same = labels[nbr_ids.clamp_min(0)] == labels[:, None]
    return float((same & valid).sum() / valid.sum())


def pca_reduce(x: Tensor, dim: int, backend: str = "auto", max_train: int = 262144, seed: int = 0) -> Tensor:
    """Project x [N, D] onto its top `dim` principal components (centred) -> [N, dim] float32 on x's device.
    Fitted on at most max_train rows drawn with `seed`."""
    n, d = x.shape
    if not 0 < dim <= d:
        raise ValueError(f"pca_dim must be in (0, {d}], got {dim}")
    backend = choose_engine(backend, x.device)
    train = x
    if n > max_train:
        train = x[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_train].to(x.device)]
    if backend != "torch":
        pca = faiss_module().PCAMatrix(d, dim)
        pca.train(as_f32_numpy(train))
        return torch.from_numpy(pca.apply(as_f32_numpy(x))).to(x.device)
    train = train.double()
    mean = train.mean(0)
    cov = (train - mean).T @ (train - mean) / train.shape[0]
    _, vecs = torch.linalg.eigh(cov)                 # ascending eigenvalues
    proj = vecs[:, -dim:].flip(1)
    return ((x.double() - mean) @ proj).float()


# ---------------------------------------------------------------------------------------------------- engines
def _search_torch(q: Tensor, bank: Tensor, k: int, batch: int) -> tuple[Tensor, Tensor]:
    """Exact top-k of q [M, D] @ bank[N, D].T in blocks, merging per-block top-k (memory ~ _CHUNK_ELEMS)."""
    n = bank.shape[0]
    qb = max(1, min(batch, q.shape[0]))
    bb = max(k, _CHUNK_ELEMS // qb)
    out_s, out_i = [], []
    for qc in q.split(qb):
        best_s = best_i = None
        for start in range(0, n, bb):
            s = qc @ bank[start:start + bb].T
            v, i = s.topk(min(k, s.shape[1]), dim=1)
            i = i + start
            if best_s is not None:
                v, i = torch.cat([best_s, v], 1), torch.cat([best_i, i], 1)
                v, j = v.topk(min(k, v.shape[1]), dim=1)
                i = i.gather(1, j)
            best_s, best_i = v, i
        out_s.append(best_s)
        out_i.append(best_i)
    return torch.cat(out_s), torch.cat(out_i)


def _search_faiss(queries, bank, k, backend, batch, ivf_nlist, nprobe, seed) -> tuple[Tensor, Tensor]:
    faiss = faiss_module()
    xb = as_f32_numpy(bank)
    d = xb.shape[1]
    if ivf_nlist > 0:
        quantizer = faiss.IndexFlatIP(d)        # kept referenced until the search ends (faiss borrows it)
        index = faiss.IndexIVFFlat(quantizer, d, ivf_nlist, faiss.METRIC_INNER_PRODUCT)
        params = faiss.ParameterSpace()
        if backend == "faiss-gpu":
            index, params = to_gpu_index(index), faiss.GpuParameterSpace()
        train = xb
        if xb.shape[0] > 256 * ivf_nlist:
            train = xb[np.random.default_rng(seed).choice(xb.shape[0], 256 * ivf_nlist, replace=False)]
        index.train(train)
        index.add(xb)
        params.set_index_parameter(index, "nprobe", nprobe)
    else:
        index = flat_ip_index(d, backend)
        index.add(xb)
    xq = xb if queries is bank else as_f32_numpy(queries)     # self-search: reuse the host copy
    sims, ids = [], []
    for start in range(0, xq.shape[0], batch):
        s, i = index.search(xq[start:start + batch], k)
        sims.append(s)
        ids.append(i)
    return torch.from_numpy(np.concatenate(sims)), torch.from_numpy(np.concatenate(ids)).long()


def _drop_ids(sims: Tensor, ids: Tensor, drop: Tensor) -> tuple[Tensor, Tensor]:
    """Remove per row the entry whose id == drop[row], else the last column: [M, c] -> [M, c-1]."""
    hit = ids == drop[:, None]
    first = hit & (hit.long().cumsum(1) == 1)                 # ids in a row are distinct except -1 padding
    first[:, -1] |= ~first.any(1)
    keep = ~first
    c = ids.shape[1] - 1
    return sims[keep].view(-1, c), ids[keep].view(-1, c)


def _pad(sims: Tensor, ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Cut or pad (id -1, sim -inf) to exactly k columns."""
    m, c = ids.shape
    if c >= k:
        return sims[:, :k].contiguous(), ids[:, :k].contiguous()
    pad_s = torch.full((m, k - c), -float("inf"), dtype=sims.dtype, device=sims.device)
    pad_i = torch.full((m, k - c), -1, dtype=ids.dtype, device=ids.device)
    return torch.cat([sims, pad_s], 1), torch.cat([ids, pad_i], 1)
