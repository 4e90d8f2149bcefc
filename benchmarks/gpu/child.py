"""One check of the kit in this process: ``python -m benchmarks.gpu.child NAME OUT RUN_ID [--cpu] [--tiny]``.

The kit (`benchmarks.gpu.kit`) starts one such process per check and kills it at the check's budget.
With ``--cpu`` the packages absent on the GPU machine are blocked before anything is imported, so a
CPU run fails where the GPU run would. A failure is recorded (``kind: error``) and exits with 1.
"""

import sys

if "--cpu" in sys.argv[1:]:
    from benchmarks.gpu.machine import block_absent_imports

    block_absent_imports()

import logging  # noqa: E402
import os  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import benchmarks.gpu.checks  # noqa: E402, F401  (registers the checks)
from benchmarks.gpu.registry import CHECKS, Context, append_record  # noqa: E402


def _exit_with_the_kit() -> None:
    """End this process if the kit that started it dies (killed outright, it could not stop us)."""
    kit = os.getppid()

    def watch() -> None:
        while os.getppid() == kit:
            time.sleep(1.0)
        os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def main(argv: list[str]) -> int:
    _exit_with_the_kit()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    name, out, run_id = argv[:3]
    cpu, tiny = "--cpu" in argv[3:], "--tiny" in argv[3:]
    ctx = Context(name, torch.device("cpu" if cpu else "cuda"), tiny, Path(out), run_id)
    try:
        CHECKS[name].fn(ctx)
    except Exception as err:  # noqa: BLE001 (recorded for the summary; the exit status says it too)
        traceback.print_exc()
        first_line = (str(err).strip().splitlines() or [""])[0]
        text = f"{type(err).__name__}: {first_line}"
        append_record(ctx.out, {"run": run_id, "kind": "error", "check": name, "text": text})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
