"""Guarded conversion of any LinearOperator to a dense matrix."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from hessop._validation import check_positive_int

__all__ = ["DEFAULT_MAX_DENSE", "TRIAL_BLOCK_SIZES", "dense_from_operator", "unit_blocks"]

DEFAULT_MAX_DENSE = 10_000

# Block widths tried, in this order, on the first columns when no block size
# is given. The best width depends on the model and the machine's caches: for
# the Hessian of an MLP 64-64-10 on 512 examples, 32 columns cost 0.44–0.50 ms
# a column and 128 columns 0.59–0.78 ms (see the dense Hessian section of
# benchmarks/RESULTS.md).
TRIAL_BLOCK_SIZES = (16, 32, 64, 128)


def dense_from_operator(op: Any, *, max_params: int, block_size: int | None) -> np.ndarray:
    """Columns of ``op`` in blocks of unit vectors, guarded against P×P surprises.

    ``block_size=None`` builds the first columns with blocks of each of
    ``TRIAL_BLOCK_SIZES`` (three rounds, the last two timed) and the rest with
    the width that cost least per column. Every column is computed once
    either way.
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
    dense = np.empty((n_rows, n_cols), dtype=op.dtype)
    start = 0
    if block_size is None:
        start, block_size = _fill_timed_trials(op, dense)
    for first in range(start, n_cols, block_size):
        _fill_block(op, dense, first, block_size)
    return dense


def _fill_block(op: Any, dense: np.ndarray, start: int, width: int) -> int:
    """dense[:, start:start + width] = op @ I[:, start:start + width]; returns the next column.

    hessop's data-pass operators make the unit vectors themselves
    (``_unit_block_rows``); any other LinearOperator gets them through ``matmat``.
    """
    stop = min(start + width, dense.shape[1])
    unit_block_rows = getattr(op, "_unit_block_rows", None)
    if unit_block_rows is not None:
        dense[:, start:stop] = unit_block_rows(start, stop).T
    else:
        columns, unit = next(unit_blocks(dense.shape[1], width, op.dtype, start=start))
        dense[:, columns] = op.matmat(unit)
    return stop


def _fill_timed_trials(op: Any, dense: np.ndarray) -> tuple[int, int]:
    """Fill the first columns with blocks of the trial widths; (next column, fastest width).

    One untimed round first: the first product may trace a graph (and choose
    an HVP mode), and the first product of each new width runs slower than
    later ones (1.1–2.7 × for that Hessian). Then two timed rounds, and
    the least time per column of each width counts.
    """
    n_cols = dense.shape[1]
    start = 0
    seconds_per_column: dict[int, float] = {}
    for timed in (False, True, True):
        for width in TRIAL_BLOCK_SIZES:
            if start >= n_cols:
                break
            began = time.perf_counter()
            stop = _fill_block(op, dense, start, width)
            if timed:
                seconds = (time.perf_counter() - began) / (stop - start)
                seconds_per_column[width] = min(seconds, seconds_per_column.get(width, np.inf))
            start = stop
    fastest = min(seconds_per_column, key=seconds_per_column.get) if seconds_per_column else TRIAL_BLOCK_SIZES[-1]
    return start, fastest


def unit_blocks(size: int, block_size: int, dtype: Any, *, start: int = 0) -> Iterator[tuple[slice, np.ndarray]]:
    """(columns, I[:, columns]) for consecutive blocks of the size×size identity, from column ``start``."""
    for first in range(start, size, block_size):
        stop = min(first + block_size, size)
        unit = np.zeros((size, stop - first), dtype=dtype)
        unit[np.arange(first, stop), np.arange(stop - first)] = 1
        yield slice(first, stop), unit
