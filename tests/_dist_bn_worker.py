"""2-process gloo worker for tests/test_models.py::test_global_bn_two_processes.

    torchrun --standalone --nproc_per_node 2 tests/_dist_bn_worker.py IN.pt OUT_PREFIX

Reads the cases from IN.pt (written by the test), runs this rank's shard of each through
convert_sync_bn'd modules, and saves outputs / gradients / buffers to OUT_PREFIX.<rank>.pt.
All comparisons live in the test; this script only computes.
"""
import sys

import torch
import torch.distributed as dist

from fastcl.models import build_encoder, convert_sync_bn


def run_case(module, xs, gs, sl, ddp=False):
    """Train-mode steps on this rank's slice; returns outputs, input grads, param grads, buffers.

    ddp=True wraps the converted module in DistributedDataParallel as the trainer does (its gradient
    all-reduces interleave with the BN ones in backward; parameter gradients come back averaged).
    """
    module = convert_sync_bn(module)
    out = {"types": sorted({type(m).__name__ for m in module.modules() if "Norm" in type(m).__name__}),
           "keys": sorted(module.state_dict()), "y": [], "dx": []}
    inner = module
    if ddp:
        module = torch.nn.parallel.DistributedDataParallel(module)
    for x, g in zip(xs, gs):
        x = x[sl[0]:sl[1]].clone().requires_grad_()
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last).detach().requires_grad_()
        y = module(x)
        (y * g[sl[0]:sl[1]]).sum().backward()
        out["y"].append(y.detach().contiguous())
        out["dx"].append(x.grad.contiguous())
    out["grads"] = {n: p.grad.clone() for n, p in inner.named_parameters()}
    out["buffers"] = {n: b.clone() for n, b in inner.named_buffers()}
    inner.eval()
    with torch.no_grad():
        out["y_eval"] = inner(xs[0]).contiguous()
    return out


def main(in_path: str, out_prefix: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cases = torch.load(in_path, weights_only=False)
    result = {}
    for name, case in cases.items():
        if "model_cfg" in case:
            module = build_encoder(case["model_cfg"])
        else:
            module = case["module"]
        module.load_state_dict(case["state"])
        module.train()
        result[name] = run_case(module, case["xs"], case["gs"], case["split"][rank], case.get("ddp", False))
    torch.save(result, f"{out_prefix}.{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
