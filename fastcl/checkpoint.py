"""Atomic, rotating checkpoints on top of accelerate's save_state / load_state.

Layout: <run_dir>/checkpoints/step_00001234/ holding accelerate's files (model, optimizer, RNG states, and
every object registered with `register_for_checkpointing`: train state, method state (queue, table, miner),
EMA teacher) plus `fastcl_meta.json`, written last. A checkpoint is written under a `.tmp-` name and renamed
when complete, so a crash mid-write never leaves a directory that looks finished.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import warnings

CKPT_DIR = "checkpoints"
META = "fastcl_meta.json"


class TrainState:
    """Loop position: the next step to run, its epoch, and how many batches of that epoch are done."""

    def __init__(self):
        self.step = 0
        self.epoch = 0
        self.batches_done = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, d: dict) -> None:
        self.step, self.epoch, self.batches_done = int(d["step"]), int(d["epoch"]), int(d["batches_done"])


class RunDirLock:
    """One training job per run directory: an exclusive flock on the directory itself, held by rank 0.

    Two jobs writing one run directory (a requeued SLURM job overlapping the old one, or a multi-machine launch
    whose processes did not join one process group, so every one of them is "rank 0") would interleave
    checkpoints and metrics. flock is released by the kernel when the holder dies (SIGKILL included), so a killed
    run never leaves a stale lock behind, and locking a directory writes nothing into it. On filesystems without
    flock support (some Lustre mounts) the lock is skipped with a warning.
    """

    def __init__(self):
        self.fd: int | None = None

    def acquire(self, run_dir: str) -> bool:
        """Lock `run_dir` (which must exist); False when another process holds it."""
        fd = os.open(run_dir, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError as e:  # no flock on this filesystem: run unguarded rather than not at all
            os.close(fd)
            warnings.warn(f"cannot lock trainer.run_dir={run_dir} ({e}); make sure only one job uses it")
            return True
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


def list_checkpoints(run_dir: str) -> list[str]:
    """Completed checkpoint directories, newest first."""
    root = os.path.join(run_dir, CKPT_DIR)
    if not os.path.isdir(root):
        return []
    names = sorted((n for n in os.listdir(root) if n.startswith("step_")), reverse=True)
    return [os.path.join(root, n) for n in names if os.path.isfile(os.path.join(root, n, META))]


def read_meta(path: str) -> dict:
    with open(os.path.join(path, META)) as f:
        return json.load(f)


def save(accelerator, run_dir: str, state: TrainState, meta: dict, keep: int, pinned=()) -> str:
    """Write a checkpoint of the current state (all ranks call this); returns its final path. The newest `keep`
    are kept, and the checkpoints written at the end of an epoch in `pinned` (trainer.keep_epochs) always."""
    root = os.path.join(run_dir, CKPT_DIR)
    final = os.path.join(root, f"step_{state.step:08d}")
    tmp = os.path.join(root, f".tmp-step_{state.step:08d}")
    if accelerator.is_main_process:
        os.makedirs(root, exist_ok=True)
        for stale in (n for n in os.listdir(root) if n.startswith(".tmp-")):  # writes cut short by a kill
            shutil.rmtree(os.path.join(root, stale), ignore_errors=True)
        os.makedirs(tmp, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(tmp, META), "w") as f:
            json.dump({**meta, **state.state_dict()}, f, indent=2)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[keep:]:
            if not _pinned(old, pinned):
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _pinned(path: str, epochs) -> bool:
    """Whether the checkpoint at `path` was written at the end of one of `epochs` (read from its meta)."""
    if not epochs:
        return False
    try:
        with open(os.path.join(path, META)) as f:
            m = json.load(f)
    except (OSError, ValueError):
        return False
    return m.get("batches_done") == 0 and m.get("epoch") in set(int(e) for e in epochs)


def check_compatible(meta: dict, expect: dict, path: str) -> None:
    """Refuse a checkpoint written by another method / architecture (it would load silently wrong)."""
    for key in ("method", "arch", "proj_dim", "width", "cifar_stem"):
        if key in meta and key in expect and meta[key] != expect[key]:
            raise ValueError(f"checkpoint {path} was written with {key}={meta[key]!r} but this run has "
                             f"{key}={expect[key]!r}; resume it with the same config or start a new run_dir")


def resolve_resume(run_dir: str, resume: str) -> list[str]:
    """Candidate checkpoints to try, in order: trainer.resume = "" (none), "auto" (newest first), or a path."""
    if not resume:
        return []
    if resume == "auto":
        return list_checkpoints(run_dir)
    if not os.path.isfile(os.path.join(resume, META)):
        raise FileNotFoundError(f"trainer.resume: {resume} is not a complete fastcl checkpoint (no {META})")
    return [resume]


def load_first_good(accelerator, candidates: list[str], expect: dict) -> str | None:
    """Load the newest checkpoint that loads; a damaged one is skipped with a warning. Returns its path.

    Raises ValueError (one line) when none loads, naming the newest one and why; an incompatible checkpoint
    (another method / architecture) raises at once (check_compatible)."""
    failed = []
    for path in candidates:
        # bad-input fix (test_bad_input): an unreadable fastcl_meta.json is a damaged checkpoint like any other
        # file, not a JSONDecodeError traceback
        try:
            meta = read_meta(path)
        except (OSError, ValueError) as e:
            failed.append((path, f"{META}: {_first_line(e)}"))
            continue
        check_compatible(meta, expect, path)
        if expect.get("files"):
            check_files(meta, expect["files"], path)
        try:
            _check_safe_pickles(path)
            accelerator.load_state(path)
        except Exception as e:  # noqa: BLE001 - any unreadable file means: fall back to the previous one
            failed.append((path, _first_line(e)))
            continue
        for bad, why in failed:  # bad-input fix: warn only when a fallback loaded; otherwise one error line below
            warnings.warn(f"checkpoint {bad} could not be loaded ({why}); resumed from {path}")
        return path
    if failed:
        bad, why = failed[0]
        raise ValueError(f"none of {len(failed)} checkpoints could be loaded; the newest, {bad}: {why}")
    return None


def _check_safe_pickles(path: str) -> None:
    """accelerate unpickles registered objects' states (custom_checkpoint_*.pkl) with weights_only=False, which
    runs any code a tampered file carries. fastcl's states are plain tensors/numbers/dicts, so each file must
    first load with the restricted unpickler; one that does not is treated as damaged."""
    import torch

    for name in sorted(n for n in os.listdir(path) if n.startswith("custom_checkpoint_")):
        torch.load(os.path.join(path, name), map_location="cpu", weights_only=True)


def _first_line(e: BaseException) -> str:
    """'Type: first line of the message' (torch.load's errors run over many lines)."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def find_checkpoint(path: str) -> str:
    """A checkpoint directory from either a checkpoint directory or a run directory (its newest one)."""
    if os.path.isfile(os.path.join(path, META)):
        return path
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"{path} is neither a fastcl checkpoint nor a run directory with checkpoints")
    return found[0]


def register(accelerator, objects: dict) -> dict[str, str]:
    """Register named objects for checkpointing; returns {name: file} as accelerate writes them, recorded in
    every checkpoint's fastcl_meta.json so that readers find the teacher or the method state by NAME."""
    files = {"student": "model.safetensors", "optimizer": "optimizer.bin"}
    for i, (name, obj) in enumerate(objects.items()):
        accelerator.register_for_checkpointing(obj)
        files[name] = f"custom_checkpoint_{i}.pkl"  # accelerate's name for the i-th registered object
    return files


def recorded_files(meta: dict, path: str) -> dict[str, str]:
    """{name: file} as the checkpoint at `path` recorded it in its fastcl_meta.json (`files`, see register()).
    Objects are found by these names only: a checkpoint that records none (written before the names were
    recorded) raises CheckpointReadError instead of being matched to files by position."""
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointReadError(f"{os.path.join(path, META)} records no object names ('files'), so which file holds "
                                  f"which object (student, optimizer, train_state, method, teacher) is unknown")
    return files


def check_files(meta: dict, files: dict[str, str], path: str) -> None:
    """Refuse to resume from `path` unless its meta records every object this run registers (`files`, from
    register()) under the same file: accelerate's load_state reads the i-th registered object from
    custom_checkpoint_i.pkl, so a name recorded under another file, or not recorded, would load the wrong state."""
    recorded = recorded_files(meta, path)
    missing = [name for name in files if name not in recorded]
    if missing:
        raise ValueError(f"checkpoint {path}: {META} records no file for {', '.join(map(repr, missing))} "
                         f"(recorded: {', '.join(sorted(recorded))}); this run registers {sorted(files)}")
    if recorded != files:
        raise ValueError(f"checkpoint {path} holds {recorded} but this run registers {files}")


def object_path(ckpt_dir: str, name: str) -> str:
    """The file holding object `name` (student, optimizer, train_state, method, teacher) in the checkpoint
    directory `ckpt_dir` (or a run directory's newest checkpoint), found by the name its fastcl_meta.json records;
    ValueError naming the object when it is not recorded."""
    return RunCheckpoint(ckpt_dir).file(name)


class RunCheckpoint:
    """One checkpoint of a run, opened for reading: its directory, meta, the run's resolved config and files by
    name. The one way eval, export, SePP mining and resume find what a run wrote."""

    def __init__(self, path: str):
        self.path = os.path.abspath(find_checkpoint(path))
        self.run_dir = os.path.dirname(os.path.dirname(self.path))
        try:
            self.meta = read_meta(self.path)
        except (OSError, ValueError) as e:
            raise CheckpointReadError(f"{os.path.join(self.path, META)}: {_first_line(e)}") from None
        self.files = recorded_files(self.meta, self.path)
        self._cfg = None

    @property
    def cfg(self):
        """The run's resolved config (<run_dir>/config.yaml), loaded on first use."""
        if self._cfg is None:
            from fastcl.config import load_config

            cfg_path = os.path.join(self.run_dir, "config.yaml")
            if not os.path.isfile(cfg_path):
                raise FileNotFoundError(f"{cfg_path} (the run's resolved config) is missing next to checkpoint "
                                        f"{self.path}")
            self._cfg = load_config(cfg_path)
        return self._cfg

    def has(self, name: str) -> bool:
        return name in self.files

    def file(self, name: str) -> str:
        """Path of object `name`'s file, by the name recorded in fastcl_meta.json (ValueError naming it if absent)."""
        if name not in self.files:
            what = "EMA teacher" if name == "teacher" else name
            raise ValueError(f"{self.path} has no {what}: its {META} records no file for {name!r} (recorded: "
                             f"{', '.join(sorted(self.files))}; method {self.meta.get('method', '?')!r})")
        return os.path.join(self.path, self.files[name])

    def encoder(self, which: str = "student"):
        """The student's (online) or the EMA teacher's encoder (backbone + projector), on CPU, in eval mode."""
        import torch
        from safetensors.torch import load_file

        from fastcl.models import build_encoder

        enc = build_encoder(self.cfg.model)
        path = self.file(which)
        # bad-input fix (tests/test_bad_input.py): a damaged file was a safetensors / unpickling traceback in the
        # export, eval and mining commands; now one line naming the file (they report ValueErrors that way)
        try:
            if which == "student":
                full = load_file(path)
                state = {k[len("encoder."):]: v for k, v in full.items() if k.startswith("encoder.")}
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
            enc.load_state_dict(state)
        except Exception as e:  # noqa: BLE001 - any unreadable or mismatched file
            raise CheckpointReadError(f"cannot load the {which} encoder from {path} ({_first_line(e)})") from None
        return enc.eval()


def open_run(path: str) -> RunCheckpoint:
    """Open a run directory (its newest checkpoint) or a checkpoint directory."""
    return RunCheckpoint(path)


def load_encoder(path: str, which: str = "student"):
    """(encoder, cfg) of a run or checkpoint directory, on CPU, in eval mode (see RunCheckpoint.encoder)."""
    if which not in ("student", "teacher"):
        raise ValueError(f"--which must be student or teacher, got {which!r}")
    run = open_run(path)
    return run.encoder(which), run.cfg


class CheckpointReadError(ValueError):
    """A checkpoint file that exists but cannot be read (damaged, truncated, or another architecture's)."""


# ------------------------------------------------------------------------------------------ warm start

def stage_init(src: str, objects: dict, files: dict[str, str], expect: dict, stage: str,
               keep_position: bool = True) -> dict:
    """Write into `stage` a checkpoint that THIS run's registered objects load with accelerate's own load_state,
    built from another run's checkpoint `src` (trainer.init_from: the study's warm and ladder protocols).

    Taken from `src`, by file NAME (open_run): student weights, optimizer state, RNG states, train position and
    the EMA teacher. The method state is this run's FRESH one (another method's state means nothing to it), except
    the queue: when both methods keep a queue of the same size its keys/ids/pointer are kept, so a continuing
    MoCo-v2 equals a resume and every method starts from the same negatives. objects / files: this run's
    registered objects and their files (register()); expect: this run's meta (architecture checked). Returns
    {"path", "step", "kept_queue"}. keep_position=False (trainer.init_position=reset): the train position stays this
    run's fresh one (step 0) and accelerate's RNG files are not taken, so the run draws from its own seed.
    """
    import torch

    run = open_run(src)
    check_compatible({k: v for k, v in run.meta.items() if k != "method"}, expect, run.path)
    if "teacher" in objects and not run.has("teacher"):
        raise ValueError(f"trainer.init_from={src}: this method keeps an EMA teacher but {run.path} has none "
                         f"(method {run.meta.get('method', '?')!r})")
    os.makedirs(stage, exist_ok=True)
    for name in os.listdir(run.path):  # accelerate's own files: model, optimizer, RNG states (+ sampler, scaler)
        if name.startswith("random_states") and not keep_position:
            continue
        if not name.startswith("custom_checkpoint_") and name != META:
            shutil.copyfile(os.path.join(run.path, name), os.path.join(stage, name))
    kept_queue = False
    for name, obj in objects.items():
        if name == "method":
            state = obj.state_dict()
            if run.has("method") and any(k.startswith("queue.") for k in state):
                old = torch.load(run.file("method"), map_location="cpu", weights_only=True)
                qkeys = [k for k in state if k.startswith("queue.")]
                if all(k in old and old[k].shape == state[k].shape for k in qkeys):
                    state.update({k: old[k] for k in qkeys})
                    kept_queue = True
            torch.save(state, os.path.join(stage, files[name]))
        elif name == "train_state" and not keep_position:
            torch.save(obj.state_dict(), os.path.join(stage, files[name]))
        else:  # train_state, teacher: copied as written
            shutil.copyfile(run.file(name), os.path.join(stage, files[name]))
    return {"path": run.path, "step": int(run.meta.get("step", 0)), "kept_queue": kept_queue}
