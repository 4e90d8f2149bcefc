"""``summary.md``: a kit run's ``results.jsonl`` as Markdown, rewritten whole after every record.

Layout: the run (mode, budgets, start, elapsed), the environment (device, torch, CUDA, ...), one line
per check (status, time, budget), then each check's notes and tables. A table holds the rows a check
emitted under one table name, with the columns in the order they first appear.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.gpu.registry import SUMMARY_NAME, read_records
from t3.io import write_text_atomic

__all__ = ["render_summary", "write_summary"]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, list):
        return (
            "x".join(map(str, value))
            if all(isinstance(v, int) for v in value)
            else ", ".join(map(str, value))
        )
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return lines


ROW_META = ("run", "kind", "check", "table")


def render_summary(records: Sequence[Mapping[str, Any]]) -> str:
    """Markdown for the records of one run (see the module docstring)."""
    run = next((r for r in records if r["kind"] == "run"), {})
    end = next((r for r in records if r["kind"] == "end"), None)
    order = list(run.get("checks", {}))
    status: dict[str, Mapping[str, Any]] = {}
    for r in records:
        if r["kind"] == "status":
            status[r["check"]] = r
            if r["check"] not in order:
                order.append(r["check"])

    mode = (
        "CPU, test-sized shapes" if run.get("tiny") and run.get("device") == "cpu" else run.get("device", "?")
    )
    if run.get("tiny") and run.get("device") != "cpu":
        mode += ", test-sized shapes"
    lines = [
        "# T3 GPU validation kit",
        "",
        f"Run `{run.get('run', '?')}` on {mode}; started {run.get('started', '?')}; total budget "
        f"{_cell(run.get('total_budget_s'))} s; "
        + (f"finished after {end['elapsed_s']:.0f} s." if end else "still running or interrupted."),
        "",
    ]
    env = [r for r in records if r["kind"] == "row" and r["check"] == "environment"]
    if env:
        lines += [
            "Environment: "
            + "; ".join(f"{k} {_cell(v)}" for k, v in env[-1].items() if k not in ROW_META)
            + ".",
            "",
        ]
    lines += ["| # | check | status | time (s) | budget (s) | detail |", "|---:|---|---|---:|---:|---|"]
    for i, name in enumerate(order, 1):
        s = status.get(name, {})
        budget = s.get("budget_s", run.get("checks", {}).get(name))
        lines.append(
            f"| {i} | {name} | {s.get('status', 'not started')} | {_cell(s.get('elapsed_s'))} "
            f"| {_cell(budget)} | {_cell(s.get('detail', ''))} |"
        )
    for i, name in enumerate(order, 1):
        mine = [r for r in records if r.get("check") == name and r["kind"] in ("row", "note")]
        if not mine or name == "environment":
            continue
        title = status.get(name, {}).get("title") or run.get("titles", {}).get(name, "")
        lines += ["", f"## {i}. {name}: {title}", ""]
        lines += [r["text"] for r in mine if r["kind"] == "note"]
        tables: dict[str, list[Mapping[str, Any]]] = {}
        for r in mine:
            if r["kind"] == "row":
                tables.setdefault(r["table"], []).append({k: v for k, v in r.items() if k not in ROW_META})
        for table, rows in tables.items():
            lines += ["", f"**{table}**", "", *_table(rows)]
    return "\n".join(lines) + "\n"


def write_summary(out: Path, run_id: str) -> Path:
    """Rewrite ``out/summary.md`` (atomically) from the records of run ``run_id``."""
    return write_text_atomic(out / SUMMARY_NAME, render_summary(read_records(out, run_id)))
