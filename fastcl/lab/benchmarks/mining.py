"""Mining-only benchmark: faiss vs torch spherical k-means and exact kNN on the same data, in one process.

    python -m fastcl.bench mining [--n 50000] [--dim 128] [--k 100] [--niter 20] [--knn-k 20] [--queries 10000]
                                  [--repeats 5] [--init random] [--threads 0] [--out docs/benchmarks]

Data: n unit vectors around k random centres (a stand-in for embeddings with cluster structure). Every engine
gets the identical call (same niter, same seed, so the same subsample and initial centroids); engines are run
round-robin inside each repeat so that load from other processes hits all of them alike. Reports medians over
`repeats` runs after `warmup` untimed runs, the speed ratio torch / faiss, and how well the engines' answers
agree (adjusted Rand index for k-means, identical-id share for kNN). Writes docs/benchmarks/mining.json
(mining-threads<T>.json with --threads T).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from fastcl.lab.benchmarks.common import sync, write_evidence
from fastcl.mining.engine import faiss_module, faiss_num_gpus
from fastcl.methods.ifnd import spherical_kmeans
from fastcl.mining.knn import knn_search


def engines() -> list[tuple[str, str, str]]:
    """(label, backend, device) pairs available here: faiss first (it is the numerator of no ratio: baseline)."""
    out = []
    if faiss_module() is not None:
        out.append(("faiss-cpu", "faiss-cpu", "cpu"))
        if faiss_num_gpus() > 0:
            out.append(("faiss-gpu", "faiss-gpu", "cpu"))
    out.append(("torch-cpu", "torch", "cpu"))
    if torch.cuda.is_available():
        out.append(("torch-cuda", "torch", "cuda"))
    return out


def timed_round_robin(fns: dict, repeats: int, warmup: int) -> dict:
    """{label: fn} -> {label: timing dict}; each repeat runs every fn once, in turn. Seconds per call."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "times_s": t, "repeats": repeats,
                   "warmup": warmup, "method": "time.perf_counter around the call, CUDA synchronized, round-robin"}
            for name, t in times.items()}


def ari(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index of two labelings (1 = identical up to a permutation of the ids)."""
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(np.asarray(a), np.asarray(b)))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "unknown")
    except OSError:
        return "unknown"


def make_data(n: int, dim: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(k, dim, generator=g), dim=1)
    lab = torch.randint(k, (n,), generator=g)
    return F.normalize(centres[lab] * 1.5 + torch.randn(n, dim, generator=g) / dim ** 0.5, dim=1)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m fastcl.bench mining", description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=50000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--k", type=int, default=100, help="k-means clusters")
    p.add_argument("--niter", type=int, default=20)
    p.add_argument("--init", default="random", choices=["random", "kmeans++"])
    p.add_argument("--knn-k", type=int, default=20, help="neighbours per query")
    p.add_argument("--queries", type=int, default=10000, help="kNN queries (the first rows, searched against all n)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0,
                   help="torch and faiss (OpenMP) threads; 0 keeps the libraries' defaults (all cores). On a shared "
                        "machine 1 avoids OpenMP threads spinning while their partner is descheduled")
    p.add_argument("--out", default="docs/benchmarks")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
        if faiss_module() is not None:
            faiss_module().omp_set_num_threads(args.threads)

    x = make_data(args.n, args.dim, args.k, args.seed)
    xs = {dev: x.to(dev) for dev in {"cpu"} | ({"cuda"} if torch.cuda.is_available() else set())}
    q_ids = torch.arange(min(args.queries, args.n))
    load_before = os.getloadavg()
    results = {"kmeans": {}, "knn": {}}
    answers = {"kmeans": {}, "knn": {}}

    def km(backend, dev, label):
        def fn():
            answers["kmeans"][label] = spherical_kmeans(xs[dev], args.k, niter=args.niter, seed=args.seed,
                                                        backend=backend, init=args.init).assign.cpu().numpy()
        return fn

    def nn(backend, dev, label):
        def fn():
            q = xs[dev][q_ids.to(dev)]
            answers["knn"][label] = knn_search(q, xs[dev], args.knn_k, backend=backend,
                                               exclude_self_ids=q_ids.to(dev))[1].cpu()
        return fn

    eng = engines()
    results["kmeans"] = timed_round_robin({lab: km(b, d, lab) for lab, b, d in eng}, args.repeats, args.warmup)
    results["knn"] = timed_round_robin({lab: nn(b, d, lab) for lab, b, d in eng}, args.repeats, args.warmup)
    load_after = os.getloadavg()

    base = "faiss-cpu" if "faiss-cpu" in results["kmeans"] else "torch-cpu"
    for task in ("kmeans", "knn"):
        ref_t = results[task][base]["median_s"]
        for lab in results[task]:
            r = results[task][lab]
            r["speedup_of_faiss_cpu"] = r["median_s"] / ref_t       # >1: faiss-cpu is that many times faster
            if task == "kmeans":
                r["ari_vs_" + base] = ari(answers[task][lab], answers[task][base])
            else:
                r["same_ids_vs_" + base] = float((answers[task][lab] == answers[task][base]).float().mean())

    print(f"\nmining benchmark: n={args.n} dim={args.dim} k={args.k} niter={args.niter} init={args.init} "
          f"knn_k={args.knn_k} queries={len(q_ids)} repeats={args.repeats} (median s; ratio = time / {base})")
    print(f"load average before {load_before[0]:.2f} / after {load_after[0]:.2f} on {os.cpu_count()} cores; "
          f"torch threads {torch.get_num_threads()}"
          + (f", faiss omp threads {faiss_module().omp_get_max_threads()}" if faiss_module() else ""))
    print("| task | engine | median s | min s | time / faiss-cpu | agreement |")
    print("|---|---|---|---|---|---|")
    for task in ("kmeans", "knn"):
        for lab, r in results[task].items():
            agree = r.get("ari_vs_" + base, r.get("same_ids_vs_" + base))
            print(f"| {task} | {lab} | {r['median_s']:.3f} | {r['min_s']:.3f} | {r['speedup_of_faiss_cpu']:.2f}x "
                  f"| {agree:.4f} |")
    payload = {"config": vars(args), "engines": [e[0] for e in eng], "cpu_model": cpu_model(), "results": results,
               "load_average_before": load_before, "load_average_after": load_after,
               "faiss_omp_threads": faiss_module().omp_get_max_threads() if faiss_module() else None}
    # one evidence file per thread setting, so a 1-thread run does not overwrite the default one
    write_evidence("mining" if args.threads == 0 else f"mining-threads{args.threads}", payload, out_dir=args.out)
    return payload


if __name__ == "__main__":
    main()
