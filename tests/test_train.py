"""End-to-end trainer tests on the tiny config: outputs, exact resume, bad input, script entry, 2 processes."""
import json
import os
import subprocess
import sys

import pytest
import torch

from fastcl.checkpoint import object_path
from fastcl.config import load_config
from fastcl.train import main, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs/test/tiny.yaml")
PY = sys.executable
BIN = os.path.dirname(PY)


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _free_port() -> int:
    """A TCP port nobody listens on now (the rendezvous of a multi-machine launch)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in _metrics(run_dir) if "loss" in r}


def test_tiny_trains_and_writes_outputs(tmp_path):
    run = str(tmp_path / "run")
    result = train(load_config(TINY, [f"trainer.run_dir={run}"]))
    recs = [r for r in _metrics(run) if "loss" in r]
    assert len(recs) == 8 and result["steps"] == 8  # 64 samples / batch 16 x 2 epochs
    for r in recs:
        assert {"step", "epoch", "loss", "lr", "img_per_s"} <= set(r) and r["img_per_s"] > 0
        # step 1: the queue is still empty and MoCo masks the other batch keys -> only the positive, loss 0
        assert (r["loss"] == 0.0) if r["step"] == 1 else (0 < r["loss"] < 20)
    assert os.path.isfile(os.path.join(run, "config.yaml"))
    assert load_config(os.path.join(run, "config.yaml")).trainer.run_dir == run
    ckpts = sorted(os.listdir(os.path.join(run, "checkpoints")))
    assert ckpts == ["step_00000004", "step_00000008"]
    assert os.listdir(os.path.join(run, "tb"))  # TensorBoard events via accelerate's tracker


@pytest.mark.parametrize("method", ["mocov2", "simclr"])
def test_resume_continues_the_same_trajectory(tmp_path, method):
    over = [f"method.name={method}", "trainer.ckpt_every=3"] + (["method.queue_size=0"] if method == "simclr" else [])
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    train(load_config(TINY, over + [f"trainer.run_dir={full}"]))
    train(load_config(TINY, over + [f"trainer.run_dir={part}", "trainer.max_steps=3"]))  # stops mid-epoch 0
    train(load_config(TINY, over + [f"trainer.run_dir={part}", "trainer.resume=auto"]))
    a, b = _losses(full), _losses(part)
    assert sorted(b) == list(range(1, 9))
    for s in range(4, 9):
        assert abs(a[s] - b[s]) < 1e-6, (s, a[s], b[s])
    # the method state (queue keys + ids) ends identical
    qa = torch.load(object_path(os.path.join(full, "checkpoints/step_00000008"), "method"), weights_only=True)
    qb = torch.load(object_path(os.path.join(part, "checkpoints/step_00000008"), "method"), weights_only=True)
    assert qa.keys() == qb.keys() and all(torch.allclose(qa[k].float(), qb[k].float(), atol=1e-6) for k in qa
                                          if torch.is_tensor(qa[k]))


def test_existing_run_dir_without_resume_is_refused(tmp_path, capsys):
    run = str(tmp_path / "run")
    train(load_config(TINY, [f"trainer.run_dir={run}", "trainer.max_steps=2"]))
    before = sorted(os.listdir(run))
    assert main(["--config", TINY, f"trainer.run_dir={run}"]) == 2
    assert "--resume auto" in capsys.readouterr().err
    assert sorted(os.listdir(run)) == before


@pytest.mark.parametrize("over,needle", [
    (["data.backend=torch", "data.path=/nonexistent/images"], "/nonexistent/images"),
    (["method.queue_size=1000"], "method.queue_size"),
    (["method.name=byol"], "method.name"),
    (["model.arch=vit_b"], "model.arch"),
    (["data.num_samples=8"], "no full global batch"),
])
def test_bad_input_fails_before_training_with_one_line(tmp_path, capsys, over, needle):
    run = tmp_path / "run"
    assert main(["--config", TINY, f"trainer.run_dir={run}"] + over) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()


def test_empty_image_folder_is_reported(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["--config", TINY, f"trainer.run_dir={tmp_path / 'run'}", "data.backend=torch",
                 f"data.path={tmp_path / 'empty'}"]) == 2
    assert str(tmp_path / "empty") in capsys.readouterr().err


def test_script_entry_point_runs(tmp_path):
    """`python fastcl/train.py ...` works (fastcl/ first on sys.path must not break imports)."""
    r = subprocess.run([PY, os.path.join(REPO, "fastcl/train.py"), "--config", TINY,
                        f"trainer.run_dir={tmp_path / 'run'}", "trainer.max_steps=2"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["steps"] == 2


def _torchrun(nproc, args, timeout=300):
    cmd = [os.path.join(BIN, "torchrun"), "--standalone", f"--nproc_per_node={nproc}"] + args
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mocov2", "simclr"])
def test_two_processes_match_one_process(tmp_path, method):
    """gloo, 2 CPU processes: ids cover the dataset once per epoch, queues agree across ranks, and the
    loss equals a 1-process run over the same global batches (global BN makes BN statistics agree)."""
    # lr 0.002: the tiny net at lr 0.05 is chaotic (a 1e-7 weight perturbation moves the loss by 1e-2 within
    # 4 steps even on one process), which would hide the comparison in noise.
    over = [f"method.name={method}", "data.num_samples=48", "optim.lr=0.002"] + (
        ["method.queue_size=0"] if method == "simclr" else [])
    worker = os.path.join(REPO, "tests/_dist_train_worker.py")
    for n in (1, 2):
        os.makedirs(tmp_path / f"w{n}")
        _torchrun(n, [worker, TINY, str(tmp_path / f"w{n}")] + over + [f"trainer.run_dir={tmp_path / f'r{n}'}"])
    one = torch.load(tmp_path / "w1/rank0.pt", weights_only=False)
    r0, r1 = (torch.load(tmp_path / f"w2/rank{r}.pt", weights_only=False) for r in (0, 1))
    for epoch, ids in r0["ids"].items():
        assert sorted(ids) == list(range(48)), epoch  # each sample once per epoch across ranks
        assert ids == one["ids"][epoch]  # the same global batches as the 1-process run
    # Equal up to float reduction order (BN all-reduce, DDP gradient averaging); a logic error shows as >1e-2.
    assert r0["losses"] == pytest.approx(one["losses"], abs=2e-5)
    if method == "mocov2":
        assert torch.equal(r0["queue_ids"], r1["queue_ids"]) and torch.allclose(r0["queue_keys"], r1["queue_keys"])
        assert torch.allclose(r0["queue_keys"], one["queue_keys"], atol=1e-4)


@pytest.mark.slow
def test_accelerate_launch_two_processes(tmp_path):
    """The documented multi-process command: accelerate launch --multi_gpu --num_processes 2 on CPU (gloo)."""
    cmd = [os.path.join(BIN, "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", os.path.join(REPO, "fastcl/train.py"),
           "--config", TINY, f"trainer.run_dir={tmp_path / 'run'}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-4000:]
    assert len(_losses(str(tmp_path / "run"))) == 8
    printed = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 1 and printed[0]["world_size"] == 2  # the result JSON once (rank 0), not per rank


@pytest.mark.slow
def test_multinode_launch_as_two_nodes_on_localhost(tmp_path):
    """docs/SCALING.md's N-node command, N = 2 "nodes" of one CPU process each on this machine (the same
    configs/accelerate/multinode.yaml, --machine_rank 0/1, rendezvous at 127.0.0.1 as at node 0's host name):
    both ranks join one gloo group (world size 2) and train the loss of a 1-process run over the same global
    batches."""
    port = _free_port()
    over = ["optim.lr=0.002", "data.num_samples=48"]
    run = tmp_path / "run"
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         os.path.join(REPO, "configs/accelerate/multinode.yaml"), "--num_machines", "2",
         "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
         "--main_process_port", str(port), os.path.join(REPO, "fastcl/train.py"), "--config", TINY,
         f"trainer.run_dir={run}", *over], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"}) for rank in (0, 1)]
    outs = [p.communicate(timeout=300) for p in nodes]
    for p, (_, err) in zip(nodes, outs):
        assert p.returncode == 0, err[-4000:]
    assert json.load(open(run / "result.json"))["world_size"] == 2
    train(load_config(TINY, over + [f"trainer.run_dir={tmp_path / 'one'}"]))
    one, two = _losses(str(tmp_path / "one")), _losses(str(run))
    assert len(one) == len(two) == 6 and two == pytest.approx(one, abs=2e-5)


def test_run_dir_in_use_by_another_job_is_refused(tmp_path, capsys):
    """A second job on a run directory that a live job holds: one error line, exit 2, nothing written; once the
    holder is SIGKILLed the kernel drops its lock and the directory is usable again."""
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(run)!r}, os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('locked', flush=True); time.sleep(300)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(["--config", TINY, f"trainer.run_dir={run}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"trainer.run_dir={run} is in use by another training process" in err[0]
        assert os.listdir(run) == []
    finally:
        holder.kill()
        holder.wait()
    assert main(["--config", TINY, f"trainer.run_dir={run}"]) == 0


def _nan_on_step(monkeypatch, bad_steps):
    """Make the loss NaN on the given (0-based) steps by poisoning the step's soft cross-entropy."""
    import fastcl.step as step_mod
    orig, calls = step_mod.soft_cross_entropy, {"n": 0}

    def poisoned(logits, target, valid=None):
        out = orig(logits, target, valid)
        calls["n"] += 1
        return out * float("nan") if calls["n"] - 1 in bad_steps else out

    monkeypatch.setattr(step_mod, "soft_cross_entropy", poisoned)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    _nan_on_step(monkeypatch, {5})  # step 6 (1-based) goes bad; checkpoints every 2 steps, log every 4
    code = main(["--config", TINY, f"trainer.run_dir={run}", "trainer.ckpt_every=2", "trainer.log_every=4"])
    err = capsys.readouterr().err
    assert code == 3 and "non-finite loss at step 6" in err and len(err.strip().splitlines()) == 1
    # the checkpoint at step 6 would hold NaN weights: it is refused, step 4 is the last one written
    assert sorted(os.listdir(run / "checkpoints")) == ["step_00000002", "step_00000004"]


def test_skip_nonfinite_skips_and_counts(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _nan_on_step(monkeypatch, {2})
    result = train(load_config(TINY, [f"trainer.run_dir={run}", "trainer.skip_nonfinite=true"]))
    assert result["steps"] == 8 and result["final_loss"] == result["final_loss"]  # finished, finite
    assert _metrics(str(run))[-1]["skipped_steps"] == 1


def test_damaged_newest_checkpoint_falls_back(tmp_path):
    run = str(tmp_path / "run")
    train(load_config(TINY, [f"trainer.run_dir={run}", "trainer.ckpt_every=2", "trainer.max_steps=6"]))
    with open(os.path.join(run, "checkpoints/step_00000006/model.safetensors"), "wb") as f:
        f.write(b"garbage")
    with pytest.warns(UserWarning, match="step_00000006"):
        result = train(load_config(TINY, [f"trainer.run_dir={run}", "trainer.resume=auto"]))
    assert result["steps"] == 8
    assert _losses(run)[8] == pytest.approx(_losses_of_fresh(tmp_path)[8], abs=1e-6)


def _losses_of_fresh(tmp_path):
    run = str(tmp_path / "fresh")
    train(load_config(TINY, [f"trainer.run_dir={run}"]))
    return _losses(run)


class _Payload:
    """Unpickling this runs code (creates a file): what a tampered checkpoint could carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_tampered_checkpoint_state_is_never_unpickled(tmp_path):
    """A newest checkpoint whose queue/miner state file carries code: refused by the restricted unpickler before
    accelerate's full one sees it (no code runs), and the run resumes from the previous checkpoint."""
    run = str(tmp_path / "run")
    train(load_config(TINY, [f"trainer.run_dir={run}", "trainer.ckpt_every=2", "trainer.max_steps=6"]))
    marker = tmp_path / "code_ran"
    with open(object_path(os.path.join(run, "checkpoints/step_00000006"), "method"), "wb") as f:
        torch.save({"queue.keys": _Payload(str(marker))}, f)
    with pytest.warns(UserWarning, match="step_00000006.*resumed from .*step_00000004"):
        result = train(load_config(TINY, [f"trainer.run_dir={run}", "trainer.resume=auto"]))
    assert not marker.exists() and result["steps"] == 8


def test_sigterm_checkpoints_and_resume_continues(tmp_path):
    """A preempted run (SIGTERM, as SLURM sends) writes a checkpoint and exits 0; --resume auto finishes it
    with the same losses as an uninterrupted run."""
    import signal
    import time
    run = tmp_path / "run"
    # lr 0.002 and one thread in both processes: the tiny net at lr 0.05 amplifies thread-count rounding noise
    slow = ["trainer.epochs=6", "data.num_samples=256", "trainer.log_every=1", "optim.lr=0.002"]
    p = subprocess.Popen([PY, os.path.join(REPO, "fastcl/train.py"), "--config", TINY, f"trainer.run_dir={run}"] + slow,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-2000:]
    assert "stop requested" in out and json.loads(out.strip().splitlines()[-1]).get("preempted") is True
    stopped_at = json.loads(out.strip().splitlines()[-1])["steps"]
    assert 0 < stopped_at < 96 and os.path.isdir(run / f"checkpoints/step_{stopped_at:08d}")
    train(load_config(TINY, [f"trainer.run_dir={run}", "trainer.resume=auto"] + slow))
    full = tmp_path / "full"
    train(load_config(TINY, [f"trainer.run_dir={full}"] + slow))
    a, b = _losses(str(full)), _losses(str(run))
    assert all(abs(a[s] - b[s]) < 1e-6 for s in range(stopped_at + 1, 97))


def test_stop_file_checkpoints_is_removed_and_resume_continues(tmp_path, capsys):
    """<run_dir>/STOP (what configs/slurm/pretrain.sbatch touches before the time limit) stops the run at the
    next log step like SIGUSR1: checkpoint, exit 0, the file removed; --resume auto finishes the trajectory."""
    run = tmp_path / "run"
    over = ["trainer.log_every=3", "optim.lr=0.002"]
    run.mkdir()
    (run / "STOP").touch()
    assert main(["--config", TINY, f"trainer.run_dir={run}", *over]) == 0
    out = capsys.readouterr().out
    assert f"stop requested (stop file {run / 'STOP'} (removed))" in out
    assert json.loads(out.strip().splitlines()[-1])["steps"] == 3 and not (run / "STOP").exists()
    assert os.listdir(run / "checkpoints") == ["step_00000003"]
    assert main(["--config", TINY, f"trainer.run_dir={run}", "--resume", "auto", *over]) == 0
    full = tmp_path / "full"
    train(load_config(TINY, [f"trainer.run_dir={full}", *over]))
    assert _losses(str(run)) == pytest.approx(_losses(str(full)), abs=1e-6)


@pytest.mark.slow
def test_stop_file_stops_every_rank(tmp_path):
    """2 processes: rank 0 sees the file, all ranks agree at the log step, checkpoint together and exit 0."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "STOP").touch()
    cmd = [os.path.join(BIN, "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", os.path.join(REPO, "fastcl/train.py"),
           "--config", TINY, f"trainer.run_dir={run}", "trainer.log_every=2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-4000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["steps"] == 2 and not (run / "STOP").exists()
    assert os.listdir(run / "checkpoints") == ["step_00000002"]


@pytest.mark.slow
def test_slurm_script_stops_requeues_and_resumes(tmp_path):
    """configs/slurm/pretrain.sbatch under stand-in `srun` / `scontrol` (no SLURM here): SIGUSR1 to the batch
    shell (what `--signal=B:USR1@300` sends) makes both ranks checkpoint and exit, the job asks for its requeue
    and exits 0; the requeued job (the script again) resumes and finishes the same trajectory."""
    import signal
    import time
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text('#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nexec "$@"\n')
    (fake / "scontrol").write_text('#!/bin/bash\nif [[ $1 == show ]]; then echo 127.0.0.1; '
                                   'else echo "$@" >> "$SCONTROL_LOG"; fi\n')
    for f in fake.iterdir():
        f.chmod(0o755)
    port = _free_port()
    run = tmp_path / "run"
    extra = "trainer.epochs=6 data.num_samples=128 trainer.log_every=1 optim.lr=0.002"
    env = {**os.environ, "PATH": f"{fake}:{BIN}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "SCONTROL_LOG": str(tmp_path / "scontrol.log"), "SLURM_JOB_ID": "42", "SLURM_JOB_NAME": "fastcl",
           "SLURM_JOB_NODELIST": "node0", "SLURM_NNODES": "1", "SLURM_NODEID": "0", "GPUS_PER_NODE": "2",
           "CONFIG": TINY, "RUN_DIR": str(run), "PORT": str(port), "EXTRA_ARGS": extra}
    script = os.path.join(REPO, "configs/slurm/pretrain.sbatch")
    job = subprocess.Popen(["bash", script], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    metrics, deadline = run / "metrics.jsonl", time.time() + 180
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 4):
        time.sleep(0.2)
    job.send_signal(signal.SIGUSR1)
    out, _ = job.communicate(timeout=180)
    assert job.returncode == 0, out[-4000:]
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "42"]
    assert not (run / "STOP").exists()
    stopped = sorted(os.listdir(run / "checkpoints"))
    assert stopped and int(stopped[-1][5:]) < 48, out[-4000:]  # stopped before the end (6 epochs x 8 steps)
    again = subprocess.run(["bash", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert json.load(open(run / "result.json"))["steps"] == 48
    # the same job never interrupted: the 2-process trajectory is reproducible, so compare to 1e-6
    full = subprocess.run(["bash", script], cwd=REPO, env={**env, "RUN_DIR": str(tmp_path / "full")},
                          capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
    assert _losses(str(run)) == pytest.approx(_losses(str(tmp_path / "full")), abs=1e-6)


@pytest.mark.slow
def test_compile_flag_keeps_checkpoint_names(tmp_path):
    """trainer.compile=true trains, and its checkpoint loads into the plain encoder (same state-dict names)."""
    from fastcl.checkpoint import load_encoder
    run = str(tmp_path / "run")
    assert train(load_config(TINY, [f"trainer.run_dir={run}", "trainer.compile=true", "trainer.max_steps=2"]))["steps"] == 2
    enc, cfg = load_encoder(run)
    assert cfg.trainer.compile is True and enc.backbone.feat_dim > 0


def test_train_restores_signal_handlers(tmp_path):
    import signal
    before = signal.getsignal(signal.SIGTERM)
    train(load_config(TINY, [f"trainer.run_dir={tmp_path / 'run'}", "trainer.max_steps=1"]))
    assert signal.getsignal(signal.SIGTERM) is before


def test_trains_without_tensorboard(tmp_path, monkeypatch):
    """A node without TensorBoard still trains (warning; metrics.jsonl as always, no tb/ events)."""
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("tensorboard") else real(name, *a))
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match="TensorBoard is not installed"):
        result = train(load_config(TINY, [f"trainer.run_dir={run}"]))
    assert result["steps"] == 8 and len(_losses(str(run))) == 8
    assert not (run / "tb").exists() or not any(p.is_file() for p in (run / "tb").rglob("*"))
