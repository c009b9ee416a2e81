r"""Posterior structures of a Laplace approximation: the precision :math:`\Lambda = s\,C + \mathrm{diag}(\tau)`.

C is the curvature of the mean loss (GGN, Hessian, OPG, KFAC, EKFAC or its
diagonal), s the likelihood's scale (N / (σ² T) for a Gaussian, N / T
otherwise) and τ a prior precision per parameter group (one per layer, or
one for all). Each structure keeps C in a form that gives Λ's
log-determinant, inverse and inverse square root exactly, for any s and τ,
without re-reading the data:

* `EigenStructure`: C = Q diag(λ) Qᵀ from a dense eigendecomposition
  (``"full"``) or its top k eigenpairs (``"lowrank"``, C = 0 elsewhere);
* `KronStructure`: C a `KroneckerOperator`, each block diagonalised by its
  factors' eigenvectors (``"kron"``, ``"ekfac"``);
* `DiagStructure`: C = diag(d) (``"diag"``).

numpy only: no TensorFlow here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.sparse.linalg import LinearOperator

from hessop.lowrank.operators import FullRankOperator
from hessop.structured.factored import EigenKron, KroneckerOperator

__all__ = ["DiagStructure", "DiagonalOperator", "EigenStructure", "KronStructure", "clip_round_off"]

# Blocks whose prior is not constant (a normalisation layer's γ and β in one
# block) are diagonalised densely up to this many parameters.
_MAX_DENSE_BLOCK = 4096


def clip_round_off(values: np.ndarray, dtype: Any) -> np.ndarray:
    """Eigenvalues of a PSD curvature with round-off: those above −(P·eps·max|λ|) set to ≥ 0.

    A float32 GGN has eigenvalues of about −1e-7·max|λ| that are round-off,
    not indefiniteness; anything more negative is kept (and then refused).
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return values
    eps = np.finfo(np.dtype(dtype) if np.dtype(dtype).kind == "f" else np.float64).eps
    tolerance = 10 * np.sqrt(values.size) * eps * float(np.max(np.abs(values)))
    return np.where(values >= -tolerance, np.maximum(values, 0.0), values)


class DiagonalOperator(LinearOperator):
    """diag(values) as a LinearOperator (numpy in, numpy out)."""

    _symmetric = True

    def __init__(self, values: np.ndarray) -> None:
        self.values = np.asarray(values, dtype=np.float64)
        super().__init__(dtype=np.float64, shape=(self.values.size, self.values.size))

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        return self.values * np.ravel(x)

    def _matmat(self, X: np.ndarray) -> np.ndarray:
        return self.values[:, None] * X

    def _adjoint(self) -> DiagonalOperator:
        return self

    def diagonal(self) -> np.ndarray:
        return self.values.copy()

    def trace(self) -> float:
        return float(np.sum(self.values))

    def logdet(self) -> float:
        return float(np.sum(np.log(self.values)))

    def to_dense(self) -> np.ndarray:
        return np.diag(self.values)


class _Structure:
    """What a Laplace posterior needs of its curvature; ``tau`` is per group, ``groups`` index arrays."""

    num_params: int
    groups: list[np.ndarray]

    def _tau_per_parameter(self, tau: np.ndarray) -> np.ndarray:
        out = np.empty(self.num_params)
        for group, value in zip(self.groups, tau):
            out[group] = value
        return out

    def smallest(self) -> float:
        """The smallest eigenvalue of C."""
        raise NotImplementedError

    def logdet(self, scale: float, tau: np.ndarray, derivatives: bool = True) -> tuple[float, float, np.ndarray]:
        """log det Λ, its derivative in s, and in each group's τ (NaN unless ``derivatives``)."""
        raise NotImplementedError

    def operator(self, scale: float, tau: np.ndarray, power: float) -> LinearOperator:
        """Λ^power (power 1, −1 or −½) as an operator."""
        raise NotImplementedError


class EigenStructure(_Structure):
    """C = Q diag(λ) Qᵀ with Q (P, k) orthonormal; k < P is a low-rank C (zero elsewhere)."""

    def __init__(self, values: np.ndarray, vectors: np.ndarray, groups: Sequence[np.ndarray]) -> None:
        self.values = np.asarray(values, dtype=np.float64)
        self.vectors = np.asarray(vectors, dtype=np.float64)
        self.num_params = self.vectors.shape[0]
        self.groups = [np.asarray(g) for g in groups]
        self._cache: tuple[Any, Any] | None = None

    @property
    def rank(self) -> int:
        return self.values.size

    def smallest(self) -> float:
        low = float(self.values.min())
        return min(low, 0.0) if self.rank < self.num_params else low

    def _eigen(self, scale: float, tau: np.ndarray) -> tuple[np.ndarray, np.ndarray, float | None]:
        """Λ's eigenvectors, eigenvalues and the value on the complement of Q (None when Q is complete)."""
        if np.all(tau == tau[0]):
            tail = float(tau[0]) if self.rank < self.num_params else None
            return self.vectors, scale * self.values + tau[0], tail
        if self.rank < self.num_params:
            msg = (
                "prior_precision: one τ per layer needs structure='full', 'kron', 'ekfac' or 'diag'; "
                "a low-rank curvature's posterior is exact only for a scalar τ."
            )
            raise ValueError(msg)
        key = (scale, tuple(tau))
        if self._cache is None or self._cache[0] != key:
            precision = (self.vectors * (scale * self.values)) @ self.vectors.T
            precision[np.diag_indices_from(precision)] += self._tau_per_parameter(tau)
            values, vectors = np.linalg.eigh((precision + precision.T) / 2)
            self._cache = (key, (vectors, values))
        vectors, values = self._cache[1]
        return vectors, values, None

    def logdet(self, scale: float, tau: np.ndarray, derivatives: bool = True) -> tuple[float, float, np.ndarray]:
        vectors, values, tail = self._eigen(scale, tau)
        logdet = float(np.sum(np.log(values)))
        if not derivatives:
            extra = 0.0 if tail is None else (self.num_params - self.rank) * np.log(tail)
            return logdet + extra, np.nan, np.full(len(self.groups), np.nan)
        inverse_diagonal = (vectors**2) @ (1.0 / values)
        if tail is not None:
            logdet += (self.num_params - self.rank) * np.log(tail)
            inverse_diagonal += (1.0 - np.sum(self.vectors**2, axis=1)) / tail
        if vectors is self.vectors:  # Λ shares C's eigenvectors
            d_scale = float(np.sum(self.values / values))
        else:  # tr(Λ⁻¹ C) = Σ_j (1/w_j) Σ_k (V_jᵀ Q_k)² λ_k
            overlap = vectors.T @ self.vectors
            d_scale = float(np.sum((overlap**2 @ self.values) / values))
        d_tau = np.array([np.sum(inverse_diagonal[group]) for group in self.groups])
        return logdet, d_scale, d_tau

    def operator(self, scale: float, tau: np.ndarray, power: float) -> FullRankOperator:
        vectors, values, tail = self._eigen(scale, tau)
        precision = FullRankOperator(vectors, values, tail=values.min() if tail is None else tail, check_orthonormal=False)
        return precision if power == 1 else precision.power(power)


class KronStructure(_Structure):
    """C a `KroneckerOperator`: each block (U_A ⊗ U_G) diag(λ) (U_A ⊗ U_G)ᵀ, τ constant on it or dense."""

    def __init__(self, curvature: KroneckerOperator, groups: Sequence[np.ndarray], round_off_dtype: Any = None) -> None:
        self.curvature = curvature
        self.num_params = curvature.shape[0]
        self.groups = [np.asarray(g) for g in groups]
        cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.eigen = [block.eigen(cache) for block in curvature.blocks]
        if round_off_dtype is not None:  # PSD factors: their eigendecompositions' round-off is not indefiniteness
            self.eigen = [EigenKron(e.Ua, e.Ug, clip_round_off(e.values, round_off_dtype)) for e in self.eigen]
        owner = np.empty(self.num_params, dtype=np.int64)
        for number, group in enumerate(self.groups):
            owner[group] = number
        # Per block: the group of each of its entries (row-major, as the block reads them).
        self._owners = [owner[np.arange(self.num_params)[index]] for index in curvature._indices]

    def smallest(self) -> float:
        return float(min(np.min(e.values) for e in self.eigen))

    def _blocks(self, scale: float, tau: np.ndarray) -> list[tuple[EigenKron, np.ndarray | None]]:
        """Per block: Λ's block in eigen-form, and for a densely diagonalised one C's block in that basis."""
        out = []
        for name, block, eigen, owners in zip(self.curvature.names, self.curvature.blocks, self.eigen, self._owners):
            prior = tau[owners]
            if np.all(prior == prior[0]):
                out.append((EigenKron(eigen.Ua, eigen.Ug, scale * eigen.values + prior[0]), None))
                continue
            if owners.size > _MAX_DENSE_BLOCK:
                msg = (
                    f"prior_precision: block {name!r} spans several layers' parameters ({owners.size}); "
                    "one τ per layer needs such blocks small. Use a scalar τ."
                )
                raise ValueError(msg)
            dense = block.dense()
            values, vectors = np.linalg.eigh(scale * dense + np.diag(prior))
            out.append((EigenKron(np.ones((1, 1)), vectors, values[None, :]), vectors.T @ dense @ vectors))
        return out

    def logdet(self, scale: float, tau: np.ndarray, derivatives: bool = True) -> tuple[float, float, np.ndarray]:
        logdet, d_scale, d_tau = 0.0, 0.0, np.zeros(len(self.groups))
        for (block, rotated), eigen, owners in zip(self._blocks(scale, tau), self.eigen, self._owners):
            logdet += float(np.sum(np.log(block.values)))
            if not derivatives:
                continue
            inverse = EigenKron(block.Ua, block.Ug, 1.0 / block.values)
            if rotated is None:
                d_scale += float(np.sum(eigen.values / block.values))
            else:
                d_scale += float(np.sum(np.diag(rotated) / block.values.ravel()))
            d_tau += np.bincount(owners, weights=inverse.diagonal(), minlength=d_tau.size)
        if not derivatives:
            return logdet, np.nan, np.full(len(self.groups), np.nan)
        return logdet, d_scale, d_tau

    def operator(self, scale: float, tau: np.ndarray, power: float) -> KroneckerOperator:
        blocks = [EigenKron(b.Ua, b.Ug, b.values**power) for b, _ in self._blocks(scale, tau)]
        return KroneckerOperator(blocks, self.curvature._indices, self.num_params, names=self.curvature.names)


class DiagStructure(_Structure):
    """C = diag(d)."""

    def __init__(self, values: np.ndarray, groups: Sequence[np.ndarray]) -> None:
        self.values = np.asarray(values, dtype=np.float64)
        self.num_params = self.values.size
        self.groups = [np.asarray(g) for g in groups]

    def smallest(self) -> float:
        return float(self.values.min())

    def logdet(self, scale: float, tau: np.ndarray, derivatives: bool = True) -> tuple[float, float, np.ndarray]:
        values = scale * self.values + self._tau_per_parameter(tau)
        d_tau = np.array([np.sum(1.0 / values[group]) for group in self.groups])
        return float(np.sum(np.log(values))), float(np.sum(self.values / values)), d_tau

    def operator(self, scale: float, tau: np.ndarray, power: float) -> DiagonalOperator:
        return DiagonalOperator((scale * self.values + self._tau_per_parameter(tau)) ** power)
