"""Files: atomic writes (a temporary name in the same folder, then rename) and content hashes.

Every write that must never be seen half done goes through here: a file (`atomic_path`, and the text,
JSON and JSON-lines writers on top of it) or a whole folder (`atomic_folder`); and `sha256_file` is the
one file hash. A reader (or a resumed run) never sees half a file: either the old file, or the complete
new one.
Every file gets the mode a plain ``open()`` would give it (the umask's), also where the library that
writes it would restrict it to its owner (`give_umask_mode`).
The temporary name sits in the target's folder because ``os.replace`` is atomic only within one
file system; it starts with a dot so that globbing for outputs does not pick it up.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_CHUNK = 1 << 22  # 4 MiB reads: fast on network file systems without holding a checkpoint in memory

# os.umask can only be read by setting it, which races with other threads; read it once at import and
# prefer the kernel's own record of the current value (Linux: /proc/self/status), which reads it safely.
_UMASK_AT_IMPORT = _read_umask()


def current_umask() -> int:
    """The process's umask now (at import time where the system does not report it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return _UMASK_AT_IMPORT


def file_mode() -> int:
    """The mode ``open()`` gives a new file: ``0o666`` less the umask (group-readable under 022 or 027)."""
    return 0o666 & ~current_umask()


def give_umask_mode(path: str | os.PathLike) -> Path:
    """Give the file ``path``, or every file under the folder ``path``, the mode of `file_mode`.

    Writers that create files readable by their owner only (``tempfile.mkstemp``, safetensors'
    ``save_file``, hence diffusers' ``save_pretrained``) would otherwise leave exports and videos that
    colleagues on a shared cluster cannot read.
    """
    path = Path(path)
    mode = file_mode()
    for file in (
        [path] if path.is_file() else (p for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    ):
        os.chmod(file, mode)
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    give_umask_mode(tmp)  # mkstemp creates the file readable by its owner only
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``path``; on success it replaces ``path``, on error it is removed.

    An existing ``path`` is swapped out by a second rename and deleted only once the new folder is in
    place, so at every moment ``path`` is either the old folder or the complete new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = path.with_name(f".{path.name}.tmp-{tag}")
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{tag}")
            os.replace(path, old)
            os.replace(tmp, path)
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically, synced to disk before the rename."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())  # the data must be on disk before the rename makes it visible
    return Path(path)


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """`write_text_atomic` of ``data`` as indented JSON."""
    return write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_jsonl_atomic(path: str | os.PathLike, records: Iterable[Any]) -> Path:
    """`write_text_atomic` of ``records`` as JSON lines (one compact object per line)."""
    return write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (what ``sha256sum`` prints)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
