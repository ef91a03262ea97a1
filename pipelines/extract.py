"""Extract (part of) a dataset tarball once into an ignored folder, so that the folder appears only complete.

One mechanism for every caller that unpacks data at run time: the demo's bundled sample, the regression
guard's CIFAR-10 test split and the test suite's small real-image subsets (tests/conftest.py).
"""
from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from typing import Callable

MARKER = ".extracted"  # written last; `make sample` stamps the same file after its `tar xzf`


def extract_once(tarball: str, dest: str, subdir: str = "", keep: Callable[[str], bool] | None = None,
                 stop: Callable[[str], bool] | None = None) -> str:
    """Stream `tarball` and write each file member `top/<subdir>/<rest>` to `dest/<rest>`; returns dest.

    keep(rest) false skips a member, stop(rest) true ends the scan (the tarballs are name-sorted). The files are
    written to a temporary folder beside dest, marked complete, then renamed: an interrupted extraction leaves
    no half folder behind, and of two processes extracting at once the second keeps the first one's copy. A
    dest that exists without the marker (an interrupted `tar xzf`) is replaced."""
    if os.path.isfile(os.path.join(dest, MARKER)):
        return dest
    if not os.path.isfile(tarball):
        raise FileNotFoundError(f"dataset tarball not found: {tarball}")
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(dest) + ".", dir=parent)
    prefix = subdir.strip("/") + "/" if subdir else ""
    with tarfile.open(tarball, "r|gz") as tar:
        for m in tar:
            rest = m.name.split("/", 1)[1] if "/" in m.name else ""
            if not m.isfile() or not rest.startswith(prefix):
                continue
            rest = rest[len(prefix):]
            if stop is not None and stop(rest):
                break
            if keep is None or keep(rest):
                out = os.path.join(tmp, rest)
                os.makedirs(os.path.dirname(out), exist_ok=True)
                with open(out, "wb") as f:
                    f.write(tar.extractfile(m).read())
    open(os.path.join(tmp, MARKER), "w").close()
    if os.path.isdir(dest) and not os.path.isfile(os.path.join(dest, MARKER)):
        shutil.rmtree(dest, ignore_errors=True)
    try:
        os.rename(tmp, dest)
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
