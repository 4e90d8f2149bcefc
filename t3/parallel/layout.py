"""Shard layout: which contiguous range of a sample's video tokens each rank of an SP group holds.

After patchify the ``L = T * H * W`` tokens of one sample are flattened in t, h, w order. Under
sequence parallelism (SP) with ``sp`` ranks, rank ``r`` holds the tokens ``starts[r] .. starts[r+1] - 1``
(contiguous, in order, ranks in order). Two ways to cut:

- ``"tokens"`` (default): as even as possible, ``L // sp`` or ``L // sp + 1`` tokens per rank. Every
  per-token op (norms, projections, cross-attention, FFN: most of a T3 DiT's work) is balanced.
- ``"frames"``: on frame boundaries, ``T // sp`` or ``T // sp + 1`` whole frames per rank. Layers whose
  attention groups are whole frames (plan ``(T, 1, 1)``) then need no exchange at all, at the price of
  per-token work imbalanced by up to ``ceil(T / sp) / (T / sp)`` (3 vs 2.625 frames: +14% at T=21, sp=8).

When ``sp`` divides ``T`` the two are the same layout. Every rank's local tensors have the same length
``shard_size = max(counts)`` so that collectives move equal shapes; a shorter shard is padded at its end
(padded rows never enter self-attention and are dropped when the shards are gathered, so the result stays
exact).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import torch

from t3.attention.plan import Grid, check_grid

Align = Literal["tokens", "frames"]
ALIGNS: tuple[str, ...] = ("tokens", "frames")

# The config key that sets the SP size (training and eval configs alike).
SP_KEY = "parallel.sequence_parallel_size"


class LayoutError(ValueError):
    """An SP size that cannot shard a grid (the message names the key, the value and the accepted range)."""


def _even_split(items: int, parts: int) -> list[int]:
    """``items`` split into ``parts`` counts differing by at most one, larger counts first."""
    base, extra = divmod(items, parts)
    return [base + (r < extra) for r in range(parts)]


@dataclass(frozen=True)
class ShardLayout:
    """The token ranges of one sample over the ``sp`` ranks of an SP group.

    Attributes:
        grid: post-patch token grid ``(T, H, W)``.
        sp: ranks in the SP group.
        align: ``"tokens"`` or ``"frames"`` (see the module docstring).
        starts: ``sp + 1`` boundaries; rank ``r`` holds tokens ``starts[r] .. starts[r + 1] - 1``.
    """

    grid: Grid
    sp: int
    align: str
    starts: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return self.starts[-1]

    @property
    def counts(self) -> tuple[int, ...]:
        """Real tokens per rank."""
        return tuple(b - a for a, b in zip(self.starts, self.starts[1:], strict=False))

    @property
    def shard_size(self) -> int:
        """Rows of every rank's local tensors (the largest shard; shorter ones are padded at the end)."""
        return max(self.counts)

    @property
    def frame_aligned(self) -> bool:
        """Whether every boundary falls between frames."""
        frame = self.grid[1] * self.grid[2]
        return all(s % frame == 0 for s in self.starts)

    @property
    def token_imbalance(self) -> float:
        """Largest shard over the mean shard, minus one: the imbalance of all per-token work."""
        return self.shard_size * self.sp / self.num_tokens - 1.0

    def range_of(self, rank: int) -> tuple[int, int]:
        """``(start, stop)`` of the tokens ``rank`` holds."""
        return self.starts[rank], self.starts[rank + 1]

    def owner(self, tokens: torch.Tensor) -> torch.Tensor:
        """The rank holding each flat token index in ``tokens``."""
        bounds = torch.tensor(self.starts[1:-1], dtype=tokens.dtype, device=tokens.device)
        return torch.bucketize(tokens, bounds, right=True)

    def padded_positions(self) -> torch.Tensor:
        """``[L]`` position of every token in the ranks' concatenated padded shards (for gathering)."""
        return _padded_positions(self)

    def shard(self, x: torch.Tensor, rank: int, dim: int = 1) -> torch.Tensor:
        """``rank``'s tokens of the full-sequence tensor ``x`` along ``dim``, zero-padded to `shard_size`."""
        if x.shape[dim] != self.num_tokens:
            raise ValueError(f"expected {self.num_tokens} tokens along dim {dim}, got {tuple(x.shape)}")
        start, stop = self.range_of(rank)
        local = x.narrow(dim, start, stop - start)
        pad = self.shard_size - (stop - start)
        if pad == 0:
            return local
        shape = list(x.shape)
        shape[dim] = pad
        return torch.cat([local, x.new_zeros(shape)], dim=dim)


@functools.lru_cache(maxsize=64)
def _padded_positions(layout: ShardLayout) -> torch.Tensor:
    size = layout.shard_size
    return torch.cat([torch.arange(count) + r * size for r, count in enumerate(layout.counts)])


def check_sequence_parallel(grid: Grid, sp: int, align: str = "tokens") -> None:
    """Fail with one line if ``sp`` ranks cannot shard ``grid`` with ``align`` (no model needed).

    Meant for start-up validation: call it with the run's token grid before anything heavy is built.
    """
    grid = check_grid(grid)
    if isinstance(sp, bool) or not isinstance(sp, int) or sp < 1:
        raise LayoutError(f"{SP_KEY} must be an integer >= 1, got {sp!r}")
    if align not in ALIGNS:
        raise LayoutError(f"sequence-parallel align must be one of {ALIGNS}, got {align!r}")
    frames, tokens = grid[0], math.prod(grid)
    if align == "frames" and sp > frames:
        raise LayoutError(
            f"{SP_KEY}={sp} cannot cut {frames} latent frames on frame boundaries (grid {grid}); "
            f"accepted with align='frames': 1 <= {SP_KEY} <= {frames}"
        )
    if sp > tokens:
        raise LayoutError(
            f"{SP_KEY}={sp} exceeds the {tokens} tokens of grid {grid}; accepted: 1 <= {SP_KEY} <= {tokens}"
        )


@functools.lru_cache(maxsize=64)
def shard_layout(grid: Grid, sp: int, align: str = "tokens") -> ShardLayout:
    """The layout of ``grid`` over ``sp`` ranks, cut by ``align`` (``"tokens"`` or ``"frames"``)."""
    grid = check_grid(grid)
    check_sequence_parallel(grid, sp, align)
    if align == "frames":
        frame = grid[1] * grid[2]
        counts = [n * frame for n in _even_split(grid[0], sp)]
    else:
        counts = _even_split(math.prod(grid), sp)
    starts = [0]
    for count in counts:
        starts.append(starts[-1] + count)
    return ShardLayout(grid=grid, sp=sp, align=align, starts=tuple(starts))
