"""Typed config schema, YAML loading with `defaults:` composition, dotted overrides, strict keys.

    cfg = load_config("configs/exp/cifar10_mocov2.yaml", ["optim.lr=0.1", "trainer.epochs=5"])

Every key is declared here with its type and default. A key that is not declared fails before anything
runs, naming the key and the closest valid ones (difflib). `validate(cfg)` then checks values that a type
cannot express (positive sizes, temperatures > 0, known names).
"""
from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field, fields, is_dataclass, make_dataclass
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from fastcl.pipelines.augspec import AugSpec


class ConfigError(ValueError):
    """A bad config key or value; the message names it."""


@dataclass
class DataCfg:
    backend: str = "synthetic"  # synthetic | torch | gpu_tensor | ffcv | dali
    path: str = ""  # training data: image folder (class sub-folders or flat) or .beton for ffcv
    eval_path: str = ""  # labelled held-out split (image folder) for the kNN monitor; "" = no monitor
    eval_train_path: str = ""  # labelled train split used as the kNN bank; "" = data.path
    # class subset for every split, backend and eval path: a list of class folder names or a text file of them
    # (one per line), ids 0..C-1 in SORTED name order; None = all (pipelines/folder.py, docs/DATA.md)
    classes: Any = None
    num_samples: int = 512  # synthetic backend only
    num_classes: int = 10  # synthetic backend only (labels for diagnostics)
    max_samples: int = 0  # >0: use only the first max_samples images (in the documented id order)
    workers: int = 2  # loader worker processes (torch backend) / threads (ffcv, dali)
    drop_last: bool = True  # drop the incomplete final global batch
    shuffle: bool = True
    # ffcv backend: once = decode each image once and cut every view from it (pipelines/ffcv_multicrop.py);
    # per_view = one stock ffcv pipeline per view, decoding once per view (kept for comparison)
    ffcv_decode: str = "once"
    aug: AugSpec = field(default_factory=AugSpec)


@dataclass
class ModelCfg:
    arch: str = "resnet18"  # resnet18 | resnet34 | resnet50
    cifar_stem: bool = False  # 3x3 stride-1 conv, no max-pool (small images)
    width: int = 64  # base channel width (64 = torchvision); smaller for CPU tests
    proj_hidden: int = 2048
    proj_dim: int = 128
    proj_layers: int = 2  # MoCo-v2: 2, SimCLR-v2/SANE: 3
    proj_bn: bool = True  # BN on hidden projector layers
    proj_out_bn: bool = False  # BN (no affine) on the projector output (SCE ImageNet)
    pred_hidden: int = 0  # >0: online predictor MLP dim -> hidden -> dim (SCE ImageNet); 0 = none
    sync_bn: bool = True  # with >1 process: BN statistics over the global batch
    # Key-encoder (teacher) batch norm, the leak MoCo's ShuffleBN prevents: off (per-device statistics over the
    # keys as they come) | shuffle (keys shuffled across devices / BN groups, un-shuffled after: MoCo
    # `_batch_shuffle_ddp`) | sync (global statistics). Default per recipe (docs/RECIPES.md).
    shuffle_bn: str = "off"
    # BN groups per process: statistics over B_local / bn_splits images (MoCo CIFAR demo `SplitBatchNorm(bn_splits=8)`,
    # SCE `simulate_n_devices`): one device simulating that many GPUs.
    bn_splits: int = 1
    # which BN layers bn_splits splits: all (student and teacher, every BN: the MoCo demo) | teacher_conv (only the
    # teacher's BatchNorm2d; the student and the teacher's projector keep full-batch BN: SCE's
    # convert_to_split_batchnorm on its momentum trunk and projector, which converts BatchNorm2d only)
    bn_split_scope: str = "all"


@dataclass
class MethodCommon:
    """Keys every method shares; each method's own section (method.sce, method.ifnd, ...) is its `Config`
    dataclass, declared in its file (fastcl/methods/<name>.py) and attached below from the registry."""
    name: str = "mocov2"  # a key of fastcl.methods.METHODS
    base: str = "mocov2"  # for ifnd/sepp/oracle: simclr | mocov2 (the candidate set they act on)
    tau: float = 0.2  # student temperature
    queue_size: int = 4096  # 0 = no queue
    batch_negatives: bool = False  # other gathered batch keys are candidates too (SANE: True)
    symmetric: bool = False  # both views act as query in turn (loss averaged)
    ema: float = 0.99  # EMA momentum at step 0
    ema_end: float = 0.99  # EMA momentum at the last step (cosine ramp; = ema for constant)
    kernel: str = "auto"  # target kernels: auto | torch | numba


def _method_schema():
    """MethodCfg = MethodCommon + one field per method section, read from the registry (a method owns its
    schema: adding one touches its file, its YAML and one registry line)."""
    from fastcl.methods import METHODS

    sections = [(cls.section, cls.Config, field(default_factory=cls.Config))
                for cls in METHODS.values() if cls.Config is not None]
    return make_dataclass("MethodCfg", sections, bases=(MethodCommon,))


MethodCfg = _method_schema()


@dataclass
class OptimCfg:
    name: str = "sgd"  # sgd | lars
    batch_size: int = 256  # GLOBAL batch (split over processes)
    lr: float = 0.03  # at base_batch; scaled linearly with batch_size / base_batch
    base_batch: int = 256  # 0 = no scaling
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.0
    min_lr: float = 0.0  # cosine floor, as a fraction of the peak lr
    # step: the lr changes every step; epoch: one value per epoch (fastcl.schedules.epoch_cosine), as the MoCo
    # CIFAR demo's adjust_learning_rate
    schedule_granularity: str = "step"
    lars_eta: float = 0.001
    clip_grad: float = 0.0  # >0: clip the global grad norm


@dataclass
class TrainerCfg:
    run_dir: str = "runs/default"
    seed: int = 0
    epochs: int = 1
    max_steps: int = 0  # >0: stop after this many steps (schedules still span `epochs`)
    log_every: int = 10  # steps between logged metrics (the only host sync of the hot path)
    ckpt_every: int = 0  # steps between checkpoints (0: epoch ends only)
    ckpt_keep: int = 3
    # epochs whose end-of-epoch checkpoint is never pruned by ckpt_keep: the rungs of a ladder of bases that later
    # runs start from (trainer.init_from=<run>/checkpoints/step_<N>); [] = none
    keep_epochs: list[int] = field(default_factory=list)
    resume: str = ""  # "" | auto | path to a checkpoint directory
    # warm start: a fresh run starts from another run's checkpoint (or run directory): its weights, EMA
    # teacher, optimizer state, train position and RNG; the method state is fresh except a same-size queue
    # (checkpoint.stage_init). Ignored when the run resumes its own checkpoints. "" = off
    init_from: str = ""
    # keep: continue init_from's train position (step, epoch) and RNG states, so the schedule goes on where it was
    # (the warm protocol); reset: step 0 of this run's own schedule and its own seeded RNG (the ladder protocol)
    init_position: str = "keep"
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    compile: bool = False
    channels_last: bool = True
    cpu: bool = False  # force CPU even when a GPU is visible
    # timeout of every collective (torch.distributed process group). torch's default is 10 min; rank-0 work between
    # two collectives (mining at an epoch start on ImageNet) is bounded by it, so ours is 30 min (our choice)
    collective_timeout_s: int = 1800
    progress: bool = True
    skip_nonfinite: bool = False
    # a file whose appearance stops the run like SIGUSR1 (checkpoint at the next log step, exit 0); relative to
    # run_dir; "" = off. For launchers that do not forward signals to the training processes (see SCALING.md).
    stop_file: str = "STOP"
    knn_every: int = 1  # epochs between kNN monitor evaluations (0 = off)
    knn_k: int = 200
    knn_t: float = 0.1
    # what the kNN monitor embeds: backbone (pooled features, the usual protocol) | head (the projector's output,
    # as the MoCo CIFAR demo's monitor, whose network ends in its fc head)
    knn_features: str = "backbone"
    # experiment trackers, passed to accelerate's log_with (fastcl/trackers.py): tensorboard | wandb | mlflow;
    # each gets the scalars metrics.jsonl gets. [] = metrics.jsonl only
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    # online linear probe on detached backbone features of the labelled training batches, top-1 on data.eval_path
    # logged with knn_top1 as probe_top1. READS LABELS (like method=oracle): off by default (eval/online_probe.py)
    online_probe: bool = False
    online_probe_lr: float = 0.1


@dataclass
class Config:
    data: DataCfg = field(default_factory=DataCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    method: MethodCfg = field(default_factory=MethodCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    trainer: TrainerCfg = field(default_factory=TrainerCfg)


def _dataclass_keys(dc, prefix: str = "") -> list[str]:
    """All dotted keys of a schema dataclass, e.g. ['optim.lr', ...]."""
    out = []
    for f in fields(dc):
        key = f"{prefix}{f.name}"
        out.append(key)
        default = f.default_factory() if f.default_factory is not type(None) and callable(f.default_factory) else f.default  # noqa: E501
        if is_dataclass(default):
            out += _dataclass_keys(type(default), key + ".")
        elif isinstance(default, list) and default and is_dataclass(default[0]):
            out += _dataclass_keys(type(default[0]), key + ".*.")  # list of sections: views.0.size
    return out


ALL_KEYS = _dataclass_keys(Config)


def _norm(key: str) -> str:
    """'data.aug.views.1.size' -> 'data.aug.views.*.size' (list positions are wildcards)."""
    return re.sub(r"\.\d+(?=\.|$)", ".*", key)


def _unknown_key_error(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, ALL_KEYS, n=3, cutoff=0.5)
    leaf = key.rsplit(".", 1)[-1]
    close += [k for k in ALL_KEYS if k.rsplit(".", 1)[-1] == leaf and k not in close][:3]
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown config key {key!r} (from {where}){hint}")


def _check_keys(node: Any, prefix: str, where: str) -> None:
    """Walk a raw YAML/override tree and fail on the first key the schema does not have."""
    if isinstance(node, (dict, DictConfig)):
        for k, v in node.items():
            key = f"{prefix}{k}"
            if _norm(key) not in ALL_KEYS:
                raise _unknown_key_error(key, where)
            _check_keys(v, key + ".", where)
    elif isinstance(node, (list, ListConfig)):
        for i, v in enumerate(node):
            _check_keys(v, f"{prefix}{i}.", where)


def _load_yaml(path: str, seen: tuple[str, ...] = ()) -> DictConfig:
    """Load YAML, first merging the files listed under `defaults:` (relative to configs/ or to the file)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    if path in seen:
        raise ConfigError(f"config defaults cycle: {' -> '.join(seen + (path,))}")
    try:
        raw = OmegaConf.load(path)
    except yaml.YAMLError as e:  # bad-input fix (tests/test_bad_input.py): was a multi-line yaml traceback
        raise ConfigError(f"{path}: invalid YAML: {_yaml_problem(e)}") from None
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"{path}: top level must be a mapping")
    merged = OmegaConf.create()
    defaults = raw.pop("defaults", []) or []
    for d in defaults:
        cand = [os.path.join(os.path.dirname(path), d), os.path.join(_configs_root(path), d)]
        cand = [c if c.endswith(".yaml") else c + ".yaml" for c in cand]
        found = next((c for c in cand if os.path.isfile(c)), None)
        if found is None:
            raise ConfigError(f"{path}: defaults entry {d!r} not found (looked in {cand})")
        merged = OmegaConf.merge(merged, _load_yaml(found, seen + (path,)))
    _check_keys(raw, "", path)
    return OmegaConf.merge(merged, raw)


def _yaml_problem(e: Exception) -> str:
    """One line out of a (multi-line) yaml error: the problem and where."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or str(e).splitlines()[0]}{where}"


def _configs_root(path: str) -> str:
    parts = os.path.abspath(path).split(os.sep)
    if "configs" in parts:
        return os.sep.join(parts[: len(parts) - parts[::-1].index("configs")])
    return os.path.dirname(path)


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """['optim.lr=0.1', 'data.aug.views.0.size=64'] -> [(key, parsed YAML value), ...]; unknown keys fail."""
    out = []
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override {o!r} must look like key=value (e.g. optim.lr=0.1)")
        key, val = (x.strip() for x in o.split("=", 1))
        if _norm(key) not in ALL_KEYS:
            raise _unknown_key_error(key, "command line")
        try:
            out.append((key, yaml.safe_load(val) if val else ""))
        except yaml.YAMLError as e:  # bad-input fix: `optim.lr=[1,` was a yaml traceback
            raise ConfigError(f"override {o!r} (from command line): invalid YAML value: {_yaml_problem(e)}") from None
    return out


def _wrap(e: Exception, where: str) -> ConfigError:
    key = str(getattr(e, "full_key", "") or "?")
    if isinstance(e, (ConfigKeyError, ConfigAttributeError)):
        return _unknown_key_error(key, where)
    msg = getattr(e, "msg", str(e)).split("\n")[0]
    return ConfigError(f"bad value for config key {key!r} (from {where}): {msg}")


def load_config(path: str | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Schema defaults <- YAML (with defaults:) <- key=value overrides; typed, strict, validated."""
    cfg = OmegaConf.structured(Config)
    if path:
        try:
            cfg = OmegaConf.merge(cfg, _load_yaml(path))
        except OmegaConfBaseException as e:
            raise _wrap(e, path) from None
    for key, val in parse_overrides(overrides or []):
        try:
            OmegaConf.update(cfg, key, val, merge=True)
        except OmegaConfBaseException as e:
            raise _wrap(e, "command line") from None
    validate(cfg)
    return cfg


def _need(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


ARCHS = ("resnet18", "resnet34", "resnet50")


def validate(cfg: DictConfig) -> None:
    """Value checks a type cannot express. Each failure names the key and the bad value."""
    m, o, t, d, mo = cfg.method, cfg.optim, cfg.trainer, cfg.data, cfg.model
    from fastcl.methods import METHODS

    _need(m.name in METHODS, "method.name", f"unknown method {m.name!r}; choose one of {list(METHODS)}")
    for cls in METHODS.values():  # every section is checked (a typo in an unused one is still a typo)
        if cls.Config is not None:
            for key, ok, msg in cls.Config.checks(m[cls.section]):
                _need(ok, f"method.{cls.section}.{key}", msg)
    _need(m.base in ("simclr", "mocov2"), "method.base", f"{m.base!r} must be simclr or mocov2")
    _need(mo.arch in ARCHS, "model.arch", f"unknown backbone {mo.arch!r}; choose one of {list(ARCHS)}")
    _need(m.tau > 0, "method.tau", f"temperature must be > 0, got {m.tau}")
    _need(m.queue_size >= 0, "method.queue_size", f"must be >= 0, got {m.queue_size}")
    _need(0 <= m.ema <= 1 and 0 <= m.ema_end <= 1, "method.ema", "EMA momenta must lie in [0, 1]")
    _need(m.kernel in ("auto", "torch", "numba"), "method.kernel", f"{m.kernel!r} not in auto|torch|numba")
    _need(o.name in ("sgd", "lars"), "optim.name", f"unknown optimizer {o.name!r}; choose sgd or lars")
    _need(o.batch_size > 0, "optim.batch_size", f"must be > 0, got {o.batch_size}")
    _need(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    _need(o.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    # bad-input fixes (tests/test_bad_input.py): values that crashed later (warmup, momentum) or trained silently
    # wrong (a negative base_batch or min_lr makes the lr negative; negative "every" counts act as "every step")
    _need(o.schedule_granularity in ("step", "epoch"), "optim.schedule_granularity",
          f"{o.schedule_granularity!r} not in step|epoch")
    _need(o.warmup_epochs >= 0, "optim.warmup_epochs", f"must be >= 0, got {o.warmup_epochs}")
    _need(0 <= o.momentum < 1, "optim.momentum", f"must lie in [0, 1), got {o.momentum}")
    _need(o.base_batch >= 0, "optim.base_batch", f"must be >= 0 (0 = no lr scaling), got {o.base_batch}")
    _need(0 <= o.min_lr <= 1, "optim.min_lr", f"a fraction of the peak lr in [0, 1], got {o.min_lr}")
    _need(o.clip_grad >= 0, "optim.clip_grad", f"must be >= 0 (0 = off), got {o.clip_grad}")
    _need(t.collective_timeout_s > 0, "trainer.collective_timeout_s", f"must be > 0, got {t.collective_timeout_s}")
    for key in ("max_steps", "ckpt_every", "knn_every"):
        _need(t[key] >= 0, f"trainer.{key}", f"must be >= 0 (0 = off), got {t[key]}")
    for key in ("max_samples", "workers"):
        _need(d[key] >= 0, f"data.{key}", f"must be >= 0, got {d[key]}")
    _need(t.epochs > 0, "trainer.epochs", f"must be > 0, got {t.epochs}")
    _need(t.log_every > 0, "trainer.log_every", f"must be > 0, got {t.log_every}")
    _need(t.ckpt_keep >= 1, "trainer.ckpt_keep", f"must be >= 1, got {t.ckpt_keep}")
    _need(all(0 < int(e) <= t.epochs for e in t.keep_epochs), "trainer.keep_epochs",
          f"epochs in 1..trainer.epochs={t.epochs}, got {list(t.keep_epochs)}")
    _need(t.init_position in ("keep", "reset"), "trainer.init_position", f"{t.init_position!r} not in keep|reset")
    _need(t.precision in ("auto", "fp32", "bf16"), "trainer.precision", f"{t.precision!r} not in auto|fp32|bf16")
    _need(t.knn_k > 0, "trainer.knn_k", f"must be > 0, got {t.knn_k}")  # bad-input fix: name the bad key
    _need(t.knn_features in ("backbone", "head"), "trainer.knn_features", f"{t.knn_features!r} not in backbone|head")
    _need(t.knn_t > 0, "trainer.knn_t", f"temperature must be > 0, got {t.knn_t}")
    from fastcl.trackers import TRACKERS
    _need(all(str(x).lower() in TRACKERS for x in t.trackers), "trainer.trackers",
          f"{list(t.trackers)}: each must be one of {sorted(TRACKERS)}")
    _need(mo.width >= 4, "model.width", f"must be >= 4, got {mo.width}")
    _need(mo.proj_hidden > 0, "model.proj_hidden", f"must be > 0, got {mo.proj_hidden}")
    _need(mo.proj_dim > 0, "model.proj_dim", f"must be > 0, got {mo.proj_dim}")
    if mo.shuffle_bn in ("False", "false"):  # YAML 1.1 reads a bare `off` as the boolean false
        mo.shuffle_bn = "off"
    _need(mo.shuffle_bn in ("off", "shuffle", "sync"), "model.shuffle_bn", f"{mo.shuffle_bn!r} not in off|shuffle|sync")
    _need(mo.bn_splits >= 1, "model.bn_splits", f"must be >= 1, got {mo.bn_splits}")
    _need(mo.bn_split_scope in ("all", "teacher_conv"), "model.bn_split_scope",
          f"{mo.bn_split_scope!r} not in all|teacher_conv")
    _need(mo.proj_layers >= 1, "model.proj_layers", f"must be >= 1, got {mo.proj_layers}")
    _need(len(d.aug.views) >= 2, "data.aug.views", f"need at least 2 views, got {len(d.aug.views)}")
    for i, v in enumerate(d.aug.views):
        _need(v.size > 0, f"data.aug.views[{i}].size", f"must be > 0, got {v.size}")
        _need(0 < v.scale[0] <= v.scale[1] <= 1, f"data.aug.views[{i}].scale", f"need 0 < min <= max <= 1, got {list(v.scale)}")
        # bad-input fix: probabilities, aspect ratios and blur sigmas that ran silently
        _need(0 < v.ratio[0] <= v.ratio[1], f"data.aug.views[{i}].ratio", f"need 0 < min <= max, got {list(v.ratio)}")
        _need(0 < v.blur_sigma[0] <= v.blur_sigma[1], f"data.aug.views[{i}].blur_sigma",
              f"need 0 < min <= max, got {list(v.blur_sigma)}")
        for key in ("flip_p", "jitter_p", "gray_p", "blur_p", "solarize_p"):
            _need(0 <= v[key] <= 1, f"data.aug.views[{i}].{key}", f"a probability in [0, 1], got {v[key]}")
    _need(all(x > 0 for x in d.aug.std), "data.aug.std", f"must be > 0, got {list(d.aug.std)}")  # bad-input fix
    _need(d.aug.eval_size > 0, "data.aug.eval_size", f"must be > 0, got {d.aug.eval_size}")
    _need(d.backend == "synthetic" or bool(d.path), "data.path", f"backend {d.backend!r} needs data.path")
    _need(d.classes is None or isinstance(d.classes, (str, ListConfig)), "data.classes",
          f"a list of class folder names or the path of a class-list file, got {d.classes!r}")
    _need(d.num_samples > 0, "data.num_samples", f"must be > 0, got {d.num_samples}")
    _need(d.ffcv_decode in ("once", "per_view"), "data.ffcv_decode", f"{d.ffcv_decode!r} not in once|per_view")


def save_config(cfg: DictConfig, path: str) -> None:
    OmegaConf.save(cfg, path, resolve=True)


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


__all__ = ["Config", "ConfigError", "load_config", "validate", "save_config", "to_yaml", "ALL_KEYS", "ListConfig"]
