"""pipelines/ and kernels/ install INSIDE the fastcl namespace and resolve to this repository."""
import json
import os
import subprocess
import sys
from pathlib import Path

import fastcl
import fastcl.kernels
import fastcl.pipelines

REPO = Path(__file__).resolve().parents[1]


def test_namespaced_packages_resolve_to_this_repo():
    assert Path(fastcl.__file__).resolve().parent == REPO / "fastcl"
    assert Path(fastcl.pipelines.__file__).resolve().parent == REPO / "pipelines"
    assert Path(fastcl.kernels.__file__).resolve().parent == REPO / "kernels"


def test_no_top_level_pipelines_or_kernels_from_this_repo(tmp_path):
    """Both names exist on PyPI: the installation must never provide a top-level module of that name. Checked in a
    fresh interpreter started outside the repository (a checkout's cwd on sys.path would hide the question)."""
    code = ("import importlib.util, json; print(json.dumps({n: getattr(importlib.util.find_spec(n), 'origin', None) "
            "for n in ('pipelines', 'kernels')}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    found = json.loads(out.stdout)
    for name, origin in found.items():
        assert origin is None or not Path(origin).resolve().is_relative_to(REPO), (name, origin)
    assert os.path.isfile(REPO / "pipelines" / "convert.py")  # the script path the README documents
