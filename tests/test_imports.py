"""The import graph of the installed package: no cycle (module-level and function-level imports alike, so a
deferred import cannot hide one), the research tooling (fastcl.lab) never imported by the training core, and
`import fastcl.config` light (no miner, kernel, faiss or numba: the config schema is read by every command)."""
import ast
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# package-dir of pyproject.toml: folder -> package name
PACKAGE_DIRS = {"fastcl": "fastcl", "pipelines": "fastcl.pipelines", "kernels": "fastcl.kernels"}
LAB = "fastcl.lab"
COMMANDS = {"fastcl.bench"}  # `python -m fastcl.bench` forwards to fastcl.lab.bench; nothing imports it


def modules() -> dict[str, str]:
    """module name -> file of every module of the installed package."""
    out = {}
    for folder, pkg in PACKAGE_DIRS.items():
        for d, _, files in os.walk(os.path.join(REPO, folder)):
            for f in files:
                if not f.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(d, f), os.path.join(REPO, folder))[:-3].replace(os.sep, ".")
                name = pkg if rel == "__init__" else f"{pkg}.{rel.removesuffix('.__init__')}"
                out[name] = os.path.join(d, f)
    return out


def imports(path: str, name: str, known: dict) -> set[str]:
    """The package's modules that `name` imports anywhere in its file (`from a import b` names a.b when b is a
    module, else a). Imports under `if TYPE_CHECKING:` are skipped (never executed)."""
    tree = ast.parse(open(path).read())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test)
            for n in ast.walk(node)}
    pkg = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                parts = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                mod = ".".join(parts + ([mod] if mod else []))
            subs = {f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in known}
            out |= subs if len(subs) == len(node.names) else subs | {mod}
    return {m for m in out if m in known and m != name}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports(p, m, known) for m, p in known.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    for root in g:
        if root in index:
            continue
        work = [(root, iter(sorted(g[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(g[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_cycle_finder_finds_a_cycle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(g) == [["a", "b", "c"]] and cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_cycle():
    g = graph()
    assert "fastcl.methods.ifnd" in g and "fastcl.pipelines.folder" in g  # the mapped folders are scanned
    assert cycles(g) == []


def test_the_training_core_never_imports_the_lab():
    g = graph()
    bad = {m: sorted(e for e in es if e == LAB or e.startswith(LAB + "."))
           for m, es in g.items() if not m.startswith(LAB) and m not in COMMANDS}
    assert {m: es for m, es in bad.items() if es} == {}
    assert not [m for m, es in g.items() if es & COMMANDS]  # the command forwarders are leaves


def test_import_config_loads_no_miner_or_kernel():
    code = ("import sys; import fastcl.config; print('\\n'.join(m for m in sys.modules if m.startswith("
            "('fastcl.mining', 'fastcl.kernels', 'faiss', 'numba', 'fastcl.lab', 'fastcl.train'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert out.split() == []
