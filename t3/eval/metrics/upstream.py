"""Run a metric through its authors' own code, imported from a local checkout of their repository.

DOVER and VBench (ViCLIP) are not installable packages, and DOVER's licence forbids redistributing its
code, so t3 carries no copy of either: the user points a config key at a checkout they already have
(``metrics.vqa_dover.repo``, ``metrics.vtc_viclip.repo``) and t3 imports the upstream modules from there.

* `checkout_paths` turns the configured paths into existing paths, or into the reason the metric is
  skipped (not given, not found), and refuses a checkout that lacks the files the adapter calls, in one
  line naming the key, before any model is built;
* `import_from_checkout` imports upstream modules with the checkout first on ``sys.path`` and checks that
  each one really comes from the checkout (an installed package of the same name would shadow it);
* `load_script` imports an upstream script (a file with an ``if __name__ == "__main__"`` block) as a module,
  for the helper functions it defines;
* `checkout_commit` is the commit the checkout is at, recorded with every score; `upstream_commit` also
  warns when it is not the commit the adapter was written against.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType

__all__ = ["checkout_commit", "checkout_paths", "import_from_checkout", "load_script", "upstream_commit"]

logger = logging.getLogger(__name__)


def checkout_paths(
    key: str, repo: str | None, required: Sequence[str], files: dict[str, str | None]
) -> tuple[Path, dict[str, Path]] | str:
    """The checkout and the metric's files as existing paths, or the reason the metric is skipped.

    Args:
        key: Config node of the metric (``metrics.vqa_dover``), for the messages.
        repo: The configured checkout folder (None: not given).
        required: Files the adapter needs inside the checkout, relative to it.
        files: Other files by config key (``{"weights": "/w/DOVER.pth"}``; None: not given).

    Returns:
        ``(repo, {name: path})``, or a skip reason such as ``"no upstream checkout (metrics.x.repo is null)"``.

    Raises:
        FileNotFoundError: If the checkout exists but lacks a required file (it is not the expected repository).
    """
    if repo is None or str(repo) == "":
        return f"no upstream checkout ({key}.repo is null)"
    root = Path(repo).expanduser()
    if not root.is_dir():
        return f"checkout not found at {root} ({key}.repo)"
    resolved = {}
    for name, value in files.items():
        if value is None or str(value) == "":
            return f"no {name} ({key}.{name} is null)"
        path = Path(value).expanduser()
        if not path.exists():
            return f"{name} not found at {path} ({key}.{name})"
        resolved[name] = path
    for relative in required:
        if not (root / relative).is_file():
            raise FileNotFoundError(
                f"{key}.repo={str(root)!r} has no {relative}; is it the right repository?"
            )
    return root, resolved


@contextlib.contextmanager
def _first_on_path(root: Path) -> Iterator[None]:
    sys.path.insert(0, str(root))
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(str(root))


def _inside(module: ModuleType, root: Path) -> bool:
    origin = getattr(module, "__file__", None)
    return origin is not None and Path(origin).resolve().is_relative_to(root.resolve())


def import_from_checkout(root: Path, names: Sequence[str]) -> dict[str, ModuleType]:
    """Import the modules ``names`` (dotted, e.g. ``"dover.models"``) from the checkout ``root``.

    Submodules the upstream code imports later resolve through its packages, so ``sys.path`` is restored
    right after the import.

    Raises:
        ImportError: If a module comes from somewhere else than ``root`` (a same-named package is installed
            or was imported before), or if the upstream code fails to import (a missing dependency: the
            message is upstream's).
    """
    modules = {}
    with _first_on_path(root):
        for name in names:
            top = name.split(".")[0]
            loaded = sys.modules.get(top)
            if loaded is not None and not _inside(loaded, root):
                raise ImportError(
                    f"module {top!r} is already imported from {getattr(loaded, '__file__', '?')}, not from {root}"
                )
            module = importlib.import_module(name)
            if not _inside(module, root):
                raise ImportError(f"{name} was imported from {module.__file__}, not from the checkout {root}")
            modules[name] = module
    return modules


def load_script(root: Path, relative: str) -> ModuleType:
    """Import the upstream script ``root / relative`` as a module (its ``__main__`` block does not run)."""
    path = root / relative
    name = f"_t3_upstream_{path.stem}_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    with _first_on_path(root):
        spec.loader.exec_module(module)
    return module


def checkout_commit(root: Path) -> str | None:
    """The commit ``root`` is checked out at (``git rev-parse HEAD``), or None if it is not a git checkout.

    A folder inside some other repository is not a checkout of its own: its top level must be ``root``.
    """
    try:
        done = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--show-toplevel", "HEAD"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as err:
        logger.debug("git rev-parse in %s failed: %s", root, err)
        return None
    lines = done.stdout.splitlines()
    if done.returncode != 0 or len(lines) != 2 or Path(lines[0]).resolve() != root.resolve():
        return None
    return lines[1]


def upstream_commit(metric: str, root: Path, written_against: str) -> str | None:
    """`checkout_commit` of ``root``, with a warning when it is not ``written_against``."""
    commit = checkout_commit(root)
    if commit != written_against:
        logger.warning(
            "%s: the checkout %s is at %s; t3's adapter was written against %s",
            metric, root, commit or "an unknown commit (not a git checkout)", written_against,
        )  # fmt: skip
    return commit
