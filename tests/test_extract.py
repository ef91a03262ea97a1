"""fastcl.pipelines.extract.extract_once on the bundled CIFAR-10 sample tarball: a sub-folder, a filter, the
completion marker, reuse of a finished folder and replacement of a half-extracted one."""
import os

import pytest

from fastcl.pipelines.extract import MARKER, extract_once

TAR = os.path.join(os.path.dirname(__file__), os.pardir, "data", "cifar10_sample.tar.gz")


def test_extracts_a_filtered_subfolder_once(tmp_path):
    dest = tmp_path / "sample_test"
    (dest / "cat").mkdir(parents=True)  # an interrupted `tar xzf`: a folder without the marker
    (dest / "cat" / "stale.jpg").write_bytes(b"half")
    out = extract_once(TAR, str(dest), subdir="test", keep=lambda rest: rest.split("/")[-1] < "0005")
    classes = sorted(c for c in os.listdir(out) if c != MARKER)
    assert len(classes) == 10 and (dest / MARKER).is_file() and not (dest / "cat" / "stale.jpg").exists()
    assert all(len(os.listdir(dest / c)) == 5 for c in classes)
    assert (dest / "cat" / "0000.jpg").read_bytes()[:2] == b"\xff\xd8"  # a JPEG
    (dest / "cat" / "0000.jpg").unlink()
    extract_once(TAR, str(dest), subdir="test")  # finished: reused as it is, not extracted again
    assert not (dest / "cat" / "0000.jpg").exists()
    assert [p for p in os.listdir(tmp_path) if p != "sample_test"] == []  # no temporary folder left behind


def test_missing_tarball_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.tar.gz"):
        extract_once(str(tmp_path / "nope.tar.gz"), str(tmp_path / "x"))
