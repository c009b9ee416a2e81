"""Matrix-free estimators on symmetric operators: trace, diagonal, row sums, spectral density.

Every estimator asks the operator for blocks (``matmat``), so a data-pass
operator pays one pass over the data per block, not per probe vector.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from hessop._progress import check_progress, product_progress
from hessop._validation import check_positive_int
from hessop.dense.columns import DEFAULT_MAX_DENSE, column_parts, lower_block_product

__all__ = ["trace", "diagonal", "row_sums", "spectral_density", "SpectralDensity"]

TRACE_METHODS = ("hutchinson", "hutch++")
DIAGONAL_METHODS = ("exact", "mc", "hutchinson")


def _square_size(op: Any) -> int:
    shape = getattr(op, "shape", None)
    if shape is None or len(shape) != 2 or shape[0] != shape[1]:
        msg = f"op: expected a square LinearOperator, got shape {shape}."
        raise ValueError(msg)
    return int(shape[0])


def _rademacher(rng: np.random.Generator, size: int, count: int, dtype: Any) -> np.ndarray:
    return rng.choice(np.array([-1.0, 1.0]), size=(size, count)).astype(dtype)


def _block_apply(op: Any, block: np.ndarray, block_size: int) -> np.ndarray:
    return np.concatenate([op.matmat(block[:, i : i + block_size]) for i in range(0, block.shape[1], block_size)], axis=1)


def trace(
    op: Any,
    *,
    method: str = "hutch++",
    num_matvecs: int = 60,
    seed: int | None = 0,
    block_size: int = 32,
    progress: bool = False,
) -> float:
    r"""Stochastic estimate of tr(A) from ``num_matvecs`` products.

    Parameters
    ----------
    op : LinearOperator
        Square (symmetric for Hutch++).
    method : {"hutchinson", "hutch++"}
        Hutchinson: mean of zᵀAz over Rademacher z. Hutch++ (Meyer et al.
        2021): exact trace on a sketched top subspace (2/3 of the products) plus
        Hutchinson on the rest; its error falls as 1/num_matvecs instead of
        1/√num_matvecs when the spectrum decays.
    num_matvecs : int
        Total operator-vector products (≥ 3 for Hutch++).
    seed : int or None
        Random seed.
    block_size : int
        Vectors per ``matmat`` (per data pass for hessop operators).
    progress : bool
        Show one progress bar counting the operator's products (hessop's
        data-pass operators).

    Returns
    -------
    float

    Examples
    --------
    >>> import numpy as np, scipy.sparse.linalg as sla, hessop
    >>> A = sla.aslinearoperator(np.diag(np.arange(1.0, 51.0)))
    >>> abs(hessop.trace(A, num_matvecs=90) - 1275.0) < 50
    True
    """
    if method not in TRACE_METHODS:
        msg = f"method: expected one of {TRACE_METHODS}, got {method!r}."
        if method == "exact":
            msg += " The exact trace is hessop.diagonal(op, method='exact').sum() (P products, in blocks)."
        raise ValueError(msg)
    size = _square_size(op)
    num_matvecs = check_positive_int(num_matvecs, "num_matvecs", 3 if method == "hutch++" else 1)
    block_size = check_positive_int(block_size, "block_size")
    progress = check_progress(progress)
    with product_progress(op, "trace", total=num_matvecs, enabled=progress):
        rng = np.random.default_rng(seed)
        dtype = np.float64
        if method == "hutchinson":
            probes = _rademacher(rng, size, num_matvecs, dtype)
            return float(np.einsum("ij,ij->", probes, _block_apply(op, probes, block_size)) / num_matvecs)
        sketch_size = min((num_matvecs + 2) // 3, size)
        residual_probes = max(num_matvecs - 2 * sketch_size, 0)
        basis = np.linalg.qr(_block_apply(op, _rademacher(rng, size, sketch_size, dtype), block_size))[0]
        estimate = float(np.einsum("ij,ij->", basis, _block_apply(op, basis, block_size)))
        if residual_probes:
            probes = _rademacher(rng, size, residual_probes, dtype)
            probes -= basis @ (basis.T @ probes)
            estimate += float(np.einsum("ij,ij->", probes, _block_apply(op, probes, block_size)) / residual_probes)
        return estimate


def diagonal(
    op: Any,
    *,
    method: str = "exact",
    num_matvecs: int = 100,
    seed: int | None = 0,
    block_size: int = 64,
    max_params: int = DEFAULT_MAX_DENSE,
    progress: bool = False,
    mc_samples: int = 1,
) -> np.ndarray:
    r"""Diagonal of a square operator.

    Parameters
    ----------
    op : LinearOperator
    method : {"exact", "mc", "hutchinson"}
        ``"exact"``: for a `GGNOperator`, one data pass that backpropagates
        the C columns of a square root of the loss's Hessian in the C outputs
        (:math:`\mathrm{diag}\,G = \sum_n \sum_c (J_n^\top s_{nc})^2`); for an
        `OPGOperator`, the squared per-example gradients; for a
        `KroneckerOperator` (KFAC), its own formula. Any other operator:
        products with blocks of unit vectors, one block per ``matmat``
        (P / block_size passes over the data), refused above ``max_params``.
        ``"mc"`` (GGN): ``mc_samples`` random combinations of those columns
        per example, seeded, in place of all C; unbiased. ``"hutchinson"``:
        E[z ∘ Az] over ``num_matvecs`` Rademacher probes (Bekas et al. 2007).
    num_matvecs, seed, block_size
        Probes, random seed and vectors per ``matmat``.
    max_params : int
        Size limit for ``"exact"``; raise it deliberately.
    progress : bool
        Show one progress bar counting the operator's products.
    mc_samples : int
        Samples per example for ``"mc"``.

    Returns
    -------
    numpy.ndarray, shape (P,)

    Examples
    --------
    >>> import numpy as np, scipy.sparse.linalg as sla, hessop
    >>> hessop.diagonal(sla.aslinearoperator(np.array([[2.0, 1.0], [1.0, 3.0]])))
    array([2., 3.])
    """
    if method not in DIAGONAL_METHODS:
        msg = f"method: expected one of {DIAGONAL_METHODS}, got {method!r}."
        raise ValueError(msg)
    mc_samples = check_positive_int(mc_samples, "mc_samples")
    fast = getattr(op, "_fast_diagonal", None)
    if method in ("exact", "mc") and fast is not None:
        if seed is None:
            seed = int(np.random.SeedSequence().generate_state(1)[0] >> 1)
        return fast(method, mc_samples, seed)
    if method == "mc":
        msg = (
            f"method: 'mc' samples the loss's Hessian in the outputs, so it needs a GGNOperator (or an OPG or KFAC "
            f"operator), got {type(op).__name__}; use 'exact' or 'hutchinson'."
        )
        raise ValueError(msg)
    size = _square_size(op)
    block_size = check_positive_int(block_size, "block_size")
    progress = check_progress(progress)
    total = size if method == "exact" else num_matvecs
    with product_progress(op, "diagonal", total=total, enabled=progress):
        if method == "exact":
            if size > max_params:
                msg = (
                    f"diagonal: method='exact' needs {size} unit-vector products (P={size} > max_params="
                    f"{max_params}); use method='hutchinson' or raise max_params."
                )
                raise ValueError(msg)
            out = np.empty(size)
            for part_start, part_stop in column_parts(op):
                for start in range(part_start, part_stop, block_size):
                    stop = min(start + block_size, part_stop)
                    row_start, block = lower_block_product(op, start, stop)
                    out[start:stop] = np.diagonal(block[start - row_start : stop - row_start])
            return out
        num_matvecs = check_positive_int(num_matvecs, "num_matvecs")
        probes = _rademacher(np.random.default_rng(seed), size, num_matvecs, np.float64)
        return np.mean(probes * _block_apply(op, probes, block_size), axis=1)


def row_sums(op: Any) -> np.ndarray:
    r"""Row sums A·1 of a square operator, for one product (Dangel's trick for Hessians).

    Examples
    --------
    >>> import numpy as np, scipy.sparse.linalg as sla, hessop
    >>> hessop.row_sums(sla.aslinearoperator(np.array([[2.0, 1.0], [1.0, 3.0]])))
    array([3., 4.])
    """
    size = _square_size(op)
    return np.asarray(op.matvec(np.ones(size, dtype=op.dtype)), dtype=np.float64)


@dataclass(frozen=True)
class SpectralDensity:
    """Result of `spectral_density`.

    Attributes
    ----------
    grid : numpy.ndarray
        Points where the density is evaluated.
    density : numpy.ndarray
        Gaussian-smoothed density on ``grid``; integrates to 1 (trapezoid rule).
    nodes : numpy.ndarray, shape (num_probes, num_lanczos)
        Ritz values of each probe's Lanczos run.
    weights : numpy.ndarray, shape (num_probes, num_lanczos)
        Quadrature weights (squared first components); each row sums to 1.
    sigma : float
        Gaussian smoothing width.
    """

    grid: np.ndarray
    density: np.ndarray
    nodes: np.ndarray
    weights: np.ndarray
    sigma: float

    def __str__(self) -> str:
        mass = self.weights.mean(axis=0) if self.weights.ndim == 2 else self.weights
        low, high = float(self.nodes.min()), float(self.nodes.max())
        # Lanczos places nodes of a PSD operator's zero eigenvalues at ±round-off
        # (-7e-9 for a GGN): only nodes below -σ count as negative mass.
        negative = float(np.sum(self.weights[self.nodes < -self.sigma]) / self.weights.shape[0])
        return (
            f"spectral density: support ≈ [{low:.4g}, {high:.4g}], {negative:.1%} of the mass below -σ\n"
            f"  ({mass.size} Lanczos nodes × {self.weights.shape[0]} probes, σ = {self.sigma:.3g})"
        )


def spectral_density(
    op: Any,
    *,
    num_lanczos: int = 40,
    num_probes: int = 8,
    seed: int | None = 0,
    num_points: int = 1000,
    sigma: float | None = None,
    progress: bool = False,
) -> SpectralDensity:
    r"""Spectral density by stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017).

    For each of ``num_probes`` random unit vectors, ``num_lanczos`` Lanczos
    steps (fully re-orthogonalised) give a tridiagonal matrix whose eigenvalues
    (nodes) and squared first eigenvector components (weights) are a Gauss
    quadrature of the spectral measure seen by that probe. The probes run side
    by side, so each Lanczos step is one ``matmat`` of ``num_probes`` vectors:
    one pass over the data per step for a hessop operator.

    Parameters
    ----------
    op : LinearOperator
        Symmetric.
    num_lanczos : int
        Lanczos steps per probe (≤ P).
    num_probes : int
        Random probes.
    seed : int or None
        Random seed.
    num_points : int
        Grid size.
    sigma : float, optional
        Gaussian smoothing width; default 1% of the spectral range.
    progress : bool
        Show one progress bar counting the operator's products.

    Returns
    -------
    SpectralDensity

    Examples
    --------
    >>> import numpy as np, scipy.sparse.linalg as sla, hessop
    >>> A = sla.aslinearoperator(np.diag(np.r_[np.zeros(50), np.full(50, 3.0)]))
    >>> result = hessop.spectral_density(A, num_lanczos=10, num_probes=4)
    >>> near_three = np.abs(result.grid - 3.0) < 0.3
    >>> round(float(np.trapezoid(result.density * near_three, result.grid)), 1)
    0.5
    """
    size = _square_size(op)
    num_lanczos = min(check_positive_int(num_lanczos, "num_lanczos"), size)
    num_probes = check_positive_int(num_probes, "num_probes")
    num_points = check_positive_int(num_points, "num_points", 2)
    rng = np.random.default_rng(seed)
    start = _rademacher(rng, size, num_probes, np.float64) / np.sqrt(size)
    with product_progress(op, "spectral_density", total=num_lanczos * num_probes, enabled=check_progress(progress)):
        nodes, weights = _block_lanczos_quadrature(op, start, num_lanczos)
    low, high = float(nodes.min()), float(nodes.max())
    spread = max(high - low, abs(high), 1e-12)
    if sigma is None:
        sigma = 0.01 * spread
    elif not (np.isfinite(sigma) and sigma > 0):
        msg = f"sigma: expected a positive float, got {sigma!r}."
        raise ValueError(msg)
    grid = np.linspace(low - 5 * sigma, high + 5 * sigma, num_points)
    kernel = np.exp(-0.5 * ((grid[:, None] - nodes.reshape(-1)[None, :]) / sigma) ** 2) / (sigma * np.sqrt(2 * np.pi))
    density = kernel @ weights.reshape(-1) / num_probes
    density /= np.trapezoid(density, grid)  # remove the grid's truncation and discretisation error
    return SpectralDensity(grid=grid, density=density, nodes=nodes, weights=weights, sigma=float(sigma))


def _block_lanczos_quadrature(op: Any, start: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Independent Lanczos runs, one per column of ``start``, sharing each matmat."""
    size, probes = start.shape
    basis = np.zeros((steps, size, probes))
    alpha = np.zeros((probes, steps))
    beta = np.zeros((probes, steps))
    current = start / np.linalg.norm(start, axis=0)
    used = np.full(probes, steps)
    for j in range(steps):
        basis[j] = current
        w = np.asarray(op.matmat(current.astype(op.dtype)), dtype=np.float64)
        alpha[:, j] = np.einsum("ij,ij->j", current, w)
        # Full re-orthogonalisation (twice) against all previous vectors, per probe.
        for _ in range(2):
            w -= np.einsum("kip,kp->ip", basis[: j + 1], np.einsum("kip,ip->kp", basis[: j + 1], w))
        norms = np.linalg.norm(w, axis=0)
        beta[:, j] = norms
        # A probe whose Krylov space is exhausted stops: its quadrature is exact already.
        done = norms <= 1e-10 * np.maximum(np.abs(alpha[:, j]), 1.0)
        used = np.where(done & (used == steps), j + 1, used)
        current = np.where(done[None, :], 0.0, w / np.where(norms > 0, norms, 1.0))
    nodes = np.zeros((probes, steps))
    weights = np.zeros((probes, steps))
    for p in range(probes):
        m = used[p]
        tridiagonal = np.diag(alpha[p, :m]) + np.diag(beta[p, : m - 1], 1) + np.diag(beta[p, : m - 1], -1)
        values, vectors = np.linalg.eigh(tridiagonal)
        nodes[p, :m] = values
        weights[p, :m] = vectors[0] ** 2
        nodes[p, m:] = values[-1]  # padding with zero weight
    return nodes, weights
