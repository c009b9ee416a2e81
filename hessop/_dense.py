"""Guarded conversion of any LinearOperator to a dense matrix."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from hessop._validation import check_positive_int

__all__ = ["DEFAULT_MAX_DENSE", "dense_from_operator", "unit_blocks"]

DEFAULT_MAX_DENSE = 10_000


def dense_from_operator(op: Any, *, max_params: int, block_size: int) -> np.ndarray:
    """Columns of ``op`` in blocks of unit vectors, guarded against P×P surprises."""
    n_rows, n_cols = op.shape
    check_positive_int(block_size, "block_size")
    if max(n_rows, n_cols) > max_params:
        gib = n_rows * n_cols * op.dtype.itemsize / 2**30
        msg = (
            f"to_dense: the operator is {n_rows}×{n_cols} ({gib:.2f} GiB), above max_params="
            f"{max_params}; pass a larger max_params to build it anyway, or stay matrix-free."
        )
        raise ValueError(msg)
    dense = np.empty((n_rows, n_cols), dtype=op.dtype)
    for columns, unit in unit_blocks(n_cols, block_size, op.dtype):
        dense[:, columns] = op.matmat(unit)
    return dense


def unit_blocks(size: int, block_size: int, dtype: Any) -> Iterator[tuple[slice, np.ndarray]]:
    """(columns, I[:, columns]) for consecutive blocks of the size×size identity."""
    for start in range(0, size, block_size):
        stop = min(start + block_size, size)
        unit = np.zeros((size, stop - start), dtype=dtype)
        unit[np.arange(start, stop), np.arange(stop - start)] = 1
        yield slice(start, stop), unit
