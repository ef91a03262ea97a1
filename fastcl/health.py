"""Run health around the loop: non-finite loss/gradient bookkeeping, stop requests (signals, a stop file), peak
memory. Each is one object the loop calls once per step or per log step (fastcl/train.py)."""
from __future__ import annotations

import os
import signal

import torch

from fastcl import dist


class Health:
    """Non-finite loss/gradient bookkeeping without a per-step host sync.

    Flags accumulate on the device and are checked when the trainer logs or checkpoints; the first bad step
    and the tensor (loss or gradient) are reported. With trainer.skip_nonfinite the step itself skips bad
    updates (one sync per step) and they are only counted here.
    """

    def __init__(self, device):
        self.bad_loss = torch.zeros((), dtype=torch.bool, device=device)
        self.bad_grad = torch.zeros((), dtype=torch.bool, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.skipped_t = torch.zeros((), device=device)

    def update(self, logs: dict, step: int) -> None:
        kept = logs["skipped"] == 0  # a skipped step changed nothing: it never stops the run
        self.skipped_t += logs["skipped"]
        nl, ng = logs["nonfinite_loss"] & kept, logs["nonfinite_grad"] & kept
        self.first_bad = torch.where((nl | ng) & (self.first_bad < 0), torch.full_like(self.first_bad, step + 1),
                                     self.first_bad)
        self.bad_loss |= nl
        self.bad_grad |= ng

    @property
    def skipped(self) -> int:
        return int(self.skipped_t)  # host sync (log steps)

    def check(self, run_dir: str) -> None:
        if bool(self.bad_loss | self.bad_grad):  # host sync (log / checkpoint steps)
            which = "loss" if bool(self.bad_loss) else "gradient"
            raise FloatingPointError(
                f"non-finite {which} at step {int(self.first_bad)}: stopping; the last good checkpoint is in "
                f"{run_dir}/checkpoints (resume with --resume auto, lower optim.lr or set trainer.skip_nonfinite=true)")


class StopRequest:
    """SIGTERM / SIGUSR1 (SLURM sends one before the time limit or on preemption) -> checkpoint and exit.

    The handler only sets a flag; ranks agree on it at the next log step (one all-reduce there), write a
    checkpoint together and leave the loop, so `--resume auto` continues the run after a requeue.
    """

    def __init__(self):
        self.flag = False
        self.stop_file = ""  # set by _train: also stops the run when it appears (rank 0 checks at log steps)
        self.by_file = False
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. a notebook executor): no handler
                pass

    def restore(self) -> None:
        """Give the signals back: a process that called train() in-process must stay killable by SIGTERM."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def consume_file(self) -> None:
        """After the stop checkpoint: remove the stop file this run obeyed, so the resumed run goes on."""
        if self.by_file:
            try:
                os.remove(self.stop_file)
            except FileNotFoundError:
                pass

    def report(self, step: int, is_main: bool) -> None:
        """After the stop checkpoint (rank 0): say why the run stopped, and remove the stop file it obeyed."""
        if is_main:
            why = f"stop file {self.stop_file} (removed)" if self.by_file else "signal"
            self.consume_file()
            print(f"stop requested ({why}): checkpoint written at step {step}; continue with --resume auto")

    def _handler(self, signum, frame):
        self.flag = True

    def agreed(self) -> bool:
        if self.stop_file and not self.flag and dist.rank() == 0 and os.path.exists(self.stop_file):
            self.flag = self.by_file = True
        f = torch.tensor([1.0 if self.flag else 0.0])
        if dist.is_dist():
            if dist.torch_dist_backend_needs_cuda():
                f = f.cuda()
            torch.distributed.all_reduce(f, op=torch.distributed.ReduceOp.MAX)
        return bool(f.item() > 0)


def memory_use(device: torch.device) -> dict:
    """Peak memory so far, GiB: `gpu_mem_gb` (torch allocator peak) on CUDA, `host_rss_gb` (this process's peak
    resident set) always; logged with every train record so a memory budget can be read off metrics.jsonl."""
    import resource
    out = {"host_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}  # Linux: KiB
    if device.type == "cuda":
        out["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return out
