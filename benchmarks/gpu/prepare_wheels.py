"""Fetch the wheels the GPU kit needs into ``.whl/`` (for Python 3.12 on manylinux x86_64) and print their size.

    python benchmarks/gpu/prepare_wheels.py        # on a machine that reaches the package registry

What: the packages of `benchmarks.gpu.machine.CARRIED` at the versions pinned in ``pyproject.toml``,
plus `benchmarks.gpu.machine.TRANSITIVE_PINS`, each without its dependencies (the GPU machine has
the rest). Wheels are downloaded for the GPU machine's platform; a distribution published only as a
source archive (antlr4-python3-runtime) is built here into a pure-Python wheel. The ``*.whl`` files
already in the folder are removed first: the kit installs every one of them, and two versions of one
package would stop the install. The folder travels with the ``run`` call (``carry: [".whl"]``); the
working tree and the carried folders share a 64 MiB limit, so the wheels must stay well under it.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.gpu.machine import CARRIED, TRANSITIVE_PINS  # noqa: E402

#: The GPU machine: CPython 3.12 on x86-64 Linux (glibc manylinux tags that pip matches exactly).
PYTHON_VERSION = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
#: Refuse a wheel set larger than this: the working tree and everything carried share 64 MiB.
MAX_BYTES = 32 * 2**20


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(pyproject: Path = REPO_ROOT / "pyproject.toml") -> list[str]:
    """``name==version`` of every wheel to fetch: `CARRIED` as pinned in ``pyproject``, then `TRANSITIVE_PINS`.

    Raises:
        ValueError: If a carried package has no exact ``==`` pin in ``pyproject``'s dependencies (base
            or optional).
    """
    project = tomllib.loads(pyproject.read_text())["project"]
    specs = [
        *project["dependencies"],
        *(s for extra in project.get("optional-dependencies", {}).values() for s in extra),
    ]
    pins = {}
    for spec in specs:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s;,]+)\s*", spec)
        if match:
            pins[_normalise(match[1])] = match[2]
    missing = [name for name in CARRIED if _normalise(name) not in pins]
    if missing:
        raise ValueError(f"{pyproject}: no exact '==' pin in [project] dependencies for {missing}")
    return [f"{name}=={pins[_normalise(name)]}" for name in CARRIED] + [
        f"{name}=={version}" for name, version in TRANSITIVE_PINS.items()
    ]


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)


def fetch(requirement: str, dest: Path) -> Path:
    """One wheel of ``requirement`` (no dependencies) in ``dest``: downloaded for the GPU machine, or built."""
    with tempfile.TemporaryDirectory() as tmp:
        platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
        got = _pip(
            "download", "--no-deps", "--only-binary=:all:", "--python-version", PYTHON_VERSION,
            "--implementation", "cp", *platforms, "-d", tmp, requirement,
        )  # fmt: skip
        if got.returncode != 0:  # no wheel published: build one (pure-Python source archives only)
            got = _pip("wheel", "--no-deps", "-w", tmp, requirement)
        wheels = list(Path(tmp).glob("*.whl"))
        if got.returncode != 0 or len(wheels) != 1:
            raise RuntimeError(f"{requirement}: no wheel ({got.stderr.strip().splitlines()[-1:]})")
        wheel = wheels[0]
        if not (wheel.name.endswith("-none-any.whl") or ("cp312" in wheel.name and "x86_64" in wheel.name)):
            raise RuntimeError(f"{requirement}: {wheel.name} will not install on CPython 3.12 x86_64")
        target = dest / wheel.name
        wheel.replace(target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dest", type=Path, default=REPO_ROOT / ".whl", help="wheel folder (default: .whl/)")
    args = parser.parse_args(argv)
    wanted = requirements()
    args.dest.mkdir(parents=True, exist_ok=True)
    for old in args.dest.glob("*.whl"):
        old.unlink()
    total = 0
    for requirement in wanted:
        wheel = fetch(requirement, args.dest)
        total += wheel.stat().st_size
        print(f"{wheel.stat().st_size / 2**20:7.2f} MiB  {wheel.name}")
    print(
        f"{total / 2**20:7.2f} MiB  in {len(wanted)} wheels in {args.dest} (limit {MAX_BYTES / 2**20:.0f} MiB)"
    )
    if total > MAX_BYTES:
        print(f"error: the wheels exceed {MAX_BYTES / 2**20:.0f} MiB; carry fewer", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
