"""Conjugate gradients for several right-hand sides at once, refusing indefinite systems."""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse.linalg as sla

__all__ = ["NotPositiveDefiniteError", "block_cg", "smallest_eigenvalue"]


class NotPositiveDefiniteError(ValueError):
    """The curvature matrix is not positive definite, so it has no (PD) inverse."""

    @classmethod
    def found(cls, name: str, smallest: float, how: str = "smallest eigenvalue") -> NotPositiveDefiniteError:
        """The error for ``name`` whose ``how`` (e.g. smallest eigenvalue) is ``smallest``."""
        return cls(
            f"{name} is not positive definite ({how} {smallest:.4g}). Fit to a minimum, use a "
            "PSD curvature (GGN, OPG) or add damping."
        )


def smallest_eigenvalue(op: Any) -> float:
    """Smallest algebraic eigenvalue of a symmetric operator (Lanczos, or dense when tiny)."""
    size = op.shape[0]
    if size <= 2:
        return float(np.linalg.eigvalsh(op @ np.eye(size, dtype=op.dtype)).min())
    v0 = np.random.default_rng(0).standard_normal(size).astype(op.dtype)
    return float(sla.eigsh(op, k=1, which="SA", tol=1e-6, v0=v0, return_eigenvectors=False)[0])


def block_cg(
    op: Any,
    rhs: np.ndarray,
    *,
    rtol: float = 1e-10,
    maxiter: int | None = None,
    name: str = "operator",
) -> np.ndarray:
    """Solve ``op @ X = rhs`` for every column of ``rhs`` with conjugate gradients.

    The columns run independent CG recurrences but share one ``matmat`` per
    iteration (one pass over the data for a hessop operator). A direction with
    non-positive curvature pᵀAp ≤ 0 proves A is not positive definite: the
    smallest eigenvalue is then computed and reported in the error.

    Raises
    ------
    NotPositiveDefiniteError
        On non-positive curvature.
    ValueError
        If a column does not converge within ``maxiter`` iterations.
    """
    rhs = np.asarray(rhs, dtype=np.float64)
    vector = rhs.ndim == 1
    B = rhs.reshape(rhs.shape[0], -1)
    size, width = B.shape
    maxiter = 10 * size if maxiter is None else int(maxiter)
    X = np.zeros_like(B)
    R = B.copy()
    Pd = R.copy()
    rr = np.einsum("ij,ij->j", R, R)
    targets = (rtol * np.linalg.norm(B, axis=0)) ** 2
    active = rr > targets
    for _ in range(maxiter):
        if not active.any():
            break
        idx = np.flatnonzero(active)
        AP = np.asarray(op.matmat(Pd[:, idx].astype(op.dtype)), dtype=np.float64)
        curvature = np.einsum("ij,ij->j", Pd[:, idx], AP)
        # Relative zero test pᵀAp ≤ ε‖p‖‖Ap‖, independent of units.
        if np.any(curvature <= 1e-14 * np.linalg.norm(Pd[:, idx], axis=0) * np.linalg.norm(AP, axis=0)):
            how = "CG met non-positive curvature; smallest eigenvalue ≈"
            raise NotPositiveDefiniteError.found(name, smallest_eigenvalue(op), how)
        alpha = rr[idx] / curvature
        X[:, idx] += Pd[:, idx] * alpha
        R[:, idx] -= AP * alpha
        rr_new = np.einsum("ij,ij->j", R[:, idx], R[:, idx])
        beta = rr_new / rr[idx]
        rr[idx] = rr_new
        Pd[:, idx] = R[:, idx] + Pd[:, idx] * beta
        active[idx] = rr_new > targets[idx]
    else:
        if active.any():
            msg = f"{name}: CG did not reach rtol={rtol} in {maxiter} iterations for {int(active.sum())} column(s)."
            raise ValueError(msg)
    return X[:, 0] if vector else X
