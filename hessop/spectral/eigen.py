"""Eigenpairs of symmetric curvature operators."""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.linalg
import scipy.sparse.linalg as sla

from hessop._progress import check_progress, product_progress
from hessop._validation import check_positive_int, check_symmetric
from hessop.dense.columns import DEFAULT_MAX_DENSE, dense_from_operator

__all__ = ["eigen", "low_rank", "full_rank", "check_k"]

METHODS = ("lanczos", "ipca", "randomized")
WHICH = ("LA", "LM", "SA", "SM", "BE")  # eigsh's


def check_k(k: Any, size: int, *, name: str = "k", allow_full: bool = False) -> int:
    """Validate a number of eigenpairs: an int with 1 <= k < size (<= size if allow_full)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        msg = f"{name}: expected an int, got {k!r}."
        raise TypeError(msg)
    upper = size if allow_full else size - 1
    if not 1 <= k <= upper:
        relation = "<=" if allow_full else "<"
        msg = f"{name}={k} must satisfy 1 <= {name} {relation} {size} (the operator's size)."
        raise ValueError(msg)
    return int(k)


def eigen(
    op: Any,
    k: int,
    *,
    method: str = "lanczos",
    which: str = "LA",
    oversample: int = 10,
    power_iterations: int = 4,
    tol: float = 0.0,
    seed: int | None = 0,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    r"""Top eigenpairs of a symmetric operator (H, G, GGN or any LinearOperator).

    Parameters
    ----------
    op : scipy.sparse.linalg.LinearOperator
        Symmetric, shape (P, P).
    k : int
        Number of eigenpairs, ``1 <= k < P`` (for all P, see `low_rank`).
    method : {"lanczos", "ipca", "randomized"}
        ``"lanczos"``: ``scipy.sparse.linalg.eigsh`` (implicitly restarted
        Lanczos), any symmetric operator. ``"ipca"``: only for `OPGOperator`;
        one streaming pass over mini-batches of per-example gradients with an
        uncentred incremental SVD of J (see Notes). ``"randomized"``: a
        randomized range finder with ``power_iterations`` subspace iterations
        on blocks of ``k + oversample`` vectors (one data pass per block
        product; largest-magnitude eigenvalues, which="LM" semantics).
    which : {"LA", "LM", "SA", "SM", "BE"}
        Passed to ``eigsh`` ("LA": largest algebraic, "LM": largest magnitude,
        "SA", "SM": smallest, "BE": both ends). ``"ipca"`` supports only "LA"
        (the largest eigenvalues of a PSD G), ``"randomized"`` "LM" and "LA".
    oversample : int
        ``"ipca"`` keeps ``k + oversample`` singular directions while streaming
        and drops the extra ones at the end; ``"randomized"`` uses blocks of
        ``k + oversample`` vectors. Accuracy grows with it.
    power_iterations : int
        Subspace iterations of ``"randomized"``.
    tol : float
        ``eigsh`` tolerance (0: machine precision).
    seed : int or None
        Seed for the Lanczos start vector or the random test matrix.
    progress : bool
        Show one progress bar counting the operator's products (for hessop's
        data-pass operators; `low_rank` and `full_rank` pass it on).

    Returns
    -------
    eigenvalues : numpy.ndarray, shape (k,)
        Sorted in descending order.
    eigenvectors : numpy.ndarray, shape (P, k)
        Orthonormal columns, matching ``eigenvalues``.

    Raises
    ------
    ValueError
        ``k`` out of range, unknown ``method`` or ``which``, ``"ipca"`` on an
        operator that is not an `OPGOperator`, or a ``which`` the method does
        not give.

    Notes
    -----
    The incremental SVD keeps :math:`B = S V^\top` (r × P, r = k + oversample)
    and, for each batch of gradient rows :math:`J_b`, replaces it by the top r
    rows of :math:`\Sigma V^\top` from the thin SVD of :math:`[B; J_b]`. With no
    truncation this is exactly the SVD of J, so :math:`\lambda_i = \sigma_i^2/N`
    are the eigenvalues of :math:`G = J^\top J/N` itself. Unlike
    ``sklearn.decomposition.IncrementalPCA`` nothing is centred: PCA of the rows
    of J would give the gradient covariance :math:`G - \bar g\bar g^\top`, which
    differs from G away from a stationary point. Truncation makes the result
    approximate once the rank of J exceeds r; it is exact when r reaches it.
    Memory is O((r + batch size)·P).

    Examples
    --------
    >>> import numpy as np, scipy.sparse.linalg as sla, hessop
    >>> A = sla.aslinearoperator(np.diag([5.0, 3.0, 2.0, 1.0]))
    >>> values, vectors = hessop.eigen(A, k=2)
    >>> values.round(6)
    array([5., 3.])
    """
    if method not in METHODS:
        msg = f"method: expected one of {METHODS}, got {method!r}."
        raise ValueError(msg)
    shape = getattr(op, "shape", None)
    if shape is None or len(shape) != 2 or shape[0] != shape[1]:
        msg = f"op: expected a square LinearOperator, got shape {shape}."
        raise ValueError(msg)
    k = check_k(k, int(shape[0]))
    oversample = check_positive_int(oversample, "oversample", minimum=0)
    check_symmetric(op, "op")
    if which not in WHICH:
        msg = f"which: expected one of {WHICH}, got {which!r}."
        raise ValueError(msg)
    if method == "randomized" and which not in ("LA", "LM"):
        # The range finder keeps the directions of largest |eigenvalue|.
        msg = f"which: method='randomized' gives the largest-magnitude eigenvalues (which='LM', or 'LA'), got {which!r}."
        raise ValueError(msg)
    power_iterations = check_positive_int(power_iterations, "power_iterations", minimum=0)
    if isinstance(tol, bool) or not isinstance(tol, (int, float, np.floating, np.integer)) or not np.isfinite(tol) or tol < 0:
        msg = f"tol: expected a finite number >= 0 (0 means machine precision), got {tol!r}."
        raise ValueError(msg)
    with product_progress(op, "eigen", enabled=check_progress(progress)):
        if method == "ipca":
            return _eigen_incremental_svd(op, k, which=which, oversample=oversample)
        rng = np.random.default_rng(seed)
        if method == "randomized":
            return _eigen_randomized(op, k, oversample=oversample, power_iterations=power_iterations, rng=rng)
        v0 = rng.standard_normal(shape[0]).astype(op.dtype, copy=False)
        values, vectors = sla.eigsh(op, k=k, which=which, tol=tol, v0=v0)
        order = np.argsort(values)[::-1]
        return values[order], vectors[:, order]


def _eigen_incremental_svd(op: Any, k: int, *, which: str, oversample: int) -> tuple[np.ndarray, np.ndarray]:
    from hessop.operators.opg import OPGOperator

    if not isinstance(op, OPGOperator):
        msg = (
            f"method='ipca' streams per-example gradients and needs an OPGOperator, got "
            f"{type(op).__name__}; use method='lanczos' for other operators."
        )
        raise ValueError(msg)
    if which != "LA":
        msg = f"which: method='ipca' gives the largest eigenvalues (which='LA'), got {which!r}."
        raise ValueError(msg)
    rank = k + int(oversample)
    # Work in float64: squared singular values lose half the digits of float32.
    basis = np.zeros((0, op.shape[0]))
    for rows in op.per_example_gradients():
        stacked = np.vstack([basis, rows.astype(np.float64, copy=False)])
        _, singular, right = scipy.linalg.svd(stacked, full_matrices=False, check_finite=False)
        keep = min(rank, singular.size)
        basis = singular[:keep, None] * right[:keep]
    _, singular, right = scipy.linalg.svd(basis, full_matrices=False, check_finite=False)
    if singular.size < k:
        msg = f"k={k} exceeds the number of examples seen ({singular.size}); J has at most that rank."
        raise ValueError(msg)
    eigenvalues = singular[:k] ** 2 * op.scale
    return eigenvalues.astype(op.dtype), right[:k].T.astype(op.dtype)


def _eigen_randomized(
    op: Any, k: int, *, oversample: int, power_iterations: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Halko-Martinsson-Tropp randomized eigendecomposition of a symmetric operator."""
    size = op.shape[0]
    width = min(size, k + oversample)
    basis = np.linalg.qr(op.matmat(rng.standard_normal((size, width)).astype(op.dtype)))[0]
    for _ in range(int(power_iterations)):
        basis = np.linalg.qr(op.matmat(basis))[0]
    image = op.matmat(basis)
    small = basis.T @ image
    values, vectors = np.linalg.eigh((small + small.T) / 2)
    order = np.argsort(np.abs(values))[::-1][:k]
    order = order[np.argsort(values[order])[::-1]]
    return values[order].astype(op.dtype), (basis @ vectors[:, order]).astype(op.dtype)


def low_rank(op: Any, k: int, *, method: str = "lanczos", **options: Any) -> Any:
    r"""Low-rank approximation :math:`Q\Lambda Q^\top` from the top-k eigenpairs of ``op``.

    Parameters
    ----------
    op : LinearOperator
        Symmetric, e.g. `HessianOperator`, `OPGOperator`, `GGNOperator`.
    k : int
        Number of eigenpairs kept, ``1 <= k <= P``; ``k = P`` is exact (P
        products in blocks: the whole matrix).
    method : {"lanczos", "ipca", "randomized"}
        As in `eigen`; further ``options`` are passed to it.

    Returns
    -------
    LowRankOperator

    Examples
    --------
    >>> import numpy as np, scipy.sparse.linalg as sla, hessop
    >>> A = hessop.low_rank(sla.aslinearoperator(np.diag([4.0, 3.0, 1.0, 0.5])), k=2)
    >>> A.eigenvalues.round(10)
    array([4., 3.])
    """
    from hessop.lowrank.operators import LowRankOperator

    values, vectors = _top_eigenpairs(op, k, method, options)
    return LowRankOperator(vectors, values)


def full_rank(op: Any, k: int, *, tail: float | None = None, method: str = "lanczos", **options: Any) -> Any:
    r"""Full-rank approximation :math:`Q\Lambda Q^\top + \tilde\lambda(I - QQ^\top)` of ``op``.

    Parameters
    ----------
    op : LinearOperator
        Symmetric.
    k : int
        Number of eigenpairs kept, ``1 <= k <= P``; ``k = P`` is exact.
    tail : float, optional
        :math:`\tilde\lambda`; default the smallest kept eigenvalue.
    method : {"lanczos", "ipca", "randomized"}
        As in `eigen`; further ``options`` are passed to it.

    Returns
    -------
    FullRankOperator

    Examples
    --------
    >>> import numpy as np, scipy.sparse.linalg as sla, hessop
    >>> A = hessop.full_rank(sla.aslinearoperator(np.diag([4.0, 3.0, 1.0, 0.5])), k=2)
    >>> round(A.tail, 10)
    3.0
    """
    from hessop.lowrank.operators import FullRankOperator

    values, vectors = _top_eigenpairs(op, k, method, options)
    return FullRankOperator(vectors, values, tail)


def _top_eigenpairs(op: Any, k: int, method: str, options: dict) -> tuple[np.ndarray, np.ndarray]:
    """`eigen`, or for k = P the exact decomposition of the (guarded) dense matrix."""
    size = int(op.shape[0])
    if check_k(k, size, allow_full=True) < size:
        return eigen(op, k, method=method, **options)
    dense = np.asarray(dense_from_operator(op, max_params=DEFAULT_MAX_DENSE, block_size=None), dtype=np.float64)
    values, vectors = np.linalg.eigh((dense + dense.T) / 2)
    return values[::-1].astype(op.dtype), vectors[:, ::-1].astype(op.dtype)
