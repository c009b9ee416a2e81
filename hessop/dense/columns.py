"""Guarded conversion of any LinearOperator to a dense matrix."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from hessop._validation import check_positive_int

__all__ = [
    "DEFAULT_MAX_DENSE",
    "TRIAL_BLOCK_SIZES",
    "DenseHooks",
    "MemoryProbe",
    "column_parts",
    "dense_from_operator",
    "hooks_of",
    "lower_block_product",
    "unit_blocks",
]

DEFAULT_MAX_DENSE = 10_000

# Block widths tried, narrowest first, on the first columns when no block
# size is given. The best width depends on the model and the machine, so it is
# measured (benchmarks/bench_dense.py shows the spread).
TRIAL_BLOCK_SIZES = (16, 32, 64, 128, 256, 512)
# A block's memory grows with its width times a batch's activations: for a
# CNN with large batches, a wide block can exhaust the machine. So a wider
# trial runs only if the last one's peak memory, scaled to the new width,
# fits in this share of the memory available when the trials began...
_MEMORY_SHARE = 0.5
# ...and only up to this width where that peak cannot be read (no Linux
# /proc, or an operator whose memory is on an accelerator).
_UNMEASURED_MAX_WIDTH = 128
# A width slower per column than the best so far by this factor ends the
# trials: wider blocks only add memory then.
_SLOWER_BY = 1.10
_clock = time.perf_counter


@dataclass(frozen=True)
class DenseHooks:
    """What an operator may tell `dense_from_operator` to build its matrix faster; every field is optional.

    An operator returns one from a method ``dense_hooks()``; a LinearOperator
    without that method gets the defaults (columns from ``matmat`` with unit
    vectors, all rows). hessop's data-pass operators fill in:

    Attributes
    ----------
    parts : tuple of (start, stop), optional
        Column ranges of a symmetric operator whose blocks need only the rows
        from the range's start (the rows above are mirrored from earlier columns).
    lower_block_rows : callable ``(first, stop, known_rows=None) -> array``, optional
        ``(A[r:, first:stop])ᵀ`` for the part starting at r (all rows, r = 0,
        without parts), the unit vectors made by the operator itself. With
        ``known_rows=(a, b)`` the rows a:b come first, then rows r:.
    known_dense : callable ``() -> array or None``, optional
        The whole matrix by a faster route, or None where it has none.
    known_block : callable ``() -> (start, stop, block) or None``, optional
        One diagonal block in closed form; its columns are not built.
    check_block : callable ``(dense, start, stop) -> bool``, optional
        Whether ``dense``'s columns start:stop agree with the operator's own
        products; where False, every column is built again by products.
    memory_on_host : bool
        Whether a product's memory shows in this process's resident size
        (not on an accelerator), for the block-width trials.
    """

    parts: tuple[tuple[int, int], ...] | None = None
    lower_block_rows: Callable[..., np.ndarray] | None = None
    known_dense: Callable[[], np.ndarray | None] | None = None
    known_block: Callable[[], tuple[int, int, np.ndarray] | None] | None = None
    check_block: Callable[[np.ndarray, int, int], bool] | None = None
    memory_on_host: bool = True


def hooks_of(op: Any) -> DenseHooks:
    """``op.dense_hooks()`` where the operator has it, else the defaults."""
    method = getattr(op, "dense_hooks", None)
    return method() if callable(method) else DenseHooks()


def dense_from_operator(op: Any, *, max_params: int, block_size: int | None, closed_form: bool = True) -> np.ndarray:
    """Columns of ``op`` in blocks of unit vectors, guarded against P×P surprises.

    ``block_size=None`` builds the first columns with blocks of growing
    width (``TRIAL_BLOCK_SIZES``, each an untimed block and two timed ones) and
    the rest with the width that cost least per column; the growth stops
    where a width is slower than the best so far or the next one's memory
    would not fit (`_fill_timed_trials`). Every column is computed once
    either way.

    A symmetric hessop operator splits its columns into parts of consecutive
    variables (`column_parts`): the blocks of a part start with its own rows
    (`lower_block_product`), and the rows above are mirrored from the columns
    before. The blocks of a part never cross into the next.

    What an operator knows beyond its products comes from its `DenseHooks`
    (``op.dense_hooks()``). It may know one diagonal block in closed form (a
    `HessianOperator`'s Dense-layer kernel, ``known_block``): its columns are
    not built, the other columns' blocks return its rows as well
    (`_known_rows_product`), and its other entries are mirrored from those.
    ``check_block(dense, start, stop)`` then compares the result with the
    operator's own products; where it returns False, every column is built
    again by products. An operator may instead know the whole matrix
    (``known_dense``: `OPGOperator`'s JᵀJ/N from per-example gradients),
    returned as it is where it is not None. ``closed_form=False`` builds
    every column by products from the start.
    """
    n_rows, n_cols = op.shape
    if block_size is not None:
        check_positive_int(block_size, "block_size")
    if max(n_rows, n_cols) > max_params:
        gib = n_rows * n_cols * op.dtype.itemsize / 2**30
        msg = (
            f"to_dense: the operator is {n_rows}×{n_cols} ({gib:.2f} GiB), above max_params="
            f"{max_params}; pass a larger max_params to build it anyway, or stay matrix-free."
        )
        raise ValueError(msg)
    hooks = hooks_of(op)
    if closed_form and hooks.known_dense is not None:
        dense = hooks.known_dense()
        if dense is not None:
            return dense
    dense = np.empty((n_rows, n_cols), dtype=op.dtype)
    known = hooks.known_block() if closed_form and hooks.known_block is not None else None
    if known is not None:
        start, stop, block = known
        dense[start:stop, start:stop] = block
        _fill(op, dense, block_size, (start, stop))
        if hooks.check_block is None or hooks.check_block(dense, start, stop):
            return dense
    _fill(op, dense, block_size, None)
    return dense


def _fill(op: Any, dense: np.ndarray, block_size: int | None, known: tuple[int, int] | None) -> None:
    """Every column of ``dense`` but the ``known`` range's (filled already), then the mirrored entries."""
    n_cols = dense.shape[1]
    start = _skip_known(0, known)
    if block_size is None:
        start, block_size = _fill_timed_trials(op, dense, known)
    while start < n_cols:
        start = _fill_block(op, dense, start, block_size, known)
    if known is not None:
        first, stop = known
        dense[:first, first:stop] = dense[first:stop, :first].T
        dense[stop:, first:stop] = dense[first:stop, stop:].T
    for part_start, part_stop in column_parts(op):
        dense[:part_start, part_start:part_stop] = dense[part_start:part_stop, :part_start].T


def _skip_known(column: int, known: tuple[int, int] | None) -> int:
    """``column``, or the first column after the ``known`` range where it falls inside it."""
    if known is not None and known[0] <= column < known[1]:
        return known[1]
    return column


def _fill_block(op: Any, dense: np.ndarray, start: int, width: int, known: tuple[int, int] | None = None) -> int:
    """dense[r:, start:stop] = op[r:, start:stop], up to ``width`` columns within a part; returns the next column.

    The block stops short of the ``known`` columns, and with rows r before
    them returns their rows too.
    """
    stop = min(start + width, _part_of(op, start)[1])
    if known is not None and start < known[0]:
        stop = min(stop, known[0])
    if known is not None and known[0] < _part_of(op, start)[0]:
        known_rows, (row_start, block) = _known_rows_product(op, start, stop, known)
        dense[known[0] : known[1], start:stop] = known_rows
    else:
        row_start, block = lower_block_product(op, start, stop)
    dense[row_start:, start:stop] = block
    return _skip_known(stop, known)


def _known_rows_product(op: Any, start: int, stop: int, known: tuple[int, int]) -> tuple[np.ndarray, tuple[int, np.ndarray]]:
    """``(op[known rows, start:stop], (r, op[r:, start:stop]))`` for a part starting at r after the known block."""
    rows = hooks_of(op).lower_block_rows(start, stop, known_rows=known).T
    size = known[1] - known[0]
    return rows[:size], (_part_of(op, start)[0], rows[size:])


def column_parts(op: Any) -> tuple[tuple[int, int], ...]:
    """Column ranges ``(start, stop)`` whose products `lower_block_product` restricts to rows ``start:``.

    One range, all columns, for operators other than hessop's symmetric ones.
    """
    return hooks_of(op).parts or ((0, op.shape[1]),)


def _part_of(op: Any, column: int) -> tuple[int, int]:
    """The `column_parts` range that holds ``column``."""
    return next((first, stop) for first, stop in column_parts(op) if first <= column < stop)


def lower_block_product(op: Any, start: int, stop: int) -> tuple[int, np.ndarray]:
    """``(r, op[r:, start:stop])`` where r is the first column of the `column_parts` range holding start..stop-1.

    hessop's data-pass operators make the unit vectors on the device
    (`DenseHooks.lower_block_rows`), and its symmetric ones compute only those
    rows; any other LinearOperator gets its unit vectors through ``matmat``
    (r = 0).
    """
    lower_block_rows = hooks_of(op).lower_block_rows
    if lower_block_rows is not None:
        return _part_of(op, start)[0], lower_block_rows(start, stop).T
    _, unit = next(unit_blocks(op.shape[1], stop - start, op.dtype, start=start))
    return 0, op.matmat(unit)


def _fill_timed_trials(op: Any, dense: np.ndarray, known: tuple[int, int] | None = None) -> tuple[int, int]:
    """Fill the first columns with blocks of growing width; (next column, fastest width).

    Each width runs one untimed block first (the first product may trace a
    graph and choose an HVP mode, and the first product of a new width runs
    slower than later ones: 1.1–2.7 × for an MLP Hessian), then two timed
    blocks, of which the lesser time per column counts. The next width is
    tried while columns remain, this one was not slower than the best by
    more than ``_SLOWER_BY``, and its peak memory fits (`_MemoryWatch`).

    With `column_parts`, the trials begin in the first part and go on into
    the next where it ends; neither a block cut short at the end of a part
    nor the first block of a width in a part (it may trace the part's
    graph) is timed. For variables in the order the model uses them, the
    first part costs the most memory a column (its tangent enters the model
    first, and it computes all rows), so widths chosen there fit the later
    parts; those cost less time a column, too, so a width timed there looks
    faster than it would in the first.
    """
    n_cols = dense.shape[1]
    start = _skip_known(0, known)
    watch = _MemoryWatch.start(hooks_of(op).memory_on_host)
    seconds_per_column: dict[int, float] = {}
    for width in TRIAL_BLOCK_SIZES:
        if start >= n_cols or not watch.allows(width):
            break
        samples: list[float] = []
        warm_part = None  # the part in which a block of this width has run
        while len(samples) < 2 and start < n_cols:
            part = _part_of(op, start)
            began = _clock()
            stop = _fill_block(op, dense, start, width, known)
            if part == warm_part and stop - start == width:  # not cut short by the end of the part
                samples.append((_clock() - began) / width)
            warm_part, start = part, stop
        watch.record(width)
        if not samples:
            break
        seconds_per_column[width] = min(samples)
        if seconds_per_column[width] > _SLOWER_BY * min(seconds_per_column.values()):
            break
    fastest = min(seconds_per_column, key=seconds_per_column.get) if seconds_per_column else TRIAL_BLOCK_SIZES[0]
    return start, fastest


class _MemoryWatch:
    """Peak resident memory after each trial width, from Linux's /proc, against the size when trials began.

    The peak (``VmHWM``) is the process's high-water mark, never reset here
    (that would change what the process reports to anyone else): after a
    width it is at least that width's peak, so the scaled estimate errs on
    the side of narrower blocks. Where /proc cannot be read, `allows` stops
    at ``_UNMEASURED_MAX_WIDTH``.
    """

    def __init__(self, baseline: int | None, available: int | None) -> None:
        self.baseline = baseline
        self.budget = None if available is None else _MEMORY_SHARE * available
        self.peaks: dict[int, int] = {}

    @classmethod
    def start(cls, on_host: bool = True) -> _MemoryWatch:
        if not on_host:
            return cls(None, None)
        return cls(_status_bytes("VmRSS"), _meminfo_bytes("MemAvailable"))

    @property
    def measured(self) -> bool:
        return self.baseline is not None and self.budget is not None

    def record(self, width: int) -> None:
        peak = _status_bytes("VmHWM") if self.measured else None
        if peak is not None:
            self.peaks[width] = max(peak - self.baseline, 0)  # type: ignore[operator]

    def allows(self, width: int) -> bool:
        if not self.measured:
            return width <= _UNMEASURED_MAX_WIDTH
        if not self.peaks:
            return True
        widest = max(self.peaks)
        return self.peaks[widest] * width / widest <= self.budget  # type: ignore[operator]


class MemoryProbe:
    """The process's resident and peak resident size and the memory available, from Linux's /proc.

    The peak (``VmHWM``) is never reset. With ``on_host=False`` (products on
    an accelerator) or off Linux every reading is None.

    Examples
    --------
    >>> MemoryProbe(on_host=False).peak() is None
    True
    """

    def __init__(self, on_host: bool = True) -> None:
        self.on_host = on_host

    def resident(self) -> int | None:
        return _status_bytes("VmRSS") if self.on_host else None

    def peak(self) -> int | None:
        return _status_bytes("VmHWM") if self.on_host else None

    def available(self) -> int | None:
        return _meminfo_bytes("MemAvailable") if self.on_host else None


def _status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status (in kB there) in bytes, or None off Linux."""
    return _proc_bytes("/proc/self/status", field)


def _meminfo_bytes(field: str) -> int | None:
    return _proc_bytes("/proc/meminfo", field)


def _proc_bytes(path: str, field: str) -> int | None:
    """A field of a Linux /proc file given in kB (``VmHWM`` of /proc/self/status, say), in bytes; None where unreadable."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def unit_blocks(size: int, block_size: int, dtype: Any, *, start: int = 0) -> Iterator[tuple[slice, np.ndarray]]:
    """(columns, I[:, columns]) for consecutive blocks of the size×size identity, from column ``start``."""
    for first in range(start, size, block_size):
        stop = min(first + block_size, size)
        unit = np.zeros((size, stop - first), dtype=dtype)
        unit[np.arange(first, stop), np.arange(stop - first)] = 1
        yield slice(first, stop), unit
