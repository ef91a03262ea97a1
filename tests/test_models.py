"""Backbones (torchvision parity), heads, EMA teacher, global batch norm (1- and 2-process gloo)."""
import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch import nn

from fastcl.config import ModelCfg
from fastcl.models import (MLP, AllReduceBatchNorm, Encoder, build_encoder, build_predictor, convert_sync_bn,
                           ema_update, make_teacher, resnet)
from fastcl.models.resnet import BasicBlock, Bottleneck

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------- ResNet

@pytest.mark.parametrize("arch,count", [("resnet18", 11_689_512), ("resnet34", 21_797_672),
                                        ("resnet50", 25_557_032)])
def test_parameter_count_equals_torchvision(arch, count):
    with torch.device("meta"):  # shapes only: skips 25M random inits
        m = resnet(arch, width=64, num_classes=1000)
    assert sum(p.numel() for p in m.parameters()) == count


def _torchvision_keys(blocks, bottleneck):
    """The state-dict keys torchvision's resnet has, written out from its layout."""
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys = ["conv1.weight"] + [f"bn1.{s}" for s in bn]
    nconv = 3 if bottleneck else 2
    cin = 64
    for li, (n, planes) in enumerate(zip(blocks, (64, 128, 256, 512)), start=1):
        cout = planes * (4 if bottleneck else 1)
        for b in range(n):
            p = f"layer{li}.{b}."
            for c in range(1, nconv + 1):
                keys += [f"{p}conv{c}.weight"] + [f"{p}bn{c}.{s}" for s in bn]
            if b == 0 and (li > 1 or cin != cout):
                keys += [f"{p}downsample.0.weight"] + [f"{p}downsample.1.{s}" for s in bn]
        cin = cout
    return keys + ["fc.weight", "fc.bias"]


@pytest.mark.parametrize("arch,blocks,bottleneck", [("resnet18", [2, 2, 2, 2], False),
                                                    ("resnet34", [3, 4, 6, 3], False),
                                                    ("resnet50", [3, 4, 6, 3], True)])
@pytest.mark.parametrize("cifar_stem", [False, True])
def test_state_dict_keys_are_torchvision(arch, blocks, bottleneck, cifar_stem):
    with torch.device("meta"):
        m = resnet(arch, cifar_stem=cifar_stem, num_classes=1000)
    keys = list(m.state_dict())
    assert keys == _torchvision_keys(blocks, bottleneck)  # same names, same order
    assert "layer2.0.downsample.0.weight" in keys and "layer2.0.downsample.1.running_mean" in keys
    assert "layer2.1.downsample.0.weight" not in keys
    assert ("layer1.0.downsample.0.weight" in keys) == bottleneck
    assert [n for n, _ in m.named_children()] == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2",
                                                   "layer3", "layer4", "avgpool", "fc"]


def test_ssl_backbone_returns_pooled_features():
    m = resnet("resnet50", width=8)
    assert isinstance(m.fc, nn.Identity) and m.feat_dim == 8 * 8 * 4
    assert m(torch.randn(2, 3, 64, 64)).shape == (2, m.feat_dim)
    with pytest.raises(ValueError, match="resnet101"):
        resnet("resnet101")


def _stage_shapes(m, x):
    shapes = {}
    hooks = [getattr(m, n).register_forward_hook(lambda mod, i, o, n=n: shapes.__setitem__(n, tuple(o.shape)))
             for n in ("conv1", "maxpool", "layer1", "layer2", "layer3", "layer4")]
    out = m(x)
    for h in hooks:
        h.remove()
    return shapes, out


def test_cifar_stem_shapes_at_32px():
    m = resnet("resnet18", cifar_stem=True, width=16)
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1) and isinstance(m.maxpool, nn.Identity)
    shapes, out = _stage_shapes(m, torch.randn(2, 3, 32, 32))
    assert shapes == {"conv1": (2, 16, 32, 32), "maxpool": (2, 16, 32, 32), "layer1": (2, 16, 32, 32),
                      "layer2": (2, 32, 16, 16), "layer3": (2, 64, 8, 8), "layer4": (2, 128, 4, 4)}
    assert out.shape == (2, 128) and m.feat_dim == 128
    # Standard stem: /4 before layer1, /32 at the end.
    shapes, _ = _stage_shapes(resnet("resnet18", width=16), torch.randn(2, 3, 64, 64))
    assert shapes["maxpool"] == (2, 16, 16, 16) and shapes["layer4"] == (2, 128, 2, 2)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_channels_last_matches_contiguous(arch):
    torch.manual_seed(0)
    m = resnet(arch, cifar_stem=True, width=8).eval()
    x = torch.randn(3, 3, 16, 16)
    ref = m(x)
    m_cl = copy.deepcopy(m).to(memory_format=torch.channels_last)
    out = m_cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    # Training mode + backward on channels_last as the trainer runs it.
    m_cl.train()(x.contiguous(memory_format=torch.channels_last)).sum().backward()
    assert m_cl.conv1.weight.grad is not None


def test_strided_1x1_conv_is_the_torch_conv():
    """The CPU downsample conv (subsample + stride-1 conv) is the same function as a stride-2 1x1 conv.

    The shape is one where torch 2.13's own strided 1x1 weight gradient segfaults on CPU, so the
    gradient reference is an einsum, not conv2d's backward.
    """
    torch.manual_seed(0)
    conv = resnet("resnet18", width=16).layer2[0].downsample[0]
    assert type(conv).__name__ == "StridedConv1x1" and conv.stride == (2, 2) and list(conv.state_dict()) == ["weight"]
    x = torch.randn(3, 16, 15, 15, requires_grad=True)
    g = torch.randn(3, 32, 8, 8)
    (conv(x) * g).sum().backward()
    torch.testing.assert_close(conv(x), torch.nn.functional.conv2d(x, conv.weight, stride=2))
    x2, w2 = x.detach().clone().requires_grad_(), conv.weight.detach().clone().requires_grad_()
    (torch.einsum("bchw,oc->bohw", x2[:, :, ::2, ::2], w2[:, :, 0, 0]) * g).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(conv.weight.grad, w2.grad)


def test_init_like_torchvision():
    torch.manual_seed(0)
    m = resnet("resnet18", width=64)
    w = m.layer3[0].conv1.weight  # fan_out = 256 * 3 * 3
    assert abs(w.std().item() - math.sqrt(2 / (256 * 9))) < 0.05 * math.sqrt(2 / (256 * 9))
    assert all(bool((b.weight == 1).all() and (b.bias == 0).all()) for b in m.modules()
               if isinstance(b, nn.BatchNorm2d))
    z = resnet("resnet50", width=8, zero_init_residual=True)
    assert all(bool((b.bn3.weight == 0).all()) for b in z.modules() if isinstance(b, Bottleneck))
    z = resnet("resnet18", width=8, zero_init_residual=True)
    blocks = [b for b in z.modules() if isinstance(b, BasicBlock)]
    assert len(blocks) == 8 and all(bool((b.bn2.weight == 0).all() and (b.bn1.weight == 1).all()) for b in blocks)


# ----------------------------------------------------------------------------------------------- heads

def test_mlp_layouts():
    kinds = lambda m: [type(x).__name__ for x in m]  # noqa: E731
    m = MLP(32, 64, 16, 3)
    assert kinds(m) == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert m[0].bias is None and m[3].bias is None and m[6].bias is not None
    assert m(torch.randn(5, 32)).shape == (5, 16)
    m = MLP(32, 64, 16, 2, hidden_bn=False, out_bn=True)
    assert kinds(m) == ["Linear", "ReLU", "Linear", "BatchNorm1d"]
    assert m[0].bias is not None and m[3].weight is None  # affine=False output BN
    y = m(torch.randn(8, 32))
    torch.testing.assert_close(y.mean(0), torch.zeros(16), atol=1e-5, rtol=0)
    m = MLP(32, 64, 16, 2, last_bias=False)
    assert m[0].bias is None and m[3].bias is None and kinds(m) == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    m = MLP(32, 64, 16, 1)
    assert kinds(m) == ["Linear"] and (m[0].in_features, m[0].out_features) == (32, 16)
    with pytest.raises(ValueError):
        MLP(4, 4, 4, 0)


def _model_cfg(**kw):
    cfg = OmegaConf.structured(ModelCfg)
    for k, v in kw.items():
        cfg[k] = v
    return cfg


def test_build_encoder_and_predictor():
    cfg = _model_cfg(arch="resnet18", cifar_stem=True, width=8, proj_hidden=32, proj_dim=16, proj_layers=3,
                     proj_bn=True, proj_out_bn=True, pred_hidden=24)
    enc = build_encoder(cfg)
    assert isinstance(enc, Encoder) and enc.backbone.feat_dim == 64 and enc.feat_dim == 64
    assert [type(x).__name__ for x in enc.projector] == ["Linear", "BatchNorm1d", "ReLU", "Linear",
                                                         "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert enc.projector[0].in_features == 64 and enc.projector[6].out_features == 16
    x = torch.randn(4, 3, 16, 16)
    z = enc(x)
    assert z.shape == (4, 16)
    torch.testing.assert_close(z, enc.projector(enc.backbone(x)))
    assert not torch.allclose(z.norm(dim=1), torch.ones(4))  # not normalised
    pred = build_predictor(cfg)
    assert isinstance(pred, MLP) and [type(x).__name__ for x in pred] == ["Linear", "BatchNorm1d", "ReLU",
                                                                          "Linear"]
    assert pred[0].out_features == 24 and pred(z).shape == (4, 16)
    # SCE's official predictor: no bias anywhere (last_bias: False), module positions (state-dict names) kept
    assert pred[0].bias is None and pred[3].bias is None
    assert sorted(pred.state_dict()) == ["0.weight", "1.bias", "1.num_batches_tracked", "1.running_mean",
                                         "1.running_var", "1.weight", "3.weight"]
    assert isinstance(build_predictor(_model_cfg(pred_hidden=0)), nn.Identity)
    # MoCo-v2 default: 2 layers, no hidden BN when proj_bn is off.
    enc = build_encoder(_model_cfg(width=8, proj_hidden=32, proj_dim=8, proj_layers=2, proj_bn=False))
    assert [type(x).__name__ for x in enc.projector] == ["Linear", "ReLU", "Linear"]


# ----------------------------------------------------------------------------------------------- EMA

def _small_net():
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))


def test_make_teacher_is_frozen_independent_copy():
    torch.manual_seed(0)
    s = _small_net()
    s(torch.randn(5, 4)).sum().backward()
    t = make_teacher(s)
    assert all(not p.requires_grad and p.grad is None for p in t.parameters())
    assert all(p.requires_grad for p in s.parameters())
    for (n, a), (_, b) in zip(s.state_dict().items(), t.state_dict().items()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), n


def test_ema_update_math():
    torch.manual_seed(0)
    s, t = _small_net(), _small_net()
    s.train()(torch.randn(8, 4))  # moves the student's BN running stats and num_batches_tracked
    t0 = copy.deepcopy(t.state_dict())
    ema_update(t, s, 0.9)
    for n, p in t.named_parameters():
        torch.testing.assert_close(p, 0.9 * t0[n] + 0.1 * s.state_dict()[n])
    # only parameters are averaged: the teacher's BN statistics stay its own (MoCo builder.py / SCE)
    for n, b in t.named_buffers():
        assert torch.equal(b, t0[n]), n
    assert int(t[1].num_batches_tracked) == 0 and not torch.equal(t[1].running_mean, s[1].running_mean)
    ema_update(t, s, 1.0)
    ema_update(t, s, 0.0)
    for n, p in t.named_parameters():
        assert torch.equal(p, s.state_dict()[n]), n


def test_teacher_tracks_its_own_bn_statistics():
    """The teacher's running statistics come from its own forward passes (train mode, as MoCo's key encoder),
    never from the student's: feeding the two different batches leaves each with its own statistics."""
    torch.manual_seed(0)
    s = _small_net().train()
    t = make_teacher(s).train()
    xs, xt = torch.randn(16, 4), 3.0 + torch.randn(16, 4)
    for _ in range(5):
        s(xs)
        with torch.no_grad():
            t(xt)
        ema_update(t, s, 0.99)
    ref = copy.deepcopy(s).train()  # the teacher's statistics = a BN that saw only xt (its params ~ the student's)
    ref[1].reset_running_stats()
    with torch.no_grad():
        for _ in range(5):
            ref[1](ref[0](xt))
    torch.testing.assert_close(t[1].running_mean, ref[1].running_mean, atol=1e-2, rtol=0)
    assert (t[1].running_mean - s[1].running_mean).abs().max() > 0.1


def test_ema_update_student_with_extra_params_and_missing_ones():
    s = nn.Sequential(_small_net(), nn.Linear(3, 3))  # a predictor the teacher does not have
    t = make_teacher(s)
    del t[1]
    ema_update(t, s, 0.5)  # '0.*' names match, '1.*' ignored
    t_bad = nn.Sequential(_small_net(), nn.Linear(3, 3), nn.Linear(3, 2))
    with pytest.raises(KeyError, match="2.weight"):
        ema_update(t_bad, s, 0.5)


@pytest.fixture
def gloo_one(tmp_path):
    """A 1-process gloo group for this test only (DDP and the all_reduce paths need one)."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this session")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ema_and_make_teacher_through_ddp(gloo_one):
    torch.manual_seed(0)
    s = nn.parallel.DistributedDataParallel(_small_net())
    t = make_teacher(s)
    assert not isinstance(t, nn.parallel.DistributedDataParallel)
    with torch.no_grad():
        for p in s.parameters():
            p.add_(1.0)
    t0 = copy.deepcopy(t.state_dict())
    ema_update(t, s, 0.75)
    for n, p in t.named_parameters():
        torch.testing.assert_close(p, 0.75 * t0[n] + 0.25 * s.module.state_dict()[n])
    # The student is still in the DDP graph: a forward/backward works after the update.
    s(torch.randn(4, 4)).sum().backward()


# ----------------------------------------------------------------------------------------------- global BN

def test_convert_sync_bn_without_process_group_is_identity():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this session")
    m = resnet("resnet18", width=4)
    assert convert_sync_bn(m) is m
    assert all(type(x) is nn.BatchNorm2d for x in m.modules() if "Norm" in type(x).__name__)


def test_convert_sync_bn_world_one_is_identity(gloo_one):
    m = _small_net()
    assert convert_sync_bn(m) is m and type(m[1]) is nn.BatchNorm1d


@pytest.mark.parametrize("shape,affine,momentum", [((6, 3, 4, 5), True, 0.1), ((7, 5), False, None),
                                                   ((4, 3, 9), True, 0.3)])
def test_allreduce_bn_one_process_equals_batchnorm(gloo_one, shape, affine, momentum):
    """The all_reduce path with one process must reproduce torch's BN exactly (2-process test below)."""
    torch.manual_seed(0)
    bn_cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d}[len(shape)]
    ref = bn_cls(shape[1], affine=affine, momentum=momentum)
    ours = AllReduceBatchNorm(shape[1], affine=affine, momentum=momentum)
    if affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.normal_()
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict())
    for step in range(3):
        x = torch.randn(shape) * (step + 1) + 2.0
        g = torch.randn(shape)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ref(xa), ours(xb)
        (ya * g).sum().backward()
        (yb * g).sum().backward()
        torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-5)
    for n, v in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[n], v, rtol=1e-5, atol=1e-5, msg=n)
    if affine:
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-4)
    ref.eval(), ours.eval()
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_allreduce_bn_variance_is_stable_for_large_means(gloo_one):
    """|mean| >> std: float32 E[x^2] - E[x]^2 would be off by ~1e-2 here; the float64 merge is not.

    The reference is float64 BN; float32 inputs near 300 carry ~3e-5 rounding themselves, hence 2e-4.
    """
    torch.manual_seed(0)
    x = torch.randn(16, 3, 4, 4) + 300.0
    g = torch.randn(16, 3, 4, 4)
    ours, ref = AllReduceBatchNorm(3), nn.BatchNorm2d(3).double()
    xa, xb = x.double().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ref(xa), ours(xb)
    (ya * g.double()).sum().backward()
    (yb * g).sum().backward()
    torch.testing.assert_close(yb.double(), ya, rtol=0, atol=2e-4)
    torch.testing.assert_close(xb.grad.double(), xa.grad, rtol=0, atol=2e-4)
    torch.testing.assert_close(ours.running_var.double(), ref.running_var, rtol=1e-4, atol=0)


def _two_process_cases():
    torch.manual_seed(0)
    bn2 = nn.BatchNorm2d(4)
    bn1 = nn.BatchNorm1d(6, affine=False, momentum=None)
    with torch.no_grad():
        bn2.weight.uniform_(0.5, 1.5)
        bn2.bias.normal_()
    cfg = _model_cfg(arch="resnet18", cifar_stem=True, width=4, proj_hidden=16, proj_dim=8, proj_layers=2,
                     proj_bn=True, proj_out_bn=True)
    enc = build_encoder(cfg)
    return {
        # uneven shards (3 + 5 samples), channels_last, two steps so running stats move twice
        "bn2d": {"module": bn2, "state": bn2.state_dict(), "split": [(0, 3), (3, 8)],
                 "xs": [torch.randn(8, 4, 5, 5) * 3 + 2 for _ in range(2)], "gs": [torch.randn(8, 4, 5, 5)] * 2},
        # projector-output BN: no affine, cumulative running average (momentum None)
        "bn1d": {"module": bn1, "state": bn1.state_dict(), "split": [(0, 4), (4, 10)],
                 "xs": [torch.randn(10, 6) for _ in range(2)], "gs": [torch.randn(10, 6) for _ in range(2)]},
        # a whole encoder after convert_sync_bn, in DDP: averaged parameter gradients = full batch / 2
        "encoder": {"model_cfg": cfg, "state": enc.state_dict(), "split": [(0, 3), (3, 6)], "ddp": True,
                    "xs": [torch.randn(6, 3, 8, 8)], "gs": [torch.randn(6, 8)]},
    }, enc


def _reference(module, case):
    """Plain BN, one process, full batch: what the two ranks together must reproduce."""
    module = copy.deepcopy(module).train()
    module.load_state_dict(case["state"])
    out = {"y": [], "dx": []}
    for x, g in zip(case["xs"], case["gs"]):
        x = x.clone().requires_grad_()
        y = module(x)
        (y * g).sum().backward()
        out["y"].append(y.detach())
        out["dx"].append(x.grad)
    out["grads"] = {n: p.grad for n, p in module.named_parameters()}
    out["buffers"] = dict(module.named_buffers())
    out["keys"] = sorted(module.state_dict())
    module.eval()
    with torch.no_grad():
        out["y_eval"] = module(case["xs"][0])
    return out


def test_global_bn_two_processes(tmp_path):
    cases, enc = _two_process_cases()
    torch.save(cases, tmp_path / "in.pt")
    exe = Path(sys.executable).parent / "torchrun"
    launcher = [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(launcher + ["--standalone", "--nproc_per_node", "2", str(ROOT / "tests/_dist_bn_worker.py"),
                                      str(tmp_path / "in.pt"), str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"out.{r}.pt", weights_only=False) for r in range(2)]
    tol = dict(rtol=1e-5, atol=1e-5)
    for name, case in cases.items():
        ref = _reference(enc if name == "encoder" else case["module"], case)
        r0, r1 = ranks[0][name], ranks[1][name]
        assert r0["types"] == ["AllReduceBatchNorm"], (name, r0["types"])  # every BN was swapped
        assert r0["keys"] == ref["keys"], name  # checkpoints stay interchangeable
        for step in range(len(case["xs"])):
            for k in ("y", "dx"):
                want = ref[k][step]
                # 11 conv/BN layers of float32 sums in another order: tolerance relative to the tensor's scale.
                t = tol if name != "encoder" else dict(rtol=1e-4, atol=1e-5 * float(want.abs().max()))
                torch.testing.assert_close(torch.cat([r0[k][step], r1[k][step]]), want, **t,
                                           msg=f"{name} step {step} {k}")
        for n, gref in ref["grads"].items():
            # Per-rank gradients of the rank's own loss sum to the full-batch gradient; DDP averages them.
            got = [r0["grads"][n] * 2, r1["grads"][n] * 2] if case.get("ddp") else [r0["grads"][n] + r1["grads"][n]]
            for gr in got:
                torch.testing.assert_close(gr, gref, rtol=1e-4, atol=1e-5 * max(1.0, float(gref.abs().max())),
                                           msg=f"{name} grad {n}")
        for r in (r0, r1):
            for n, b in ref["buffers"].items():
                torch.testing.assert_close(r["buffers"][n], b, **tol, msg=f"{name} buffer {n}")
            torch.testing.assert_close(r["y_eval"], ref["y_eval"], **tol, msg=f"{name} eval")
