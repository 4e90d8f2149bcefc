"""t3.io: atomic writes never leave half a file or a temporary behind."""

from __future__ import annotations

import json

import pytest

from t3.io import atomic_path, write_json_atomic, write_text_atomic


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out" / "results.json"
    write_json_atomic(target, {"a": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text('{"a": 2, "trunc')
        raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in target.parent.iterdir()) == ["results.json"]
    write_text_atomic(target, "new\n")
    assert target.read_text() == "new\n"


def test_atomic_files_get_the_usual_permissions(tmp_path):
    import os

    umask = os.umask(0)
    os.umask(umask)
    path = write_text_atomic(tmp_path / "r.md", "x")
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
