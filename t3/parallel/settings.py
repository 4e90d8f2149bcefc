"""The ``parallel`` settings of a run, checked from the config alone: before any process group or model.

Training (`t3.config.validate`) and evaluation (`t3.eval.settings.check_parallel`) both ask this one
function, so a setting is accepted or refused, with the same one-line message, wherever it is used.
"""

from __future__ import annotations

from t3.attention.plan import Grid
from t3.parallel.assignment import POLICIES
from t3.parallel.groups import check_world
from t3.parallel.layout import ALIGNS, SP_KEY, LayoutError, check_sequence_parallel


class ParallelSettingsError(ValueError):
    """A ``parallel.*`` value that cannot work (the message names the key, the value and what is accepted)."""


def check_parallel_settings(
    sequence_parallel_size: int,
    align: str,
    policy: str,
    max_imbalance: float,
    *,
    grid: Grid,
    world_size: int,
) -> None:
    """Fail with one line if ``world_size`` processes cannot run SP groups of ``sequence_parallel_size``
    ranks on the token ``grid`` with these settings (see `t3.config.train_schema.ParallelConfig`)."""
    if align not in ALIGNS:
        raise ParallelSettingsError(f"parallel.align={align!r}: must be one of {list(ALIGNS)}")
    if policy not in POLICIES:
        raise ParallelSettingsError(f"parallel.policy={policy!r}: must be one of {list(POLICIES)}")
    if isinstance(max_imbalance, bool) or not isinstance(max_imbalance, int | float) or max_imbalance < 0:
        raise ParallelSettingsError(f"parallel.max_imbalance={max_imbalance!r}: must be a number >= 0")
    try:
        check_world(world_size, sequence_parallel_size)
        check_sequence_parallel(grid, sequence_parallel_size, align)
    except (ValueError, LayoutError) as error:
        message = str(error)
        raise ParallelSettingsError(message if SP_KEY in message else f"{SP_KEY}: {message}") from None
