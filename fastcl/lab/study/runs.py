"""One study run: train it (skip when finished, resume when interrupted), evaluate its kNN, mine SePP partners."""
from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

KNN_KS = (200, 20)


class StudyError(ValueError):
    """Bad study input or a run that cannot continue: reported as one line."""


@dataclass
class RunSpec:
    """One training run of the study: `variant` (method or sweep point) x `seed`, under `run_dir`."""

    variant: str
    seed: int
    run_dir: str
    overrides: list[str]
    method: str = "mocov2"
    table: dict = field(default_factory=dict)  # SePP: {"source": run dir to mine from, "path": table .npz}
    info: dict = field(default_factory=dict)  # sweep coordinates (precision, threshold)


def _tag(x: float) -> str:
    return f"{x:g}".replace("-", "m")


def fn_variant(precision: float, degrade: str = "add") -> str:
    """The precision sweep's variant (its run folder's name): p = 1 is the oracle itself; a degradation other than
    the default `add` is part of the name, so a sweep with --degrade replace never lands on add's finished runs."""
    if precision == 1:
        return "oracle"
    return f"oracle_p{_tag(precision)}" + ("" if degrade == "add" else f"_{degrade}")


def sepp_variant(threshold: float) -> str:
    """The SePP threshold sweep's variant."""
    return f"sepp_t{_tag(threshold)}"


def finished(run_dir: str) -> bool:
    """A run is finished when its result.json exists and it was not stopped by a signal / stop file."""
    path = os.path.join(run_dir, "result.json")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        return not json.load(f).get("preempted")


# What a study run executes: training (and its config and checkpoints) and the kNN evaluation.
FINGERPRINT_ENTRIES = ("fastcl.train", "fastcl.config", "fastcl.checkpoint", "fastcl.eval.knn")
REGISTRY = "fastcl.methods"  # imports every method; a run executes only its own (and the shared base)


PACKAGE_DIRS = {"fastcl.pipelines": "pipelines", "fastcl.kernels": "kernels"}  # pyproject.toml's package-dir


def _module_file(root: str, name: str) -> str | None:
    parts = name.split(".")
    if ".".join(parts[:2]) in PACKAGE_DIRS:
        parts = [PACKAGE_DIRS[".".join(parts[:2])]] + parts[2:]
    base = os.path.join(root, *parts)
    for path in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(path):
            return path
    return None


def _imports(root: str, name: str, tree: ast.AST) -> set[str]:
    """Every module `tree` (the module `name`) may import, at module level or inside functions, with the
    packages above each (importing a.b.c runs a/__init__ and a/b/__init__ first)."""
    pkg = name if _module_file(root, name).endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join(up + ([mod] if mod else []))
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)  # `from pkg import submodule`
    out = set()
    for mod in found:
        parts = mod.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return out


def code_fingerprint(method_module: str, root: str | None = None) -> str:
    """sha256 (16 hex digits) of the code one study run can execute: the import closure (module-level and
    deferred imports) of FINGERPRINT_ENTRIES within the repository, fastcl.lab excluded, where the method registry
    leads to `method_module` and the shared base only. Modules are parsed, so comments and docstrings do not
    count; a change to another method's file, or to a module this run never imports, keeps its cached result."""
    from fastcl.lab import REPO

    root = root or REPO
    seen, todo, trees = set(), list(FINGERPRINT_ENTRIES) + [method_module], {}
    while todo:
        name = todo.pop()
        if name in seen or name == "fastcl.lab" or name.startswith("fastcl.lab."):
            continue
        path = _module_file(root, name)
        if path is None:  # third-party, standard library, or an attribute imported by name
            continue
        seen.add(name)
        tree = trees[name] = ast.parse(open(path).read())
        for dep in _imports(root, name, tree):
            if name == REGISTRY and dep.startswith(REGISTRY + ".") and dep not in (method_module, REGISTRY + ".base"):
                continue
            todo.append(dep)
    h = hashlib.sha256()
    for name in sorted(trees):
        tree = trees[name]
        for node in ast.walk(tree):  # drop docstrings
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                    and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
        h.update(name.encode() + ast.dump(tree).encode())
    return h.hexdigest()[:16]


def check_spec(spec: RunSpec) -> str:
    """Compare <run>/study_spec.json with `spec`: other overrides are refused (StudyError), a run made by other
    training code (another fingerprint; finished or not) is removed so that it trains again from the start, a run
    that recorded no fingerprint is kept. Returns the current fingerprint."""
    from fastcl.methods import method_class

    code = code_fingerprint(method_class(spec.method).__module__)
    spec_path = os.path.join(spec.run_dir, "study_spec.json")
    if os.path.isfile(spec_path):
        with open(spec_path) as f:
            old = json.load(f)
        if old["overrides"] != spec.overrides:
            raise StudyError(f"{spec.run_dir} was trained with other settings "
                             f"({sorted(set(old['overrides']) ^ set(spec.overrides))}); use another --out")
        if old.get("code", code) != code:
            print(f"{spec.run_dir}: the training code changed since this run (commit {old.get('commit')}, code "
                  f"{old['code']}; now {code}): training it again", flush=True)
            shutil.rmtree(spec.run_dir)
    return code


def train_run(config: str, spec: RunSpec, code: str | None = None) -> tuple[str, dict]:
    """Train (or resume, or skip) one run. Returns (how: done|resumed|fresh, trainer result or {}).

    <run>/study_spec.json records the overrides, the commit and the training code's fingerprint (check_spec says
    what a mismatch does; `code`: its answer when the caller already asked)."""
    from fastcl import checkpoint as ckpt
    from fastcl.config import load_config
    from fastcl.lab.benchmarks.common import git_commit
    from fastcl.train import train

    code = code or check_spec(spec)
    spec_path = os.path.join(spec.run_dir, "study_spec.json")
    if finished(spec.run_dir):
        return "done", {}
    how = "resumed" if ckpt.list_checkpoints(spec.run_dir) else "fresh"
    if how == "fresh":  # killed before its first checkpoint: nothing worth keeping (metrics would be appended)
        shutil.rmtree(spec.run_dir, ignore_errors=True)
    os.makedirs(spec.run_dir, exist_ok=True)
    with open(spec_path, "w") as f:
        json.dump({"overrides": spec.overrides, "commit": git_commit(), "code": code}, f, indent=1)
    over = spec.overrides + (["trainer.resume=auto"] if how == "resumed" else [])
    return how, train(load_config(config, over))


def _synthetic_knn(run_dir: str) -> dict:
    """Smoke-test kNN for the synthetic backend (every split is the same generated set): even ids are the bank,
    odd ones the queries (by class cycle). Only for tests; real studies evaluate on image folders."""
    from fastcl.checkpoint import open_run
    from fastcl.eval.features import embed_dataset
    from fastcl.eval.knn import knn_predict
    from fastcl.pipelines import build_loader

    run = open_run(run_dir)
    loader = build_loader(run.cfg, 0, 1, "cpu")
    feats = F.normalize(embed_dataset(run.encoder("student").backbone, run.cfg, loader), dim=1)
    labels = torch.as_tensor(loader.labels).long()
    # ids cycle through the classes (label = id % C): alternate whole cycles, so both halves hold every class
    half = (torch.arange(len(labels)) // loader.num_classes) % 2
    bank, query = torch.nonzero(half == 0).flatten(), torch.nonzero(half == 1).flatten()
    out = {}
    for k in KNN_KS:
        pred = knn_predict(feats[bank], labels[bank], feats[query], k, 0.1, int(labels.max()) + 1).argmax(1)
        out[str(k)] = float((pred == labels[query]).float().mean() * 100)
    return out


def evaluate(run_dir: str, bank: str, test: str, workers: int) -> dict:
    """{"200": top-1 %, "20": top-1 %} of the run's final student backbone: `fastcl.eval.knn` of the `test`
    folder against the `bank` folder (cached in <run>/study_knn.json; synthetic data: _synthetic_knn)."""
    out = os.path.join(run_dir, "study_knn.json")
    if not os.path.isfile(out):
        if not test:
            res = {"top1": _synthetic_knn(run_dir), "test": "synthetic (alternate class cycles: bank / queries)"}
        else:
            from fastcl.eval import knn

            tmp = out + ".knn.json"
            args = ["--checkpoint", run_dir, "--data", bank, "--val", test, "--k", *map(str, KNN_KS),
                    "--out", tmp, "--no-progress", "--workers", str(workers), "--device", "cpu"]
            if knn.main(args) != 0:
                raise StudyError(f"kNN evaluation of {run_dir} failed")
            with open(tmp) as f:
                r = json.load(f)
            os.remove(tmp)
            res = {"top1": r["top1"], "test": test, "bank": bank, "n_val": r["n_val"]}
        with open(out, "w") as f:
            json.dump(res, f, indent=1)
    with open(out) as f:
        return json.load(f)["top1"]


def mine_partners(source: str, out: str, k: int = 5) -> dict:
    """SePP's partner table from the EMA teacher of run `source` (centred backbone features, every top-k
    neighbour kept: threshold -1, so one table serves any method.sepp.threshold). Labels are read for the
    report only. Returns {"path", "sims" [N, k], "ids" [N, k], "labels" [N]} (tensors for the threshold curve)."""
    from fastcl.checkpoint import open_run
    from fastcl.eval.features import embed_dataset
    from fastcl.mining.miner import NeighbourMiner
    from fastcl.pipelines import build_loader

    run = open_run(source)
    cfg = run.cfg
    if not os.path.isfile(out):
        net = run.encoder("teacher" if run.has("teacher") else "student").backbone
        if cfg.data.backend == "synthetic":
            emb = embed_dataset(net, cfg, build_loader(cfg, 0, 1, "cpu"))
        else:
            cfg.data.backend = "torch"
            emb = embed_dataset(net, cfg)  # as `python -m fastcl.mining.sepp` embeds
        miner = NeighbourMiner(emb.shape[0], k, -1.0, features="centered")
        miner.mine(emb)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        miner.save(out)
    import numpy as np
    with np.load(out) as f:
        ids, sims = torch.from_numpy(f["nbr_ids"]), torch.from_numpy(f["nbr_sims"])
    return {"path": out, "ids": ids, "sims": sims, "labels": dataset_labels(cfg)}


def dataset_labels(cfg) -> torch.Tensor:
    """[N] true labels of the training set in id order (report only)."""
    if cfg.data.backend == "synthetic":
        return torch.arange(cfg.data.num_samples) % cfg.data.num_classes
    from fastcl.pipelines.folder import cfg_classes, scan_folder
    return torch.tensor(scan_folder(cfg.data.path, cfg.data.max_samples, cfg_classes(cfg)).labels)


def partner_precision_curve(table: dict, thresholds) -> list[dict]:
    """Per threshold t: share of same-class pairs among the table's pairs with cosine >= t, and the share of
    images that keep at least one partner."""
    from fastcl.mining.knn import pair_precision

    out = []
    for t in thresholds:
        ids = torch.where(table["sims"] >= t, table["ids"], torch.full_like(table["ids"], -1))
        kept = (ids >= 0).sum(1)
        prec = float(pair_precision(ids, table["labels"])) if bool((kept > 0).any()) else float("nan")
        out.append({"threshold": float(t), "partner_precision": prec,
                    "images_with_partner": float((kept > 0).float().mean())})
    return out


def last_epoch_mean(run_dir: str, key: str) -> float:
    """Mean of metric `key` (logged at log steps, metrics.jsonl) over the last epoch that logged it; nan when the
    run never logged it (fn_masked_precision of a run that detected nothing, for one)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    recs = [json.loads(line) for line in open(path)] if os.path.isfile(path) else []
    recs = [r for r in recs if key in r]
    if not recs:
        return float("nan")
    last = max(r["epoch"] for r in recs)
    vals = [r[key] for r in recs if r["epoch"] == last]
    return sum(vals) / len(vals)


def timed(fn, *a, **k):
    t0 = time.time()
    return fn(*a, **k), time.time() - t0
