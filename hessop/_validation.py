"""Argument checks shared across modules (numpy only: no TensorFlow import)."""

from __future__ import annotations

import sys
import warnings
from typing import Any

import numpy as np

__all__ = ["as_real_array", "check_finite_array", "check_positive_int", "check_symmetric", "warn"]

# Packages whose frames stand between a hessop warning and the user's line:
# hessop itself, and the libraries that call into it (scipy's solvers call
# matvec; TensorFlow traces hessop's functions, through autograph's generated files).
_LIBRARY_PACKAGES = frozenset({"hessop", "tensorflow", "keras", "scipy", "numpy", "tf_keras"})


def _user_stacklevel() -> int:
    """The ``stacklevel`` of the innermost frame outside hessop and the libraries around it."""
    frame, level = sys._getframe(2), 2  # the caller of `warn`
    while frame is not None:
        package = str(frame.f_globals.get("__name__", "")).partition(".")[0]
        if package not in _LIBRARY_PACKAGES and "__autograph_generated" not in frame.f_code.co_filename:
            return level
        frame, level = frame.f_back, level + 1
    return 1


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the user's line, however deep in hessop (or a solver) it is raised."""
    warnings.warn(message, category, stacklevel=_user_stacklevel())


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


def check_symmetric(op: Any, name: str, *, seed: int = 0) -> None:
    """Refuse an operator that is not symmetric, by one random test (two products): uᵀ(A v) = vᵀ(A u).

    hessop's own symmetric operators (``_symmetric = True``) pass without a
    product; so does an ndarray that equals its transpose to round-off.
    Tolerance: the square root of the dtype's machine epsilon, relative to
    ‖A u‖‖v‖ + ‖A v‖‖u‖ (round-off of a symmetric operator stays far below it).
    """
    if getattr(op, "_symmetric", False):
        return
    dtype = np.dtype(getattr(op, "dtype", None) or np.float64)
    if dtype.kind != "f":
        dtype = np.dtype(np.float64)
    tolerance = float(np.sqrt(np.finfo(dtype).eps))
    if isinstance(op, np.ndarray):
        difference, scale = float(np.max(np.abs(op - op.T), initial=0.0)), float(np.max(np.abs(op), initial=0.0))
    else:
        size = int(op.shape[1])
        u, v = np.random.default_rng(seed).standard_normal((2, size)).astype(dtype)
        au, av = np.asarray(op.matvec(u), dtype=np.float64), np.asarray(op.matvec(v), dtype=np.float64)
        difference = abs(float(u @ av) - float(v @ au))
        scale = float(np.linalg.norm(au) * np.linalg.norm(v) + np.linalg.norm(av) * np.linalg.norm(u))
    if difference > tolerance * scale:
        msg = (
            f"{name}: expected a symmetric operator, but a random test gives |uᵀAv - vᵀAu| = {difference:.3g} "
            f"(relative {difference / max(scale, np.finfo(float).tiny):.2g}, tolerance {tolerance:.1g}); "
            "pass the symmetric curvature (H, the GGN or the OPG), or symmetrise it yourself if that is what you mean."
        )
        raise ValueError(msg)
