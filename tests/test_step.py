"""The step engine alone (fastcl/step.py): every view encoded once, one student call and one teacher call per
step, pair losses equal to the per-pair computation, ShuffleBN, split BN, LARS."""
import copy
import os

import pytest
import torch
import torch.nn.functional as F

from fastcl import step as S
from fastcl.config import load_config
from fastcl.methods.base import Pair, Sims
from fastcl.models import SplitBatchNorm, ema_update
from fastcl.objectives import soft_cross_entropy
from fastcl.optim import LARS, set_lr_wd
from fastcl.train import make_accelerator, setup

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs/test/tiny.yaml")


def _views(sizes):
    return "data.aug.views=[" + ",".join(f"{{size: {s}}}" for s in sizes) + "]"


def _parts(tmp_path, over):
    cfg = load_config(TINY, [f"trainer.run_dir={tmp_path / 'run'}", "data.num_samples=64"] + over)
    torch.manual_seed(0)
    parts, loader, sched, state, _, _ = setup(cfg, make_accelerator(cfg))
    return parts, loader, sched


class Counter:
    """Forward hooks: module calls and images through a module."""

    def __init__(self, module):
        self.calls = self.images = 0
        if module is not None:
            module.register_forward_hook(self._hook)

    def _hook(self, mod, inp, out):
        self.calls += 1
        x = inp[0]
        self.images += sum(t.shape[0] for g in x for t in g) if isinstance(x, list) else x.shape[0]


# (name, overrides, student images per step in units of B, teacher images in units of B, backbone forwards)
CONFIGS = [
    ("mocov2", ["method.name=mocov2"], 1, 1, 1),
    ("sce_sym", ["method.name=sce", "method.symmetric=true"], 2, 2, 1),
    ("sce_multicrop", ["method.name=sce", "method.symmetric=true", _views([16, 16, 8, 8, 8, 8])], 6, 2, 2),
    ("simclr", ["method.name=simclr", "method.queue_size=0"], 2, 0, 1),
    ("sane", ["method.name=sane"], 2, 1, 2),  # query view + its mixed image (own BN group)
    ("sane_multicrop", ["method.name=sane", _views([16, 16, 8, 8])], 3, 1, 3),
    ("ifnd_sym_multicrop", ["method.name=ifnd", "method.symmetric=true", "method.ifnd.levels=[4]",
                            _views([16, 16, 8, 8])], 4, 2, 2),
]


@pytest.mark.parametrize("name,over,n_student,n_teacher,n_backbone", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_every_view_is_encoded_once(tmp_path, name, over, n_student, n_teacher, n_backbone):
    """Student: ONE module call per step over every query view once (+ SANE's mixed images); teacher: ONE call
    over the key views once. Counted with forward hooks over 3 steps (the old engine made 10 + 10 forwards for
    a symmetric 2+4 multi-crop step)."""
    parts, loader, sched = _parts(tmp_path, over)
    student = parts.accelerator.unwrap_model(parts.student)
    calls, backbone = Counter(student), Counter(student.encoder.backbone)
    tcalls, tbackbone = Counter(parts.teacher), Counter(None if parts.teacher is None else parts.teacher.backbone)
    loader.set_epoch(0)
    b = None
    for step, batch in zip(range(3), loader):
        b = batch.views[0].shape[0]
        S.train_step(parts, batch, {k: v[step] for k, v in sched.items()}, step)
    assert calls.calls == 3 and calls.images == 3 * n_student * b
    assert backbone.calls == 3 * n_backbone and backbone.images == 3 * n_student * b
    assert tcalls.calls == (3 if n_teacher else 0) and tbackbone.images == 3 * n_teacher * b


def _unit(z):
    return F.normalize(z.float(), dim=1)


def _reference_loss(parts, batch, sc, step):
    """The per-pair computation (what the old engine did): every pair encodes its own query and key views."""
    student = copy.deepcopy(parts.accelerator.unwrap_model(parts.student))
    teacher, method = copy.deepcopy(parts.teacher), copy.deepcopy(parts.method)
    ema_update(teacher, student.encoder, float(sc["ema"]))
    views, b = batch.views, batch.views[0].shape[0]
    pairs = method.pairs(len(views))
    extras = method.student_extras(views, step)
    losses = []
    for i, (qv, kv) in enumerate(pairs):
        q = _unit(S.forward_group(student.embed, [views[qv]], parts.bn_splits)[0])
        with torch.no_grad():
            k = _unit(S.forward_group(teacher, [views[kv]], parts.bn_splits)[0])
        cols = torch.cat([k, method.queue.keys])
        col_ids = torch.cat([batch.index, method.queue.ids])
        valid = (col_ids >= 0).unsqueeze(0).expand(b, -1).clone()
        if not method.layout.batch_negatives:
            valid[:, :b] = False
        pos = torch.arange(b)
        valid[pos, pos] = True
        sims = Sims(q @ cols.T, k @ cols.T, pos, valid, batch.index, col_ids)
        target = method.assign(sims, sc)
        ce = soft_cross_entropy(sims.student / method.tau, target.prob, target.valid)
        z_extra = [_unit(S.forward_group(student.embed, g, parts.bn_splits)[0]) for g in extras]
        losses.append(method.pair_loss(Pair(i, len(views), qv, kv, sims, cols, target, ce), z_extra, sc, step))
    return float(torch.stack(losses).mean().detach())


@pytest.mark.parametrize("over", [
    ["method.name=sce", "method.symmetric=true"],
    ["method.name=sane"],
    ["method.name=sane", "method.symmetric=true"],
    ["method.name=mocov2", "method.symmetric=true"],
    ["method.name=sane", "model.bn_splits=4", "model.sync_bn=false"],
], ids=["sce_sym", "sane", "sane_sym", "mocov2_sym", "sane_split_bn"])
def test_pair_losses_equal_the_per_pair_computation(tmp_path, over):
    """Cached embeddings change nothing: with every view at its own size (so that each view is its own BN group,
    as in a per-pair forward) the step's loss equals the per-pair reference to 1e-6, over 4 steps (queue
    filling, EMA moving)."""
    sizes = [16, 14, 12, 10]
    parts, loader, sched = _parts(tmp_path, over + [_views(sizes), "method.queue_size=48"])
    loader.set_epoch(0)
    for step, batch in zip(range(4), loader):
        sc = {k: v[step] for k, v in sched.items()}
        set_lr_wd(parts.optimizer, float(sc["lr"]), float(sc["wd"]))
        ref = _reference_loss(parts, batch, sc, step)
        got = float(S.train_step(parts, batch, sc, step)["loss"])
        assert got == pytest.approx(ref, abs=1e-6), step


def test_grouped_views_equal_one_concatenated_forward():
    """forward_group: a group is one forward over the concatenation; with split BN, slice s holds the s-th rows
    of every input (what GPU s would hold) — checked against per-slice plain BN."""
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm1d(3)
    xs = [torch.randn(8, 3), torch.randn(8, 3) + 1]
    got = S.forward_group(bn, xs)
    want = bn(torch.cat(xs)).split(8)
    assert all(torch.allclose(g, w) for g, w in zip(got, want))
    split = SplitBatchNorm(3, splits=2)
    got = S.forward_group(split, xs, bn_splits=2)
    ref = torch.nn.BatchNorm1d(3)
    for s in range(2):  # "device" s: rows 4s..4s+3 of both inputs, normalised together
        dev = ref(torch.cat([x[4 * s:4 * s + 4] for x in xs]))
        assert torch.allclose(torch.cat([g[4 * s:4 * s + 4] for g in got]), dev, atol=1e-6)


def test_split_batch_norm_equals_per_group_batch_norm():
    """Group s = rows s, s+S, ... (the MoCo demo's reshape), each normalised alone; the running statistics are
    the mean of the groups' (unbiased variance), for NCHW and channels_last input, and for [N, C] input."""
    torch.manual_seed(0)
    for x in (torch.randn(12, 4, 5, 5) * 3 + 1, torch.randn(12, 4, 5, 5).contiguous(memory_format=torch.channels_last),
              torch.randn(12, 4)):
        split = SplitBatchNorm(4, splits=3)
        with torch.no_grad():
            split.weight.uniform_(0.5, 2.0), split.bias.uniform_(-1, 1)
        y = split(x)
        plains = [torch.nn.BatchNorm2d(4) if x.dim() == 4 else torch.nn.BatchNorm1d(4) for _ in range(3)]
        for s, plain in enumerate(plains):
            plain.load_state_dict(split.state_dict() | {"running_mean": torch.zeros(4), "running_var": torch.ones(4),
                                                        "num_batches_tracked": torch.tensor(0)})
            assert torch.allclose(y[s::3], plain(x[s::3]), atol=1e-5)
        assert torch.allclose(split.running_mean, torch.stack([p.running_mean for p in plains]).mean(0), atol=1e-6)
        assert torch.allclose(split.running_var, torch.stack([p.running_var for p in plains]).mean(0), atol=1e-6)
        assert int(split.num_batches_tracked) == 1
        assert y.is_contiguous(memory_format=torch.channels_last) == (x.dim() == 4 and not x.is_contiguous())
    split.eval()
    assert torch.allclose(split(x), torch.nn.functional.batch_norm(
        x, split.running_mean, split.running_var, split.weight, split.bias, False), atol=1e-6)


def test_split_bn_is_one_batch_norm_call_per_layer(tmp_path):
    """Launch-bound loops cost little on the CPU and a lot on a GPU: a MoCo-v2 step with 8 BN splits makes
    exactly one aten batch_norm call per BN layer per forward (student + teacher), the same count as plain BN,
    and no per-slice cat (counted with the torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    def counts(splits):
        over = ["method.name=mocov2", f"model.bn_splits={splits}", "model.sync_bn=false",
                "model.shuffle_bn=shuffle", "optim.batch_size=32"]
        parts, loader, sched = _parts(tmp_path / str(splits), over)
        loader.set_epoch(0)
        batch = next(iter(loader))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            S.train_step(parts, batch, {k: v[0] for k, v in sched.items()}, 0)
        ops = {e.key: e.count for e in prof.key_averages()}
        student = parts.accelerator.unwrap_model(parts.student)
        n_bn = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                   for net in (student, parts.teacher) for m in net.modules())
        return ops, n_bn

    ops8, n_bn = counts(8)
    ops1, _ = counts(1)
    assert ops8.get("aten::batch_norm") == ops1.get("aten::batch_norm") == n_bn, n_bn
    for op in ("aten::cat", "aten::mul", "aten::split"):  # no per-slice normalise-and-concatenate
        assert ops8.get(op, 0) <= ops1.get(op, 0) + 2, (op, ops8.get(op), ops1.get(op))


def test_teacher_conv_scope_splits_only_the_teacher_trunk(tmp_path):
    """model.bn_split_scope=teacher_conv (SCE's simulate_n_devices): only the teacher's BatchNorm2d layers are split;
    the student and the teacher's projector BN1d keep full-batch BN, and a step trains with the keys shuffled."""
    over = ["method.name=sce", "model.bn_splits=4", "model.bn_split_scope=teacher_conv", "model.sync_bn=false",
            "model.shuffle_bn=shuffle", "model.proj_bn=true"]
    parts, loader, sched = _parts(tmp_path, over)
    student = parts.accelerator.unwrap_model(parts.student)
    assert not any(isinstance(m, SplitBatchNorm) for m in student.modules()) and student.bn_splits == 1
    trunk = [m for m in parts.teacher.backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    head = [m for m in parts.teacher.projector.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert trunk and all(isinstance(m, SplitBatchNorm) and m.splits == 4 for m in trunk)
    assert head and not any(isinstance(m, SplitBatchNorm) for m in head)
    loader.set_epoch(0)
    logs = S.train_step(parts, next(iter(loader)), {k: v[0] for k, v in sched.items()}, 0)
    assert torch.isfinite(logs["loss"])


def test_shuffle_puts_every_key_back(tmp_path):
    """With the teacher's BN frozen (eval), ShuffleBN must return exactly the unshuffled keys: the permutation
    and its inverse are right; only the BN statistics a key sees change in training mode."""
    parts, loader, _ = _parts(tmp_path, ["model.bn_splits=4", "model.sync_bn=false", "model.shuffle_bn=shuffle"])
    parts.teacher.eval()
    loader.set_epoch(0)
    batch = next(iter(loader))
    g = [[batch.views[0]]]
    k, k_all = S.encode_keys(parts, g, step=3)
    parts.shuffle_bn = "off"
    k0, k0_all = S.encode_keys(parts, g, step=3)
    assert not torch.equal(S.shuffle_perm(0, 3, 16, "cpu"), torch.arange(16))
    assert torch.allclose(k[0], k0[0], atol=1e-6) and torch.allclose(k_all[0], k0_all[0], atol=1e-6)


def _bn_signatures(parts, steps, sched, b=32):
    """Per step: the first BN layer's slice means that each query row and each key row were normalised with.
    Both views of a sample are the SAME image (random per sample), so that the only thing separating slices is
    which images they hold."""
    from fastcl.pipelines.batch import Batch

    student = parts.accelerator.unwrap_model(parts.student)
    splits, seen = parts.bn_splits, {}

    def hook(name):
        def f(mod, inp, out):
            x = inp[0].detach()  # rows in SplitBatchNorm's order: row t·S + s is slice s's t-th image
            x = x.reshape(x.shape[0] // splits, splits, *x.shape[1:]).transpose(0, 1).reshape(x.shape)
            seen[name] = x.reshape(splits, x.shape[0] // splits, x.shape[1], -1).mean(dim=(1, 3))  # [S, C]
            seen[name + "_rows"] = x.reshape(x.shape[0], -1)
        return f

    student.encoder.backbone.bn1.register_forward_hook(hook("q"))
    parts.teacher.backbone.bn1.register_forward_hook(hook("k"))
    g = torch.Generator().manual_seed(0)
    out = []
    for step in range(steps):
        x = torch.rand(b, 3, 16, 16, generator=g) * torch.rand(b, 3, 1, 1, generator=g)  # distinct colour/image
        S.train_step(parts, Batch((x, x.clone()), torch.arange(b) + step * b, None),
                     {k: v[step] for k, v in sched.items()}, step)
        slice_of_row = torch.arange(b) // (b // splits)
        sig_q = seen["q"][slice_of_row]  # query rows are in natural order
        # which image each teacher row held, read off the rows themselves (teacher = student weights here), so
        # the test does not trust the engine's permutation
        image_of_row = torch.cdist(seen["k_rows"], seen["q_rows"]).argmin(1)
        assert sorted(image_of_row.tolist()) == list(range(b))
        sig_k = torch.empty_like(sig_q)
        sig_k[image_of_row] = seen["k"][slice_of_row]
        out.append((sig_q, sig_k))
    return out


@pytest.mark.parametrize("mode", ["off", "shuffle"])
def test_shuffle_bn_hides_the_positive_from_batch_statistics(tmp_path, mode):
    """The leak ShuffleBN exists for (MoCo §3.3): with per-device BN and no shuffle, a query and its positive key
    are normalised with statistics of the SAME images, so matching batch-statistics signatures finds the
    positive far above chance (S/B = 1/4 here vs 1/B = 1/32); with the shuffle the signature says nothing."""
    over = ["model.bn_splits=8", "model.sync_bn=false", f"model.shuffle_bn={mode}", "optim.batch_size=32",
            "data.num_samples=256", "method.queue_size=64", "method.ema=0", "method.ema_end=0"]  # teacher = student
    parts, _, sched = _parts(tmp_path, over)
    hits = []
    for sig_q, sig_k in _bn_signatures(parts, 8, sched):
        d = torch.cdist(sig_q.detach(), sig_k, compute_mode="donot_use_mm_for_euclid_dist")  # [B, B] query i, key j
        best = d <= d.min(1, keepdim=True).values + 1e-6  # keys whose signature matches best (a whole slice)
        b = d.shape[0]
        hits.append((best[torch.arange(b), torch.arange(b)].float() / best.sum(1)).mean())
    acc, chance = float(torch.stack(hits).mean()), 1 / 32
    if mode == "off":
        assert acc > 6 * chance, acc  # the positive's slice is found: 1/4
    else:
        assert acc < 2 * chance, acc


def test_lars_trust_ratio_and_exclusions():
    """LARS step by hand: d = g + wd·w scaled by eta·||w||/||d|| (1 when either norm is 0); excluded (1-D)
    params get plain momentum SGD without decay."""
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
    b = torch.nn.Parameter(torch.tensor([1.0]))
    opt = LARS([{"params": [w]}, {"params": [b], "lars_exclude": True, "weight_decay": 0.0}],
               lr=0.1, momentum=0.9, weight_decay=0.5, eta=0.01)
    w.grad, b.grad = torch.tensor([[0.0, 1.0]]), torch.tensor([2.0])
    opt.step()
    d = torch.tensor([[1.5, 3.0]])  # g + 0.5 w
    expect = torch.tensor([[3.0, 4.0]]) - 0.1 * (0.01 * 5 / d.norm()) * d
    assert torch.allclose(w, expect) and torch.allclose(b, torch.tensor([0.8]))
    w.grad, b.grad = torch.tensor([[0.0, 1.0]]), torch.tensor([2.0])
    w_before = w.detach().clone()
    opt.step()  # momentum: buf = 0.9·buf + d'
    d2 = torch.tensor([[0.0, 1.0]]) + 0.5 * w_before
    buf = 0.9 * (0.01 * 5 / d.norm()) * d + (0.01 * w_before.norm() / d2.norm()) * d2
    assert torch.allclose(w, w_before - 0.1 * buf, atol=1e-7) and torch.allclose(b, torch.tensor([0.8 - 0.1 * 3.8]))
    z = torch.nn.Parameter(torch.zeros(1, 2))
    opt2 = LARS([z], lr=1.0, momentum=0.0, weight_decay=0.0)
    z.grad = torch.ones(1, 2)
    opt2.step()
    assert torch.allclose(z, -torch.ones(1, 2))  # ||w|| = 0: trust ratio 1, not 0 or NaN


def _lars_step_ops(n: int) -> list[str]:
    """The operators one LARS step calls directly (not their CPU fallbacks), for n matrices + n vectors."""
    from torch.profiler import profile

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(8, 4)) for _ in range(n)] + [torch.nn.Parameter(torch.randn(4))
                                                                          for _ in range(n)]
    opt = LARS([{"params": params[:n]}, {"params": params[n:], "lars_exclude": True, "weight_decay": 0.0}],
               lr=0.1, momentum=0.9, weight_decay=1e-4)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    with profile() as prof:
        opt.step()
    views = ("aten::select", "aten::unbind", "aten::as_strided")  # no kernel
    return sorted(e.name for e in prof.events()
                  if e.cpu_parent is not None and e.cpu_parent.name.startswith("Optimizer.step") and e.name not in views)


def test_lars_step_is_multi_tensor():
    """LARS launches its norms, momentum and update as foreach ops over all parameters of a group (a per-parameter
    loop costs ~10 kernel launches per tensor on a GPU): the operators a step calls do not grow with the number of
    parameters (on the CPU the foreach ops fall back to per-tensor loops inside; on CUDA they are fused)."""
    small, large = _lars_step_ops(6), _lars_step_ops(24)
    assert small == large, (small, large)
    assert small.count("aten::_foreach_norm") == 2 and "aten::linalg_vector_norm" not in small


@pytest.mark.slow
@pytest.mark.parametrize("name,over,one_over", [
    ("sce_sym_multicrop", ["method.name=sce", "method.symmetric=true", _views([16, 16, 8, 8])], []),
    ("shufflebn", ["method.name=mocov2", "model.sync_bn=false", "model.shuffle_bn=shuffle"], ["model.bn_splits=2"]),
], ids=["sce_sym_multicrop", "shufflebn_vs_split2"])
def test_two_processes_one_forward_per_backward(tmp_path, name, over, one_over):
    """gloo, 2 processes: DDP sees ONE student forward (and one teacher call) per backward, and the loss equals
    the 1-process run to 2e-5. sce_sym_multicrop: global BN (sync). shufflebn: per-device BN with keys shuffled
    across the 2 ranks equals ONE process simulating 2 devices (bn_splits=2) with the same permutation."""
    from test_train import _torchrun

    worker = os.path.join(REPO, "tests/_dist_train_worker.py")
    base = ["data.num_samples=48", "optim.lr=0.002", "trainer.epochs=1"]
    for n in (1, 2):
        os.makedirs(tmp_path / f"w{n}")
        extra = one_over if n == 1 else []
        _torchrun(n, [worker, TINY, str(tmp_path / f"w{n}")] + base + over + extra
                  + [f"trainer.run_dir={tmp_path / f'r{n}'}"])
    one = torch.load(tmp_path / "w1/rank0.pt", weights_only=False)
    for r in (0, 1):
        two = torch.load(tmp_path / f"w2/rank{r}.pt", weights_only=False)
        assert two["calls"] == {"student": two["steps"], "teacher": two["steps"]}
        assert two["losses"] == pytest.approx(one["losses"], abs=2e-5)


def test_collective_timeout_reaches_the_process_group(tmp_path):
    """trainer.collective_timeout_s bounds rank-0 work between collectives: it is handed to accelerate's process
    group (and only the timeout: the backend stays accelerate's choice, gloo on CPU)."""
    from datetime import timedelta

    from fastcl.train import make_accelerator

    cfg = load_config(TINY, [f"trainer.run_dir={tmp_path}", "trainer.collective_timeout_s=123"])
    handler = make_accelerator(cfg).init_handler
    assert handler.timeout == timedelta(seconds=123) and handler.to_kwargs() == {"timeout": timedelta(seconds=123)}
