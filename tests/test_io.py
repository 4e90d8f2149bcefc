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


@pytest.fixture
def umask_027():
    """A group-readable umask, as on shared clusters (and not the usual 022, so the mode must follow it)."""
    import os

    old = os.umask(0o027)
    yield 0o640
    os.umask(old)


def _modes(root) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mode & 0o777 for p in root.rglob("*") if p.is_file()}


def test_exported_weights_and_videos_get_the_umasks_mode(tmp_path, umask_027):
    import numpy as np

    from t3.models import save_dit
    from t3.models.tiny import tiny_dit
    from t3.video_io import write_video

    dit = tiny_dit()
    save_dit(dit, tmp_path / "diffusers", format="diffusers")
    save_dit(dit, tmp_path / "wan", format="wan")
    save_dit(dit, tmp_path / "wan_sharded", format="wan", max_shard_size=20_000)
    save_dit(dit, tmp_path / "single" / "dit.safetensors", format="wan")
    write_video(tmp_path / "video.mp4", np.zeros((3, 16, 16, 3), np.uint8), fps=8)
    write_json_atomic(tmp_path / "record.json", {})
    modes = _modes(tmp_path)
    assert len([m for m in modes if m.startswith("wan_sharded/")]) > 2  # shards and their index
    assert modes == dict.fromkeys(modes, umask_027)
    assert {p.stat().st_mode & 0o777 for p in tmp_path.rglob("*") if p.is_dir()} == {0o750}
