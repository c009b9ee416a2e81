"""Guarded conversion of any LinearOperator to a dense matrix."""

from __future__ import annotations

from typing import Any

import numpy as np

from hessop._validation import check_positive_int

__all__ = ["DEFAULT_MAX_DENSE", "dense_from_operator"]

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
    for start in range(0, n_cols, block_size):
        stop = min(start + block_size, n_cols)
        unit = np.zeros((n_cols, stop - start), dtype=op.dtype)
        unit[np.arange(start, stop), np.arange(stop - start)] = 1
        dense[:, start:stop] = op.matmat(unit)
    return dense
