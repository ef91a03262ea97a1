"""Run `fastcl/train.py` and SIGKILL it in the middle of writing its Nth checkpoint.

usage: python tests/_kill_worker.py N [train.py arguments ...]

Every file of a checkpoint is written into `checkpoints/.tmp-step_<8-digit step>/` and the directory is renamed only
when complete (fastcl/checkpoint.py). This worker wraps `torch.save` (accelerate writes the optimizer, RNG and
custom states with it): in the Nth distinct `.tmp-` directory, the first custom-state file (the queue, sample
table and miner state) gets HALF of its bytes, then the process kills itself with SIGKILL. The model weights,
optimizer and RNG files are complete on disk by then, so the torn directory looks like a checkpoint that only
lacks its last files: exactly what a preemption in the middle of a write leaves behind.
"""
import io
import os
import signal
import sys

import torch

KILL_AT = int(sys.argv[1])
_seen: list[str] = []
_real_save = torch.save


def _save(obj, f, *args, **kwargs):
    path = os.fspath(f) if isinstance(f, (str, os.PathLike)) else ""
    folder = os.path.basename(os.path.dirname(path))
    if folder.startswith(".tmp-step_"):
        if folder not in _seen:
            _seen.append(folder)
        if len(_seen) == KILL_AT and "custom_checkpoint" in os.path.basename(path):
            buf = io.BytesIO()
            _real_save(obj, buf, *args, **kwargs)
            with open(path, "wb") as out:
                out.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                out.flush()
                os.fsync(out.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
    return _real_save(obj, f, *args, **kwargs)


torch.save = _save

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from fastcl.train import main

    sys.exit(main(sys.argv[2:]))
