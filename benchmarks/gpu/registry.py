"""How a kit check is declared, what it is given, and where its results go.

A check is one function ``fn(ctx: Context) -> None`` decorated with ``@check(budget_s=...)`` in
`benchmarks.gpu.checks`; the decorator appends it to `CHECKS`, whose order is the order the kit runs
them. Its docstring's first line is its title in the summary. It measures and calls ``ctx.emit(table,
row)`` as soon as each result exists (so a check stopped at its budget keeps what it measured), and
raises to fail. Each check runs in its own process, which the kit kills at the check's budget.

Results are JSON lines in ``results.jsonl``, one record per line, each carrying the run id:
``kind`` is ``run`` (mode, budgets, start; first), ``row`` (a measurement: ``check``, ``table`` and
its values), ``note`` (a line of text under a check), ``error`` (why a check failed), ``status`` (a
check's state: ``running``, ``ok``, ``failed``, ``timeout``, ``skipped``) or ``end`` (last). Each line is appended with one ``write`` and synced, so a killed writer leaves every
earlier line intact; `read_records` drops a torn last line.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CHECKS", "LOG_NAME", "RESULTS_NAME", "SUMMARY_NAME", "Check", "Context", "check", "read_records"]

logger = logging.getLogger(__name__)

RESULTS_NAME = "results.jsonl"
SUMMARY_NAME = "summary.md"
LOG_NAME = "kit.log"


@dataclass(frozen=True)
class Check:
    """A registered check.

    Attributes:
        name: The function's name (``--only``, ``--budget NAME=S``).
        title: First line of its docstring.
        fn: ``fn(ctx)``.
        budget_s: Wall-clock seconds it may take on the GPU, process start included.
        tiny_budget_s: The same with ``--tiny`` (test-sized shapes): a guard against hangs, sized for a
            loaded 2-core CPU.
        min_s: Seconds below which starting it is pointless (it is skipped if less of the total is left).
    """

    name: str
    title: str
    fn: Callable[[Context], None]
    budget_s: float
    tiny_budget_s: float
    min_s: float

    def budget(self, tiny: bool) -> float:
        return self.tiny_budget_s if tiny else self.budget_s


CHECKS: dict[str, Check] = {}


def check(*, budget_s: float, min_s: float = 10.0, tiny_budget_s: float = 300.0) -> Callable:
    """Register the decorated function as the next check (see the module docstring)."""

    def register(fn: Callable[[Context], None]) -> Callable[[Context], None]:
        if fn.__name__ in CHECKS:
            raise ValueError(f"a check named {fn.__name__!r} is already registered")
        title = (fn.__doc__ or fn.__name__).strip().splitlines()[0]
        CHECKS[fn.__name__] = Check(fn.__name__, title, fn, budget_s, tiny_budget_s, min_s)
        return fn

    return register


def _json_safe(value: Any) -> Any:
    """Plain JSON: non-finite floats as strings ("nan", "inf"), tuples as lists, other objects as str."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    return str(value)


def append_record(out: Path, record: Mapping[str, Any]) -> None:
    """Append one JSON line to ``out/results.jsonl`` with a single synced write."""
    line = (json.dumps(_json_safe(record), allow_nan=False) + "\n").encode()
    fd = os.open(out / RESULTS_NAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_records(out: Path, run_id: str | None = None) -> list[dict[str, Any]]:
    """The records of ``out/results.jsonl`` (of run ``run_id`` only, if given), in order."""
    path = out / RESULTS_NAME
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a writer killed mid-line: only ever the last line
            continue
        if run_id is None or record.get("run") == run_id:
            records.append(record)
    return records


@dataclass
class Context:
    """What a check gets: where it runs, at which size, and where its results go.

    Attributes:
        check: The running check's name.
        device: ``cuda`` on the GPU, ``cpu`` with ``--cpu``.
        tiny: Test-sized shapes (``--tiny``): every check in seconds.
        out: The results folder.
        run_id: Tags every record of this run.
    """

    check: str
    device: Any  # torch.device; torch is imported by the checks, not here
    tiny: bool
    out: Path
    run_id: str

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def emit(self, table: str, row: Mapping[str, Any]) -> None:
        """Record one measured row of ``table`` now, and refresh the summary."""
        logger.info("%s: %s: %s", self.check, table, dict(row))
        append_record(
            self.out, {"run": self.run_id, "kind": "row", "check": self.check, "table": table, **row}
        )
        self._refresh()

    def note(self, text: str) -> None:
        """Record a line of text shown under this check in the summary."""
        append_record(self.out, {"run": self.run_id, "kind": "note", "check": self.check, "text": text})
        self._refresh()

    def _refresh(self) -> None:
        from benchmarks.gpu.summary import write_summary

        write_summary(self.out, self.run_id)
