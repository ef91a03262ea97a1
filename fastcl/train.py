"""fastcl trainer entry point.

    accelerate launch fastcl/train.py --config configs/exp/cifar10_mocov2.yaml optim.lr=0.06 trainer.epochs=5
    python fastcl/train.py --config configs/test/tiny.yaml --resume auto

The loop is explicit (DESIGN.md rule 2): setup -> for epoch: method epoch hook, for batch: train_step, log,
checkpoint -> epoch end: kNN monitor, checkpoint.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # `python fastcl/train.py` / `accelerate launch fastcl/train.py` put fastcl/ itself first on sys.path;
    # remove it so our module names (config, optim, models, ...) can never shadow a dependency's modules.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != _here]

import argparse  # noqa: E402
import json  # noqa: E402

import torch  # noqa: E402

from fastcl import checkpoint as ckpt  # noqa: E402
from fastcl import dist  # noqa: E402
from fastcl.config import ConfigError, load_config  # noqa: E402
from fastcl.methods import build_method  # noqa: E402
from fastcl.methods.base import Services  # noqa: E402
from fastcl.models import (build_encoder, build_predictor, convert_split_bn, convert_sync_bn,  # noqa: E402
                           make_teacher)
from fastcl.optim import build_optimizer, set_lr_wd  # noqa: E402
from fastcl.pipelines import build_loader  # noqa: E402
from fastcl.schedules import build_schedules  # noqa: E402
from fastcl.step import StepParts, Student, train_step  # noqa: E402
from fastcl.health import Health, StopRequest  # noqa: E402
from fastcl.runlog import RunLog  # noqa: E402
from fastcl.timing import StageTimer  # noqa: E402


class SetupError(RuntimeError):
    """A problem found before training starts (bad data path, sizes, checkpoint): reported as one line."""


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="fastcl/train.py", description="Self-supervised contrastive pretraining")
    ap.add_argument("--config", help="YAML config (see configs/); schema defaults if omitted")
    ap.add_argument("--resume", help="'auto' (newest checkpoint in trainer.run_dir) or a checkpoint directory")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=0.1")
    return ap.parse_intermixed_args(argv)  # overrides may come before and after --resume/--config


def make_accelerator(cfg):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    use_cpu = cfg.trainer.cpu or not torch.cuda.is_available()
    proj = ProjectConfiguration(project_dir=cfg.trainer.run_dir, logging_dir=os.path.join(cfg.trainer.run_dir, "tb"))
    # Mixed precision is applied explicitly in step.py (forward only; targets and CE stay fp32).
    # trainer.trackers (fastcl/trackers.py): a missing wandb/mlflow fails here, before training, with the pip command
    from fastcl.trackers import TrackerError, resolve
    try:
        log_with = resolve(cfg.trainer.trackers)
    except TrackerError as e:
        raise ConfigError(str(e)) from None
    # Rank-0-only work between collectives (IFND's k-means on the embedding pass, SePP's table) must finish inside
    # the process group's timeout, or the waiting ranks abort: trainer.collective_timeout_s (docs/SCALING.md).
    from datetime import timedelta

    from accelerate.utils import InitProcessGroupKwargs
    pg = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.trainer.collective_timeout_s))
    return Accelerator(cpu=use_cpu, log_with=log_with or None, project_config=proj, kwargs_handlers=[pg])


def resolve_precision(cfg, device: torch.device) -> str:
    p = cfg.trainer.precision
    return ("bf16" if device.type == "cuda" else "fp32") if p == "auto" else p


def setup(cfg, accelerator):
    """Everything before the loop; every user error here raises SetupError/ConfigError with one clear line."""
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    o, t = cfg.optim, cfg.trainer
    if o.batch_size % world:
        raise ConfigError(f"optim.batch_size={o.batch_size} is not divisible by the {world} processes")
    try:  # bad-input fix (test_bad_input): a missing --resume path is one error line, not a traceback
        candidates = ckpt.resolve_resume(t.run_dir, t.resume)
    except FileNotFoundError as e:
        raise SetupError(str(e)) from None
    if not t.resume and ckpt.list_checkpoints(t.run_dir):
        raise SetupError(f"trainer.run_dir={t.run_dir} already holds checkpoints; pass --resume auto to continue "
                         f"it or choose another trainer.run_dir")
    if t.resume and t.resume != "auto" and not candidates:
        raise SetupError(f"trainer.resume={t.resume}: no checkpoint found")
    torch.manual_seed(t.seed)  # identical initial weights on every rank
    try:
        loader = build_loader(cfg, rank, world, device)
    except (FileNotFoundError, ValueError) as e:
        raise SetupError(f"data: {e}") from None
    n = loader.num_samples
    if len(loader) == 0:
        raise SetupError(f"data: {n} samples give no full global batch of optim.batch_size={o.batch_size}")
    if cfg.method.queue_size > n:
        raise ConfigError(f"method.queue_size={cfg.method.queue_size} is larger than the dataset ({n} samples): "
                          f"the queue would hold duplicates of the same images")
    mo = cfg.model
    local_batch = o.batch_size // world
    if local_batch % mo.bn_splits:
        raise ConfigError(f"model.bn_splits={mo.bn_splits} does not divide the per-process batch of {local_batch}")
    if mo.bn_splits > 1 and mo.sync_bn and world > 1:
        raise ConfigError("model.bn_splits > 1 simulates per-device BN, model.sync_bn=true makes it global: choose one")
    memory_format = torch.channels_last if t.channels_last else torch.contiguous_format
    s_splits = mo.bn_splits if mo.bn_split_scope == "all" else 1  # teacher_conv: the student keeps full-batch BN
    encoder = convert_split_bn(build_encoder(mo), s_splits)
    student = Student(encoder, convert_split_bn(build_predictor(mo), s_splits), s_splits, t.channels_last)
    student = student.to(device, memory_format=memory_format)
    try:
        method = build_method(cfg, n).to(device)
        sched_method = method.schedules(t.epochs * len(loader), len(loader))
    except (FileNotFoundError, ValueError) as e:
        raise SetupError(f"{e}") from None
    # The teacher is copied BEFORE the student's BN goes global, so that its BN follows model.shuffle_bn alone:
    # off = like the student's, shuffle = per device / per BN slice on shuffled keys, sync = global.
    teacher = None if method.inbatch else make_teacher(student.encoder)
    if teacher is not None and mo.bn_split_scope == "teacher_conv":
        teacher = convert_split_bn(teacher, mo.bn_splits, (torch.nn.BatchNorm2d,))
    if mo.sync_bn:  # after .to(device): SyncBatchNorm on CUDA, an all-reduce BN on CPU (gloo)
        student = convert_sync_bn(student)
    if teacher is not None and mo.shuffle_bn == "sync":
        teacher = convert_sync_bn(convert_split_bn(teacher, 1))
    elif teacher is not None and mo.shuffle_bn == "off" and mo.sync_bn:
        teacher = convert_sync_bn(teacher)
    optimizer = build_optimizer(cfg, student)
    if t.compile:
        # In-place Module.compile keeps the state-dict names (torch.compile(student) would prefix every key
        # with "_orig_mod.", breaking export, evaluation and resuming with compile off).
        student.compile()
    student, optimizer = accelerator.prepare(student, optimizer)
    sched = {**build_schedules(cfg, len(loader)), **sched_method}
    state = ckpt.TrainState()
    objects = {"train_state": state, "method": method, **({"teacher": teacher} if teacher is not None else {})}
    files = ckpt.register(accelerator, objects)
    from fastcl.mining.engine import choose_engine
    expect = {"method": cfg.method.name, "arch": cfg.model.arch, "proj_dim": cfg.model.proj_dim,
              "width": cfg.model.width, "cifar_stem": cfg.model.cifar_stem, "files": files,
              "mining_engine": choose_engine("auto", device)}  # what the miners resolve "auto" to here
    resumed = None
    if candidates:
        try:  # bad-input fix: another method's / architecture's checkpoint, or none loadable -> one line
            resumed = ckpt.load_first_good(accelerator, candidates, expect)
        except ValueError as e:
            raise SetupError(f"trainer.resume={t.resume}: {e}") from None
        if resumed is None:
            raise SetupError(f"trainer.resume={t.resume}: none of {len(candidates)} checkpoints could be loaded")
    elif t.init_from:
        resumed = warm_start(accelerator, t.init_from, objects, files, expect, t.init_position == "keep")
    parts = StepParts(student, teacher, method, optimizer, accelerator, resolve_precision(cfg, device),
                      t.channels_last, o.clip_grad, StageTimer(device), t.skip_nonfinite, mo.shuffle_bn,
                      mo.bn_splits, t.seed,
                      services(method, device, cfg, loader, teacher or accelerator.unwrap_model(student).encoder))
    try:
        method.prepare(parts.services)
    except (FileNotFoundError, ValueError) as e:
        raise SetupError(f"{e}") from None
    return parts, loader, sched, state, expect, resumed


def warm_start(accelerator, src: str, objects: dict, files: dict, expect: dict, keep_position: bool = True) -> str:
    """trainer.init_from: load another run's checkpoint into this fresh run (checkpoint.stage_init says what is
    taken and what stays fresh). Each rank stages its own temporary copy, so no collective is needed."""
    import shutil
    import tempfile

    stage = tempfile.mkdtemp(prefix="fastcl-init-")
    try:
        info = ckpt.stage_init(src, objects, files, expect, stage, keep_position)
        accelerator.load_state(stage)
    except (FileNotFoundError, ValueError) as e:
        raise SetupError(f"trainer.init_from={src}: {e}") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    queue = "queue kept" if info["kept_queue"] else "no queue kept"
    return f"{info['path']} (trainer.init_from: fresh method state, {queue})"


def services(method, device, cfg, loader, net) -> Services:
    """The Services the method declares in `needs`, and nothing else (methods/base.py says what each is).
    embed_pass: [N, D] eval-transform features of every training image by `net` (the teacher when there is one,
    else the student's encoder); a collective, sharded over every rank, read through the run's own backend
    (fastcl.eval.features.embed_dataset: every backend has such a pass)."""
    def embed_pass():
        from fastcl.eval.features import embed_dataset
        return embed_dataset(net, cfg, loader)

    offers = {"embed_pass": embed_pass, "key_partners": getattr(loader, "set_key_partners", None),
              "dataset_labels": (lambda: torch.as_tensor(loader.labels)) if hasattr(loader, "labels") else None}
    return Services(device, **{k: v for k, v in offers.items() if k in method.needs})


def _skip(loader, state: ckpt.TrainState):
    """Iterator over the rest of the current epoch: resumes at state.batches_done without redoing work."""
    if state.batches_done and hasattr(loader, "load_state_dict"):
        loader.load_state_dict({"epoch": state.epoch, "batches_done": state.batches_done})
        return iter(loader)
    it = iter(loader)
    for _ in range(state.batches_done):  # backends without a position state: draw and discard
        next(it)
    return it


def train(cfg) -> dict:
    """Run (or resume) one pretraining run. Returns final metrics."""
    stop, lock = StopRequest(), ckpt.RunDirLock()
    try:
        return _train(cfg, stop, lock)
    finally:
        stop.restore()
        lock.release()


def _train(cfg, stop: StopRequest, lock: ckpt.RunDirLock) -> dict:
    """setup -> for each epoch: the method's epoch hook, for each batch: train_step (+ the records of
    fastcl/runlog.py) and checkpoints -> epoch end: kNN monitor, checkpoint. A stop request (signal or stop file,
    agreed at a log step) writes a checkpoint and leaves the loop."""
    accelerator = make_accelerator(cfg)
    t = cfg.trainer
    parts, loader, sched, state, expect, resumed = setup(cfg, accelerator)
    total = t.epochs * len(loader)
    last_step = min(total, t.max_steps) if t.max_steps > 0 else total
    try:  # before anything is written: a bad eval folder or probe setting is one error line
        run = RunLog(cfg, accelerator, parts, loader, state, last_step)
    except ValueError as e:
        raise SetupError(str(e)) from None
    stop.stop_file = os.path.join(t.run_dir, t.stop_file) if t.stop_file else ""
    if accelerator.is_main_process:
        os.makedirs(t.run_dir, exist_ok=True)
        if not lock.acquire(t.run_dir):  # before this job writes anything there
            raise SetupError(f"trainer.run_dir={t.run_dir} is in use by another training process (two jobs on one "
                             f"run directory, or processes of a multi-machine launch that did not join one process "
                             f"group: see docs/SCALING.md)")
    run.open(resumed, expect)
    health = Health(accelerator.device)

    def save_ckpt():
        health.check(t.run_dir)  # never write a checkpoint of non-finite weights
        ckpt.save(accelerator, t.run_dir, state, expect, t.ckpt_keep, t.keep_epochs)

    preempted = False
    while state.step < last_step and not preempted:
        loader.set_epoch(state.epoch)
        if state.batches_done == 0:
            run.epoch_start(parts.method.on_epoch_start(state.epoch, parts.services))
        batches = _skip(loader, state)
        while state.step < last_step:
            with parts.timer("data"):  # time spent waiting for the loader
                batch = next(batches, None)
            if batch is None:
                break
            sc = {k: v[state.step] for k, v in sched.items()}
            set_lr_wd(parts.optimizer, float(sc["lr"]), float(sc["wd"]))
            logs = train_step(parts, batch, sc, state.step)
            health.update(logs, state.step)
            state.step += 1
            state.batches_done += 1
            run.step_done(batch, logs, sc, health)
            if state.step % t.log_every == 0 and stop.agreed():  # one all-reduce, at log steps only
                preempted = True
                break
            if t.ckpt_every and state.step % t.ckpt_every == 0 and state.step < last_step:
                save_ckpt()
        if preempted:
            save_ckpt()
            stop.report(state.step, accelerator.is_main_process)
            break
        if state.batches_done >= len(loader):  # epoch finished (not cut short by max_steps)
            state.epoch, state.batches_done = state.epoch + 1, 0
            run.epoch_end()
        save_ckpt()
    return run.close(preempted)


def main(argv=None) -> int:
    code = _main(argv)
    if dist.launched_world_size() > 1:  # one of several launched ranks: end without the C++ teardown
        dist.exit_now(code)
    return code


def _main(argv=None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides) + ([f"trainer.resume={args.resume}"] if args.resume else [])
    try:
        cfg = load_config(args.config, overrides)
        result = train(cfg)
    except (ConfigError, SetupError) as e:
        if os.environ.get("FASTCL_DEBUG"):
            raise
        print(f"fastcl: error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"fastcl: error: {e}", file=sys.stderr)
        return 3
    if dist.launched_rank() == 0:  # the group may be gone already (end_training): ask the launcher's RANK
        print(json.dumps(result))
    dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
