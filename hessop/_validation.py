"""Argument checks shared across modules (numpy only: no TensorFlow import)."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["as_real_array", "check_finite_array", "check_positive_int"]


def as_real_array(value: Any, name: str) -> np.ndarray:
    """``value`` as a float64 array, or TypeError naming ``name``.

    numpy's own errors name no argument ("float() argument must be a string or
    a real number, not 'JacobianOperator'" for arguments passed out of order),
    and a complex array would lose its imaginary part with only a warning.
    """
    if np.iscomplexobj(value):
        msg = f"{name}: expected real numbers, got complex values."
        raise TypeError(msg)
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as error:
        msg = f"{name}: expected an array of real numbers, got {type(value).__name__} ({error})."
        raise TypeError(msg) from error


def check_finite_array(array: Any, name: str) -> None:
    """Raise ValueError naming ``name`` when ``array`` holds NaN or inf."""
    array = np.asarray(array)
    if not np.all(np.isfinite(array)):
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        msg = f"{name}: contains {bad} non-finite value(s) (NaN or inf)."
        raise ValueError(msg)


def non_finite_rows(array: Any) -> np.ndarray:
    """Indices along the first axis of the examples (rows) of ``array`` that hold a NaN or inf."""
    array = np.asarray(array)
    return np.flatnonzero(~np.isfinite(array).reshape(array.shape[0], -1).all(axis=1))


def check_positive_int(value: Any, name: str, minimum: int = 1) -> int:
    """An int >= ``minimum`` (bools refused), or ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        msg = f"{name}: expected an int >= {minimum}, got {value!r}."
        raise ValueError(msg)
    return int(value)
