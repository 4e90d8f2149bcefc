"""Run the GPU validation kit: every check in order, each in its own process under its own budget.

    bash benchmarks/gpu/run.sh "$OUT"                 # on the GPU machine (installs .whl/ first)
    python -m benchmarks.gpu.kit --out DIR --cpu --tiny   # every check on test-sized shapes, CPU

Each check (`benchmarks.gpu.checks`) runs in a child process (`benchmarks.gpu.child`) that the kit
stops (its process group: SIGTERM, then SIGKILL) when the check's budget is spent; what it had
recorded stays. A check starts only if the total budget leaves it at least its minimum; the kit ends
before the total budget (measured from ``--started-at``, which ``run.sh`` sets before installing
wheels). Results in ``DIR``: ``results.jsonl`` (JSON lines, see `benchmarks.gpu.registry`),
``summary.md`` (rewritten after every record, printed at the end) and ``kit.log`` (every child's
output). Exit status 0 when every check asked for passed, else 1; bad arguments fail in one line
before anything runs.
"""

from __future__ import annotations

import argparse
import datetime
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from benchmarks.gpu.registry import (
    CHECKS,
    LOG_NAME,
    RESULTS_NAME,
    SUMMARY_NAME,
    Check,
    append_record,
    read_records,
)
from benchmarks.gpu.summary import write_summary

#: Default total budget: 8 minutes of the ~15 a session gets on the GPU machine (its start and the
#: transfers come on top), which leaves time to rerun a part.
TOTAL_BUDGET_S = 480.0
#: Kept free at the end for the last records and the summary.
END_MARGIN_S = 3.0
#: After SIGTERM, a check gets this long to exit before SIGKILL.
KILL_GRACE_S = 5.0
#: Minimum start time of every check with --tiny (the checks' own minimums are GPU-sized).
TINY_MIN_S = 1.0


def _budgets(values: list[str]) -> dict[str, float]:
    budgets = {}
    for value in values:
        name, _, seconds = value.partition("=")
        if name not in CHECKS:
            raise SystemExit(f"--budget {value}: unknown check {name!r}; checks: {', '.join(CHECKS)}")
        try:
            budgets[name] = float(seconds)
        except ValueError:
            budgets[name] = -1.0
        if not budgets[name] > 0:
            raise SystemExit(f"--budget {value}: expected NAME=SECONDS with SECONDS > 0")
    return budgets


def _names(value: str | None, flag: str) -> list[str]:
    if not value:
        return []
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise SystemExit(f"{flag} {value}: unknown check(s) {unknown}; checks: {', '.join(CHECKS)}")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, help="results folder (default: $OUT)")
    parser.add_argument(
        "--cpu", action="store_true", help="run on the CPU (imports absent on the GPU machine blocked)"
    )
    parser.add_argument("--tiny", action="store_true", help="test-sized shapes: every check in seconds")
    parser.add_argument(
        "--only", help="comma-separated checks to run, after 'environment' (default: all, in order)"
    )
    parser.add_argument("--skip", help="comma-separated checks to leave out")
    parser.add_argument(
        "--budget", action="append", default=[], metavar="NAME=SECONDS", help="a check's budget"
    )
    parser.add_argument("--total-budget", type=float, default=TOTAL_BUDGET_S, metavar="SECONDS")
    parser.add_argument("--started-at", type=float, help="epoch seconds the run started (run.sh sets it)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the results of an earlier run in --out"
    )
    parser.add_argument("--list", action="store_true", help="list the checks and their budgets, then exit")
    args = parser.parse_args(argv)
    if args.list:
        return args
    if args.out is None:
        if not os.environ.get("OUT"):
            raise SystemExit("--out DIR is required (or set $OUT)")
        args.out = Path(os.environ["OUT"])
    if not args.total_budget > 0:
        raise SystemExit(f"--total-budget {args.total_budget}: expected seconds > 0")
    args.budgets = _budgets(args.budget)
    skip = set(_names(args.skip, "--skip"))
    # The environment (device, versions, date) goes with every run's figures: always first.
    only = _names(args.only, "--only")
    only = ["environment", *(n for n in only if n != "environment")] if only else list(CHECKS)
    args.checks = [n for n in only if n not in skip]
    existing = [
        p.name for p in (args.out / RESULTS_NAME, args.out / SUMMARY_NAME, args.out / LOG_NAME) if p.exists()
    ]
    if existing and not args.overwrite:
        raise SystemExit(
            f"{args.out} already holds a kit run ({', '.join(existing)}); pass --overwrite or another folder"
        )
    return args


# --- the parent: all checks under budgets -----------------------------------------------------------------


_RUNNING: set[subprocess.Popen] = set()


def _on_signal(signum: int, frame: object) -> None:
    """Stopped from outside (the device tool's timeout, Ctrl-C): end the running check first."""
    for proc in list(_RUNNING):
        _stop(proc)
    raise SystemExit(128 + signum)


def _stop(proc: subprocess.Popen) -> None:
    """End a check's whole process group: SIGTERM, then SIGKILL after `KILL_GRACE_S`."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _run_check(check: Check, budget: float, args: argparse.Namespace, run_id: str) -> tuple[str, str]:
    """Run one check in a child process; returns ``(status, detail)``."""
    command = [sys.executable, "-m", "benchmarks.gpu.child", check.name, str(args.out), run_id]
    command += (["--cpu"] if args.cpu else []) + (["--tiny"] if args.tiny else [])
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    with open(args.out / LOG_NAME, "a") as log:
        log.write(
            f"\n===== {check.name} (budget {budget:.0f} s) {datetime.datetime.now(datetime.UTC):%H:%M:%S} UTC\n"
        )
        log.flush()
        # Its own process group (not session), so that its subprocesses (pytest) end with it, and
        # anything left ends with the command that started the kit.
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, process_group=0)
        _RUNNING.add(proc)
        try:
            code = proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            _stop(proc)
            return "timeout", f"stopped at its budget of {budget:.0f} s; rows above were measured before"
        finally:
            _RUNNING.discard(proc)
    if code == 0:
        return "ok", ""
    errors = [
        r["text"] for r in read_records(args.out, run_id) if r["kind"] == "error" and r["check"] == check.name
    ]
    return "failed", errors[-1] if errors else f"exit status {code} (see {LOG_NAME})"


def run(args: argparse.Namespace) -> int:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    started = args.started_at or time.time()
    deadline = started + args.total_budget - END_MARGIN_S
    run_id = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]
    args.out.mkdir(parents=True, exist_ok=True)
    for name in (RESULTS_NAME, SUMMARY_NAME, LOG_NAME):  # only with --overwrite (checked above)
        (args.out / name).unlink(missing_ok=True)
    budgets = {n: args.budgets.get(n, CHECKS[n].budget(args.tiny)) for n in args.checks}
    append_record(
        args.out,
        {
            "run": run_id,
            "kind": "run",
            "device": "cpu" if args.cpu else "cuda",
            "tiny": args.tiny,
            "total_budget_s": args.total_budget,
            "started": datetime.datetime.fromtimestamp(started, datetime.UTC).isoformat(timespec="seconds"),
            "checks": budgets,
            "titles": {n: CHECKS[n].title for n in args.checks},
        },
    )
    write_summary(args.out, run_id)
    all_ok, blocked = True, ""
    for name in args.checks:
        check = CHECKS[name]
        left = deadline - time.time()
        needed = TINY_MIN_S if args.tiny else check.min_s
        record = {"run": run_id, "kind": "status", "check": name, "title": check.title}
        elapsed, budget = 0.0, None
        if blocked:
            status, detail = "skipped", blocked
        elif left < needed:
            status, detail = "skipped", f"{max(left, 0):.0f} s left of the total budget, needs {needed:.0f} s"
        else:
            budget = min(budgets[name], left)
            append_record(args.out, {**record, "status": "running", "budget_s": round(budget, 1)})
            write_summary(args.out, run_id)
            begin = time.time()
            status, detail = _run_check(check, budget, args, run_id)
            elapsed = time.time() - begin
            if name == "environment" and status != "ok":
                blocked = "the environment check did not pass"
        append_record(
            args.out,
            {**record, "status": status, "detail": detail, "elapsed_s": round(elapsed, 1),
             "budget_s": None if budget is None else round(budget, 1)},
        )  # fmt: skip
        write_summary(args.out, run_id)
        all_ok &= status == "ok"
        progress = f"[{time.time() - started:5.0f} s] {name}: {status} in {elapsed:.1f} s {detail}"
        print(progress.rstrip(), flush=True)
    append_record(args.out, {"run": run_id, "kind": "end", "elapsed_s": round(time.time() - started, 1)})
    summary = write_summary(args.out, run_id)
    print(summary.read_text(), flush=True)
    print(f"results: {args.out / RESULTS_NAME}, {summary}, {args.out / LOG_NAME}", flush=True)
    return 0 if all_ok else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for check in CHECKS.values():
            print(
                f"{check.name:<12} {check.budget_s:5.0f} s (--tiny {check.tiny_budget_s:3.0f} s)  {check.title}"
            )
        return 0
    return run(args)


import benchmarks.gpu.checks  # noqa: E402, F401  (registers the checks, in order)

if __name__ == "__main__":
    sys.exit(main())
