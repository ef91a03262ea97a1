"""DCL, the debiased contrastive loss (fastcl/methods/dcl.py): the official formula, its InfoNCE limit, both bases."""
import math
import os

import torch
import torch.nn.functional as F

from fastcl.config import load_config
from fastcl.methods.dcl import debiased_loss, negative_estimate
from fastcl.objectives import soft_cross_entropy
from fastcl.train import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs/test/tiny.yaml")


def _official(z1, z2, t, tau_plus):
    """chingyaoc/DCL main.py's loss, written out: 2B views, self and partner masked, N = 2B - 2 negatives."""
    b = z1.shape[0]
    out = torch.cat([z1, z2])
    neg = torch.exp(out @ out.T / t)
    mask = torch.ones(b, 2 * b, dtype=torch.bool)
    for i in range(b):
        mask[i, i] = mask[i, i + b] = False
    neg = neg.masked_select(torch.cat([mask, mask])).view(2 * b, -1)
    pos = torch.exp((z1 * z2).sum(-1) / t)
    pos = torch.cat([pos, pos])
    n = 2 * b - 2
    ng = torch.clamp((-tau_plus * n * pos + neg.sum(-1)) / (1 - tau_plus), min=n * math.e ** (-1 / t))
    return (-torch.log(pos / (pos + ng))).mean()


def _inbatch(z1, z2):
    """fastcl's SimCLR layout of the same views: sims [2B, 2B], positives, mask without the self pair."""
    b = z1.shape[0]
    out = torch.cat([z1, z2])
    valid = torch.ones(2 * b, 2 * b, dtype=torch.bool)
    valid[torch.arange(2 * b), torch.arange(2 * b)] = False
    pos = torch.cat([torch.arange(b) + b, torch.arange(b)])
    return out @ out.T, pos, valid


def test_loss_is_the_official_formula():
    torch.manual_seed(0)
    for t, tau_plus in ((0.5, 0.1), (0.1, 0.1), (0.05, 0.2)):  # small temperatures: the shift keeps exp finite
        z1, z2 = F.normalize(torch.randn(8, 16), dim=1), F.normalize(torch.randn(8, 16), dim=1)
        sims, pos, valid = _inbatch(z1, z2)
        got = debiased_loss(sims, pos, valid, t, tau_plus)
        torch.testing.assert_close(got, _official(z1.double(), z2.double(), t, tau_plus).float(), rtol=1e-5, atol=1e-5)


def test_no_prior_is_infonce():
    """tau+ = 0 without the bound is InfoNCE: the soft CE against the one-hot target on the positive."""
    torch.manual_seed(1)
    z1, z2 = F.normalize(torch.randn(8, 16), dim=1), F.normalize(torch.randn(8, 16), dim=1)
    sims, pos, valid = _inbatch(z1, z2)
    onehot = F.one_hot(pos, sims.shape[1]).float()
    torch.testing.assert_close(debiased_loss(sims, pos, valid, 0.2, 0.0, clamp=False),
                               soft_cross_entropy(sims / 0.2, onehot, valid), rtol=1e-5, atol=1e-5)


def test_trains_on_both_bases(tmp_path):
    for base, over in (("simclr", ["method.queue_size=0"]), ("mocov2", ["method.queue_size=32"])):
        cfg = load_config(TINY, ["method.name=dcl", f"method.base={base}", "trainer.max_steps=4",
                                 f"trainer.run_dir={tmp_path / base}"] + over)
        result = train(cfg)
        assert result["steps"] == 4 and math.isfinite(result["final_loss"]) and result["final_loss"] > 0
    # the clamp check reads a queue run's checkpoint (its own loader, its queue) and refuses one without a queue
    from fastcl.lab.study.dcl_check import clamp_share

    res = clamp_share(str(tmp_path / "mocov2"), [0.1, 0.5], batches=1)
    assert res["queue"] == 32 and res["rows"] == cfg.optim.batch_size
    assert all(0.0 <= v["clamped"] <= 1.0 and v["pos_over_neg"] > 0 for v in res["tau"].values())
    try:
        clamp_share(str(tmp_path / "simclr"), [0.1])
        raise AssertionError("a run without a queue was measured")
    except ValueError as e:
        assert "holds no queue" in str(e)


def test_a_clamped_row_pulls_its_positive_only():
    """On a queue (M = 4,096) at tau 0.1, a positive at cosine 0.9 outweighs the negatives' whole sum times tau+:
    the estimate is clamped and the negatives get no gradient (what lets a trained MoCo encoder collapse under
    DCL); at DCL's official tau 0.5 the same row is not clamped and its negatives are pushed."""
    torch.manual_seed(2)
    b, m = 4, 4096
    neg = (0.1 * torch.randn(b, m)).clamp(-1, 1)
    sims = torch.cat([torch.full((b, 1), 0.9), neg], dim=1)
    pos, valid = torch.zeros(b, dtype=torch.long), torch.ones(b, m + 1, dtype=torch.bool)
    for t, clamped in ((0.1, True), (0.5, False)):
        _, ng, bound = negative_estimate(sims, pos, valid, t, 0.1)
        assert bool((ng < bound).all()) is clamped and bool((ng < bound).any()) is clamped
        x = sims.clone().requires_grad_()
        debiased_loss(x, pos, valid, t, 0.1).backward()
        assert bool((x.grad[:, 0] != 0).all())
        assert (float(x.grad[:, 1:].abs().max()) == 0.0) is clamped
