"""Docs travel with the code: every "METHODS.md §N" / DESIGN.md citation in the code resolves inside this
repository, and no file points outside it (../shared is not part of a clone)."""
import glob
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = [p for pat in ("fastcl/**/*.py", "pipelines/*.py", "kernels/*.py", "tests/*.py", "configs/**/*.yaml",
                         "docs/*.md", "docs/*.yaml", "README.md", "Makefile")
           for p in glob.glob(os.path.join(REPO, pat), recursive=True)]


def _text(path):
    return open(path, encoding="utf-8").read()


def _headings(path):
    return [line.lstrip("#").strip() for line in _text(path).splitlines() if line.startswith("#")]


def test_methods_section_citations_resolve():
    sections = set()
    for h in _headings(os.path.join(REPO, "docs/METHODS.md")):
        m = re.match(r"(\d+(?:\.\d+)?)\.?\s", h)
        if m:
            sections.add(m.group(1))
    assert {"0", "1", "2.4", "3.1", "5.6", "9"} <= sections
    cited = []
    for path in SOURCES:
        for m in re.finditer(r"METHODS(?:\.md)?\)?\s*§\s*(\d+(?:\.\d+)?)", _text(path)):
            cited.append((os.path.relpath(path, REPO), m.group(1)))
    assert len(cited) > 30  # the code does cite the spec
    missing = [(p, s) for p, s in cited if s not in sections]
    assert not missing, missing


def test_design_citations_resolve():
    heads = _headings(os.path.join(REPO, "docs/DESIGN.md"))
    rules = re.findall(r"^(\d+)\. ", _text(os.path.join(REPO, "docs/DESIGN.md")), flags=re.M)
    for path in SOURCES:
        text = _text(path)
        for m in re.finditer(r'DESIGN\.md,? "([^"]+)"', text):
            assert any(m.group(1) in h for h in heads), (path, m.group(1))
        for m in re.finditer(r"DESIGN\.md,?(?: style)? rule (\d+)", text):
            assert m.group(1) in rules, (path, m.group(0))


def test_no_reference_leaves_the_repository():
    bad = [(os.path.relpath(p, REPO), m.group(0)) for p in SOURCES
           for m in re.finditer(r"\.\./shared/docs|\b(?:ENV|PERFORMANCE|EXPECTATIONS)\.md", _text(p))]
    assert not bad, bad
    for path in glob.glob(os.path.join(REPO, "docs/*.md")) + [os.path.join(REPO, "README.md")]:
        for link in re.findall(r"\]\(([^)#:]+\.md)(?:#[^)]*)?\)", _text(path)):
            assert os.path.isfile(os.path.join(os.path.dirname(path), link)), (path, link)


# outputs that commands write (ignored by git): named in docs as what a command produces, not as a file to read
GENERATED = ("runs/", "data/extracted/", "data/gpu_carry/")
PATH_RE = re.compile(r"(?<![\w/.-])((?:fastcl|pipelines|kernels|configs|tests|docs|data)/[\w./-]+"
                     r"\.(?:py|yaml|md|json|txt|sbatch|tar\.gz|ipynb))")
MODULE_RE = re.compile(r"(?<![\w.])(fastcl(?:\.\w+)+)")


def _resolves(dotted: str) -> bool:
    """A dotted fastcl name is a module, or an attribute chain of the longest importable module prefix."""
    import importlib

    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def test_every_named_file_and_module_exists():
    """Every repository file path (fastcl/..., configs/..., docs/..., tests/..., data/...) and every fastcl module
    or attribute (fastcl.mining.engine.gpu_resources) named in the code, configs and docs exists in this checkout,
    except the outputs commands write (GENERATED)."""
    missing = set()
    for path in SOURCES:
        text = _text(path)
        for ref in PATH_RE.findall(text):
            ref = ref.rstrip(".")
            if ref.startswith(GENERATED) or os.path.exists(os.path.join(REPO, ref)):
                continue
            if os.path.exists(os.path.join(REPO, "fastcl", ref)):  # pipelines/ and kernels/ install under fastcl
                continue
            missing.add((os.path.relpath(path, REPO), ref))
        for ref in MODULE_RE.findall(text):
            if not _resolves(ref.rstrip(".")):
                missing.add((os.path.relpath(path, REPO), ref))
    assert not missing, sorted(missing)
