"""Collect the run summaries of a sweep into paper-style tables and a quality-vs-speed plot.

    python -m t3.report multirun/2026-11-25/10-00-00            # a Hydra multirun folder
    python -m t3.report outputs/sweeps/branches --quality val/loss --speed perf/step_time_s

Every run folder holds a ``summary.json`` (`t3.summary`). Runs are named by the overrides that vary
across the sweep. Where the folder is a Hydra multirun (``multirun.yaml``), the expected jobs are
expanded from its sweep overrides, and jobs that never wrote a summary are listed as missing; runs
whose summary says ``failed`` are listed with their error.

The printed table (and ``report.md``) has a chosen set of columns: the variant, the quality metric
(``--quality``) and its difference from the baseline run, the speed figure (``--speed``) as a ratio to
the baseline, the self-attention MACs and the device. The baseline is ``--baseline <variant>``, by
default the dense run (``t3=dense``) when the sweep has one, else the first completed run.
``report.csv`` and ``report.json`` keep every metric, speed figure, checkpoint and folder;
``report.png`` plots quality vs speed per variant. All go into ``--out`` (default: the sweep folder).
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from t3.io import atomic_path, write_json_atomic, write_text_atomic
from t3.summary import PREVIOUS_RUNS_DIR, SUMMARY_NAME, read_run_summary

logger = logging.getLogger(__name__)


@dataclass
class Run:
    """One job of a sweep: where it ran, its overrides, and its summary if it wrote one."""

    path: Path
    overrides: list[str]
    summary: dict[str, Any] | None = None
    problem: str | None = None  # why the summary could not be read

    @property
    def status(self) -> str:
        if self.summary is not None:
            return self.summary["status"]
        return "unreadable" if self.problem else "missing"


@dataclass
class Report:
    runs: list[Run]
    expected: list[list[str]] = field(default_factory=list)  # override lists the sweep should produce

    @property
    def varying(self) -> list[str]:
        """Override keys whose value differs between runs (what the sweep studies)."""
        values: dict[str, set[str]] = {}
        for overrides in [r.overrides for r in self.runs] + self.expected:
            for item in overrides:
                key, _, value = item.partition("=")
                values.setdefault(key, set()).add(value)
        all_lists = [r.overrides for r in self.runs] + self.expected
        return sorted(k for k, v in values.items() if len(v) > 1 or any(not _has(o, k) for o in all_lists))

    def label(self, overrides: list[str]) -> str:
        keys = self.varying
        parts = [o for o in overrides if o.partition("=")[0] in keys]
        return " ".join(parts) or "(base)"

    @property
    def missing(self) -> list[list[str]]:
        """Expected override lists with no run folder at all."""
        seen = {tuple(sorted(r.overrides)) for r in self.runs}
        return [e for e in self.expected if tuple(sorted(e)) not in seen]


def _has(overrides: list[str], key: str) -> bool:
    return any(o.partition("=")[0] == key for o in overrides)


def _read_overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if path.is_file():
        return [str(o) for o in (yaml.safe_load(path.read_text()) or [])]
    return []


def _expected_jobs(sweep_dir: Path) -> list[list[str]]:
    """Expand the sweep overrides recorded in ``multirun.yaml`` into one override list per job."""
    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        return []
    config = yaml.safe_load(path.read_text()) or {}
    task_overrides = (((config.get("hydra") or {}).get("overrides") or {}).get("task")) or []
    params = ((config.get("hydra") or {}).get("sweeper") or {}).get("params") or {}
    arguments = list(task_overrides) + [f"{k}={v}" for k, v in params.items() if not _has(task_overrides, k)]
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(arguments)
    batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return [list(job) for batch in batches for job in batch]


def collect(sweep_dir: str | Path) -> Report:
    """Find every run folder under ``sweep_dir`` (a summary or a Hydra job record) and read it."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep folder not found: {sweep_dir}")
    run_dirs = {
        p.parent
        for p in sweep_dir.rglob(SUMMARY_NAME)
        if PREVIOUS_RUNS_DIR not in p.relative_to(sweep_dir).parts
    }
    run_dirs |= {p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml")}
    runs = []
    for run_dir in sorted(run_dirs, key=lambda p: (len(p.parts), _natural(p.name))):
        run = Run(path=run_dir, overrides=_read_overrides(run_dir))
        if (run_dir / SUMMARY_NAME).is_file():
            try:
                run.summary = read_run_summary(run_dir)
                run.overrides = run.overrides or list(run.summary.get("overrides") or [])
            except ValueError as err:
                run.problem = str(err)
        runs.append(run)
    return Report(runs=runs, expected=_expected_jobs(sweep_dir))


def _natural(name: str) -> tuple:
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def _metric_keys(report: Report, section: str) -> list[str]:
    keys: list[str] = []
    for run in report.runs:
        for key in (run.summary or {}).get(section) or {}:
            if key not in keys and key != "device":
                keys.append(key)
    return keys


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def rows(report: Report) -> tuple[list[str], list[list[Any]]]:
    """Header and rows: one row per run, then one per missing job."""
    metric_keys, speed_keys = _metric_keys(report, "metrics"), _metric_keys(report, "speed")
    header = ["run", "variant", "status", *metric_keys, *speed_keys, "device", "checkpoint", "error"]
    table = []
    for run in report.runs:
        summary = run.summary or {}
        metrics, speed = summary.get("metrics") or {}, summary.get("speed") or {}
        table.append(
            [
                run.path.name,
                report.label(run.overrides),
                run.status,
                *[metrics.get(k) for k in metric_keys],
                *[speed.get(k) for k in speed_keys],
                speed.get("device"),
                summary.get("checkpoint"),
                summary.get("error") or run.problem,
            ]
        )
    for overrides in report.missing:
        table.append(["-", report.label(overrides), "missing", *[None] * (len(header) - 3)])
    return header, table


MACS_KEY = "macs/self_attention"


def find_baseline(report: Report, label: str | None = None) -> Run | None:
    """The completed run that deltas are taken against: variant ``label``, else ``t3=dense``, else the first.

    Raises:
        ValueError: If ``label`` names no completed run.
    """
    completed = [r for r in report.runs if r.status == "completed"]
    if label is not None:
        for run in completed:
            if report.label(run.overrides) == label or label in run.overrides:
                return run
        labels = [report.label(r.overrides) for r in completed]
        raise ValueError(f"--baseline {label!r}: no completed run of that variant; completed: {labels}")
    dense = [r for r in completed if "t3=dense" in r.overrides]
    return (dense or completed or [None])[0]


def _value(run: Run, section: str, key: str) -> Any:
    value = ((run.summary or {}).get(section) or {}).get(key)
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def _count(value: float | None) -> str:
    if value is None:
        return "-"
    for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:g}"


def summary_table(
    report: Report, quality: str, speed: str, baseline: Run | None
) -> tuple[list[str], list[list[str]]]:
    """The printed table: chosen columns only, formatted; one row per run, then one per missing job."""
    runs = report.runs
    has_quality = any(_value(r, "metrics", quality) is not None for r in runs)
    has_speed = any(_value(r, "speed", speed) is not None for r in runs)
    has_macs = any(_value(r, "speed", MACS_KEY) is not None for r in runs)
    base_quality = None if baseline is None else _value(baseline, "metrics", quality)
    base_speed = None if baseline is None else _value(baseline, "speed", speed)
    header = ["variant", "status"]
    header += [quality, f"Δ {quality}"] if has_quality else []
    header += [speed, f"{speed} / baseline"] if has_speed else []
    header += ["self-attention MACs"] if has_macs else []
    header += ["device"]
    table = []
    for run in runs:
        row = [report.label(run.overrides), run.status]
        if has_quality:
            q = _value(run, "metrics", quality)
            row += [_fmt(q), "-" if q is None or base_quality is None else f"{q - base_quality:+.4g}"]
        if has_speed:
            v = _value(run, "speed", speed)
            row += [_fmt(v), "-" if v is None or not base_speed else f"{v / base_speed:.2f}x"]
        if has_macs:
            row += [_count(_value(run, "speed", MACS_KEY))]
        row += [_fmt(((run.summary or {}).get("speed") or {}).get("device"))]
        table.append(row)
    for overrides in report.missing:
        table.append([report.label(overrides), "missing", *["-"] * (len(header) - 2)])
    return header, table


def markdown(
    report: Report,
    title: str,
    *,
    quality: str = "val/loss",
    speed: str = "perf/step_time_s",
    baseline: Run | None = None,
) -> str:
    """The report as Markdown: counts, the chosen-columns table, and the runs without results."""
    header, table = summary_table(report, quality, speed, baseline)
    counts = {s: sum(1 for r in table if r[1] == s) for s in ("completed", "failed", "missing", "unreadable")}
    lines = [f"# {title}", "", ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no runs found", ""]
    if baseline is not None:
        lines += [
            f"Baseline: {report.label(baseline.overrides)}. Every figure of every run: report.csv, report.json.",
            "",
        ]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in table]
    problems = [
        (report.label(r.overrides), r.status, (r.summary or {}).get("error") or r.problem)
        for r in report.runs
    ]
    problems = [p for p in problems if p[1] != "completed"]
    problems += [(report.label(o), "missing", None) for o in report.missing]
    if problems:
        lines += ["", "Runs without results:"]
        lines += [
            f"- {label}: {status}" + (f" ({error})" if error else "") for label, status, error in problems
        ]
    return "\n".join(lines) + "\n"


def plot(report: Report, path: Path, quality: str, speed: str) -> bool:
    """Quality vs speed, one point per completed run that has both figures. False if none has."""
    points = []
    for run in report.runs:
        summary = run.summary or {}
        q = (summary.get("metrics") or {}).get(quality)
        s = (summary.get("speed") or {}).get(speed, (summary.get("metrics") or {}).get(speed))
        if run.status == "completed" and isinstance(q, int | float) and isinstance(s, int | float):
            points.append((s, q, report.label(run.overrides)))
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for s, q, label in points:
        ax.scatter([s], [q])
        ax.annotate(label, (s, q), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set(xlabel=speed, ylabel=quality, title="quality vs speed per variant")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return True


def write(
    report: Report, out_dir: Path, title: str, quality: str, speed: str, baseline: Run | None = None
) -> dict[str, Path]:
    """Write report.md (chosen columns), report.csv and report.json (everything), report.png (if any)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    header, table = rows(report)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in row] for row in table])
    text = markdown(report, title, quality=quality, speed=speed, baseline=baseline)
    written = {}
    for name, content in (("report.md", text), ("report.csv", buffer.getvalue())):
        written[name] = write_text_atomic(out_dir / name, content)
    written["report.json"] = write_json_atomic(
        out_dir / "report.json",
        {
            "header": header,
            "rows": table,
            "varying": report.varying,
            "baseline": None if baseline is None else report.label(baseline.overrides),
        },
    )
    if plot(report, out_dir / "report.png", quality, speed):
        written["report.png"] = out_dir / "report.png"
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="default: the sweep folder")
    parser.add_argument("--quality", default="val/loss", help="metric on the plot's y axis")
    parser.add_argument("--speed", default="perf/step_time_s", help="speed figure on the plot's x axis")
    parser.add_argument(
        "--baseline",
        default=None,
        help="variant the deltas are taken against (default: t3=dense, else the first)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report = collect(args.sweep_dir)
    try:
        baseline = find_baseline(report, args.baseline)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    title = f"Sweep {args.sweep_dir.resolve().name}"
    written = write(report, args.out or args.sweep_dir, title, args.quality, args.speed, baseline)
    sys.stdout.write(markdown(report, title, quality=args.quality, speed=args.speed, baseline=baseline))
    logger.info("wrote %s", ", ".join(str(p) for p in written.values()))
    failed = [r for r in rows(report)[1] if r[2] != "completed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
