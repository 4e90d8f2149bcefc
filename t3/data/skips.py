"""Skipped training samples: why a sample or shard is skipped, and a counter that logs and totals skips.

The shard reader (`t3.data.shards`) never stops a run on bad data: it skips and records in a `SkipCounter`.
Each dataloader worker has its own counter; the counts travel with the items under `SKIPPED_KEY` so that
training can total them across workers and ranks.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

__all__ = ["SKIPPED_KEY", "SKIP_REASONS", "SkipCounter"]

logger = logging.getLogger(__name__)

#: Reasons a sample or shard is skipped: a tar or shard could not be read; a field is missing or empty; a
#: field cannot be decoded; a tensor has the wrong rank or size (or latents of a shape the shard set or the
#: model does not allow); latents or text contain NaN/inf.
SKIP_REASONS = ("read_error", "missing_field", "decode_error", "bad_shape", "non_finite")

#: Every item the reader yields carries ``{reason: count}`` of the skips since the previous item of this
#: reader (process), so that skips can be totalled across dataloader workers and ranks.
SKIPPED_KEY = "__skipped__"


class SkipCounter:
    """Counts skipped samples/shards by reason, keeps a few examples and logs them.

    Also a webdataset exception handler (``handler=counter.handler``): it records the error as
    ``"read_error"`` and tells webdataset to continue with the next member or shard.

    In a ``DataLoader`` with workers each worker process has its own copy; each logs its own summary, and
    :meth:`take_unreported` passes the counts on with the items (``__skipped__``) for a total.

    Args:
        max_examples: Examples kept per reason.
        log_first: Skips logged at WARNING per reason; later ones go to DEBUG to keep logs readable.

    Attributes:
        counts: Skips per reason.
        examples: Up to ``max_examples`` ``"<shard>:<key>: <detail>"`` strings per reason.
    """

    def __init__(self, max_examples: int = 5, log_first: int = 10) -> None:
        self.max_examples = max_examples
        self.log_first = log_first
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self._unreported: Counter[str] = Counter()

    @property
    def total(self) -> int:
        """Number of skips recorded."""
        return sum(self.counts.values())

    def reset(self) -> None:
        """Forget everything recorded so far."""
        self.counts.clear()
        self.examples.clear()

    def add(self, reason: str, where: str, detail: str) -> None:
        """Record one skip.

        Args:
            reason: Short tag, e.g. one of :data:`SKIP_REASONS`.
            where: Shard and key (``"shard-000001.tar:000000042"``) or a file name.
            detail: What was wrong.
        """
        self.counts[reason] += 1
        self._unreported[reason] += 1
        message = f"{where}: {detail}"
        examples = self.examples.setdefault(reason, [])
        if len(examples) < self.max_examples:
            examples.append(message)
        level = logging.WARNING if self.counts[reason] <= self.log_first else logging.DEBUG
        logger.log(level, "skipping %s (%s)", message, reason)

    def take_unreported(self) -> dict[str, int]:
        """Skips recorded since the last call, by reason (kept across :meth:`reset`), then forgotten.

        The reader attaches them to the next item it yields, so a consumer in another process (a dataloader
        worker's reader is a copy) can total every worker's skips.
        """
        taken = dict(self._unreported)
        self._unreported.clear()
        return taken

    def handler(self, exn: BaseException) -> bool:
        """webdataset handler: count the error as ``"read_error"`` and continue."""
        # webdataset appends the url (and stream) to exn.args; the first arg is the message.
        args = list(getattr(exn, "args", ()))
        url = next((a for a in reversed(args[1:]) if isinstance(a, str)), "?")
        message = next((a for a in args if isinstance(a, str) and a != url), None) or str(exn)
        detail = f"{type(exn).__name__}: {message}"
        self.add("read_error", Path(url).name if url != "?" else url, detail)
        return True

    def summary(self) -> str:
        """One line: total and counts by reason."""
        if not self.counts:
            return "no samples skipped"
        parts = ", ".join(f"{reason}={n}" for reason, n in sorted(self.counts.items()))
        return f"{self.total} skipped ({parts})"

    def log_summary(self, what: str = "epoch") -> None:
        """Log the summary at INFO (WARNING if anything was skipped) with one example per reason."""
        if not self.counts:
            logger.info("%s: no samples skipped", what)
            return
        first = "; ".join(f"{reason}: {ex[0]}" for reason, ex in sorted(self.examples.items()) if ex)
        logger.warning("%s: %s; e.g. %s", what, self.summary(), first)
