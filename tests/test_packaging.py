"""pipelines/ and kernels/ install INSIDE the fastcl namespace and resolve to this repository."""
import importlib.util
import os
from pathlib import Path

import fastcl
import fastcl.kernels
import fastcl.pipelines

REPO = Path(__file__).resolve().parents[1]


def test_namespaced_packages_resolve_to_this_repo():
    assert Path(fastcl.__file__).resolve().parent == REPO / "fastcl"
    assert Path(fastcl.pipelines.__file__).resolve().parent == REPO / "pipelines"
    assert Path(fastcl.kernels.__file__).resolve().parent == REPO / "kernels"


def test_no_top_level_pipelines_or_kernels_from_this_repo():
    """Both names exist on PyPI: this project must never provide (or shadow) a top-level module of that name."""
    for name in ("pipelines", "kernels"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            assert not Path(spec.origin).resolve().is_relative_to(REPO), (name, spec.origin)
    assert os.path.isfile(REPO / "pipelines" / "convert.py")  # the script path the README documents
