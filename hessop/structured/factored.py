r"""Block-diagonal operators with Kronecker-factored blocks: the algebra of KFAC and EKFAC (numpy only).

A block acts on the parameters its index lists, read as an (a, g) matrix X
in row-major order: a Keras kernel of shape (d_in, d_out), a Conv2D kernel
reshaped to (kh·kw·c_in, c_out), or a kernel with its bias as a last row.
In that order

.. math:: (A \otimes G)\,\mathrm{vec}(X) = \mathrm{vec}(A X G)

for symmetric A (a × a) and G (g × g): A is the left factor because a Keras
kernel's rows are its inputs (PyTorch's weights are (out, in), and its
blocks G ⊗ A). A block comes in one of two forms:

- `Kron`: the factors themselves; A may be a vector, a diagonal (an
  Embedding's token counts). A small exact block M is ``Kron([[1]], M)``.
- `EigenKron`: :math:`(U_A \otimes U_G)\,\mathrm{diag}(\mathrm{vec}\,\Lambda)\,(U_A \otimes U_G)^\top`
  with Λ of shape (a, g): the factors' eigenbases with their products of
  eigenvalues (a damped exact inverse) or refitted ones (EKFAC).

Every quantity below is exact for the operator itself: products, trace,
diagonal, Frobenius norm and log-determinant cost per block O(a³ + g³) at
most, and never a P × P matrix.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
from scipy.linalg import cho_factor, cho_solve, eigh
from scipy.sparse.linalg import LinearOperator

from hessop._validation import check_finite_array
from hessop.dense.columns import DEFAULT_MAX_DENSE
from hessop.lowrank.operators import write_archive

__all__ = ["EigenKron", "Kron", "KroneckerOperator", "from_entries"]

FORMAT_NAME = "hessop.kronecker_operator"
FORMAT_VERSION = 1
HEURISTICS = (None, "pi", "exact")


def _check_damping(damping: Any) -> float:
    if isinstance(damping, bool) or not isinstance(damping, (int, float, np.integer, np.floating)):
        msg = f"damping: expected a non-negative number, got {type(damping).__name__}."
        raise TypeError(msg)
    damping = float(damping)
    if not np.isfinite(damping) or damping < 0:
        msg = f"damping: expected a finite number >= 0, got {damping}."
        raise ValueError(msg)
    return damping


def _symmetric_eigh(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    values, vectors = eigh((matrix + matrix.T) / 2)
    return values, vectors


@dataclass(frozen=True)
class Kron:
    """A block A ⊗ G: A of shape (a, a), or (a,) for a diagonal; G of shape (g, g); both symmetric."""

    A: np.ndarray
    G: np.ndarray

    @property
    def dims(self) -> tuple[int, int]:
        return self.A.shape[0], self.G.shape[0]

    def apply(self, X: np.ndarray) -> np.ndarray:
        """A X G for X of shape (a, g, k)."""
        Y = np.matmul(X.transpose(2, 0, 1), self.G)  # (k, a, g): X_k G
        if self.A.ndim == 1:
            Y *= self.A[:, None]
        else:
            Y = np.matmul(self.A, Y)
        return Y.transpose(1, 2, 0)

    def _diag_A(self) -> np.ndarray:
        return self.A if self.A.ndim == 1 else np.diag(self.A)

    def diagonal(self) -> np.ndarray:
        return np.outer(self._diag_A(), np.diag(self.G)).ravel()

    def trace(self) -> float:
        return float(np.sum(self._diag_A()) * np.trace(self.G))

    def frobenius2(self) -> float:
        a2 = np.sum(self.A**2)
        return float(a2 * np.sum(self.G**2))

    def eigen(self, cache: dict[int, tuple[np.ndarray, np.ndarray]] | None = None) -> EigenKron:
        """The block in eigen-form; ``cache`` (by factor identity) shares a factor's decomposition between blocks."""

        def decompose(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            if cache is None:
                return _symmetric_eigh(matrix)
            if id(matrix) not in cache:  # a layer's kernel and bias blocks share their G
                cache[id(matrix)] = _symmetric_eigh(matrix)
            return cache[id(matrix)]

        if self.A.ndim == 1:
            Ua, la = None, self.A
        else:
            la, Ua = decompose(self.A)
        lg, Ug = decompose(self.G)
        return EigenKron(Ua, Ug, np.outer(la, lg))

    def dense(self) -> np.ndarray:
        A = np.diag(self.A) if self.A.ndim == 1 else self.A
        return np.kron(A, self.G)

    def astype(self, dtype: Any) -> Kron:
        return Kron(self.A.astype(dtype), self.G.astype(dtype))

    def damped_inverse(self, damping: float, heuristic: str | None) -> Kron | EigenKron:
        """(A ⊗ G + δI)⁻¹ ("exact"), or (A + δ_A I)⁻¹ ⊗ (G + δ_G I)⁻¹ with δ_A δ_G = δ."""
        if heuristic == "exact":
            return self.eigen().damped_inverse(damping)
        root = np.sqrt(damping)
        pi = 1.0
        if heuristic == "pi":
            a, g = self.dims
            mean_a, mean_g = np.sum(self._diag_A()) / a, np.trace(self.G) / g
            if mean_a > 0 and mean_g > 0:
                pi = float(np.sqrt(mean_a / mean_g))
        return Kron(_damped_inverse(self.A, pi * root, "A"), _damped_inverse(self.G, root / pi, "G"))


def _damped_inverse(factor: np.ndarray, damping: float, name: str) -> np.ndarray:
    if factor.ndim == 1:
        shifted = factor + damping
        if np.any(shifted <= 0):
            msg = f"damping: the factor {name} + {damping:.3g}·I is singular; pass a larger damping."
            raise ValueError(msg)
        return 1.0 / shifted
    try:
        factors = cho_factor(factor + damping * np.eye(len(factor)), lower=True)
    except np.linalg.LinAlgError:
        msg = f"damping: the factor {name} + {damping:.3g}·I is not positive definite; pass a larger damping."
        raise ValueError(msg) from None
    inverse = cho_solve(factors, np.eye(len(factor)))
    return (inverse + inverse.T) / 2


@dataclass(frozen=True)
class EigenKron:
    """A block (U_A ⊗ U_G) diag(vec Λ) (U_A ⊗ U_G)ᵀ; ``Ua=None`` is the identity."""

    Ua: np.ndarray | None
    Ug: np.ndarray
    values: np.ndarray  # (a, g)

    @property
    def dims(self) -> tuple[int, int]:
        return self.values.shape

    def apply(self, X: np.ndarray) -> np.ndarray:
        Y = np.matmul(X.transpose(2, 0, 1), self.Ug)  # (k, a, g)
        if self.Ua is not None:
            Y = np.matmul(self.Ua.T, Y)
        Y *= self.values
        if self.Ua is not None:
            Y = np.matmul(self.Ua, Y)
        Y = np.matmul(Y, self.Ug.T)
        return Y.transpose(1, 2, 0)

    def diagonal(self) -> np.ndarray:
        left = self.values if self.Ua is None else (self.Ua**2) @ self.values
        return (left @ (self.Ug**2).T).ravel()

    def trace(self) -> float:
        return float(np.sum(self.values))

    def frobenius2(self) -> float:
        return float(np.sum(self.values**2))

    def eigen(self, cache: dict[int, tuple[np.ndarray, np.ndarray]] | None = None) -> EigenKron:
        return self

    def dense(self) -> np.ndarray:
        Ua = np.eye(self.values.shape[0]) if self.Ua is None else self.Ua
        U = np.kron(Ua, self.Ug)
        return (U * self.values.ravel()) @ U.T

    def astype(self, dtype: Any) -> EigenKron:
        Ua = None if self.Ua is None else self.Ua.astype(dtype)
        return EigenKron(Ua, self.Ug.astype(dtype), self.values.astype(dtype))

    def damped_inverse(self, damping: float, heuristic: str | None = None) -> EigenKron:
        shifted = self.values + damping
        if np.any(shifted <= 0):
            msg = (
                f"damping: the block plus {damping:.3g}·I is singular (its smallest eigenvalue is "
                f"{shifted.min():.3g}); pass a larger damping."
            )
            raise ValueError(msg)
        return EigenKron(self.Ua, self.Ug, 1.0 / shifted)


Block = Kron | EigenKron


def _as_index(index: Any) -> slice | np.ndarray:
    if isinstance(index, slice):
        return index
    index = np.asarray(index, dtype=np.int64).ravel()
    if index.size and np.array_equal(index, np.arange(index[0], index[0] + index.size)):
        return slice(int(index[0]), int(index[0]) + index.size)
    return index


def _index_array(index: slice | np.ndarray) -> np.ndarray:
    return np.arange(index.start, index.stop) if isinstance(index, slice) else index


class KroneckerOperator(LinearOperator):
    r"""A symmetric block-diagonal operator whose blocks are Kronecker-factored, over a flat parameter vector.

    The operator of `KFACOperator` and `EKFACOperator`, and of their
    inverses; `hessop.load` returns one. Products cost a few small GEMMs per
    block, and every method below is exact for the operator.

    Parameters
    ----------
    blocks : sequence of `Kron` or `EigenKron`
        One per block.
    indices : sequence of int arrays
        The flat parameters of each block, read as its (a, g) matrix in
        row-major order. Together they cover 0 … P−1 exactly once.
    size : int
        P.
    names : sequence of str, optional
        A name per block (the layer's).
    dtype : numpy dtype, optional
        Of the products' results (float64 by default); blocks compute in float64.

    Examples
    --------
    >>> import numpy as np
    >>> from hessop.structured.factored import Kron, KroneckerOperator
    >>> A, G = np.array([[2.0, 1.0], [1.0, 2.0]]), np.diag([1.0, 3.0])
    >>> K = KroneckerOperator([Kron(A, G)], [np.arange(4)], 4)
    >>> bool(np.allclose(K.to_dense(), np.kron(A, G))), K.trace()
    (True, 16.0)
    >>> Kinv = K.inverse(damping=0.0, heuristic="exact")
    >>> bool(np.allclose(Kinv.to_dense(), np.linalg.inv(np.kron(A, G))))
    True
    """

    _symmetric = True

    def __init__(
        self,
        blocks: Sequence[Block],
        indices: Sequence[Any],
        size: int,
        *,
        names: Sequence[str] | None = None,
        dtype: Any = np.float64,
    ) -> None:
        blocks, indices = list(blocks), list(indices)
        if len(blocks) != len(indices):
            msg = f"indices: expected one index per block ({len(blocks)}), got {len(indices)}."
            raise ValueError(msg)
        names = [f"block {i}" for i in range(len(blocks))] if names is None else [str(n) for n in names]
        if len(names) != len(blocks):
            msg = f"names: expected one name per block ({len(blocks)}), got {len(names)}."
            raise ValueError(msg)
        seen = np.zeros(int(size), dtype=np.int64)
        self._indices = []
        for name, block, index in zip(names, blocks, indices):
            if not isinstance(block, (Kron, EigenKron)):
                msg = f"blocks: expected Kron or EigenKron blocks, got {type(block).__name__} ({name})."
                raise TypeError(msg)
            a, g = block.dims
            index = _as_index(index)
            flat = _index_array(index)
            if flat.size != a * g:
                msg = f"indices: {name} has {a} × {g} = {a * g} entries but its index lists {flat.size}."
                raise ValueError(msg)
            if flat.size and (flat.min() < 0 or flat.max() >= size):
                msg = f"indices: {name} lists parameters outside 0 … {size - 1}."
                raise ValueError(msg)
            seen[flat] += 1
            self._indices.append(index)
        if np.any(seen != 1):
            position = int(np.flatnonzero(seen != 1)[0])
            msg = f"indices: each parameter must belong to exactly one block; parameter {position} is in {seen[position]}."
            raise ValueError(msg)
        self.blocks = blocks
        self.names = names
        super().__init__(dtype=np.dtype(dtype), shape=(int(size), int(size)))

    # -- products ----------------------------------------------------------------
    def _matmat(self, X: np.ndarray) -> np.ndarray:
        # Products run in the operator's dtype: a float32 operator (a float32
        # model's) multiplies float32 copies of its factors, twice as fast.
        blocks = self._compute_blocks()
        X = np.asarray(X, dtype=np.result_type(self.dtype, X.dtype if X.dtype.kind == "f" else np.float64))
        out = np.empty((self.shape[0], X.shape[1]), dtype=X.dtype)
        for block, index in zip(blocks if X.dtype == self.dtype else self.blocks, self._indices):
            a, g = block.dims
            out[index] = block.apply(X[index].reshape(a, g, -1)).reshape(a * g, -1)
        return out.astype(self.dtype, copy=False)

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        return self._matmat(np.reshape(x, (-1, 1)))[:, 0]

    def _compute_blocks(self) -> list[Block]:
        if self.dtype == np.float64:
            return self.blocks
        if getattr(self, "_cast_blocks", None) is None:
            self._cast_blocks = [block.astype(self.dtype) for block in self.blocks]
        return self._cast_blocks

    def _adjoint(self) -> KroneckerOperator:
        return self

    def _transpose(self) -> KroneckerOperator:
        return self

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:
        return self._matvec(x)

    def _rmatmat(self, X: np.ndarray) -> np.ndarray:
        return self._matmat(X)

    # -- exact quantities --------------------------------------------------------
    def trace(self) -> float:
        """tr(K) = Σ tr(A)·tr(G) over the blocks."""
        return float(sum(block.trace() for block in self.blocks))

    def diagonal(self) -> np.ndarray:
        """The diagonal of K, in flat parameter order."""
        out = np.empty(self.shape[0])
        for block, index in zip(self.blocks, self._indices):
            out[index] = block.diagonal()
        return out

    def _fast_diagonal(self, method: str, mc_samples: int, seed: int) -> np.ndarray:
        return self.diagonal()

    def frobenius_norm(self) -> float:
        """‖K‖_F, from ‖A ⊗ G‖_F = ‖A‖_F ‖G‖_F."""
        return float(np.sqrt(sum(block.frobenius2() for block in self.blocks)))

    def eigenvalues(self) -> np.ndarray:
        """All P eigenvalues of K, ascending (the products of each block's factor eigenvalues)."""
        cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        return np.sort(np.concatenate([block.eigen(cache).values.ravel() for block in self.blocks]))

    def logdet(self, damping: float = 0.0) -> float:
        """log det(K + δI), from each block's factor eigenvalues.

        Raises
        ------
        ValueError
            If K + δI is not positive definite.
        """
        damping = _check_damping(damping)
        values = self.eigenvalues() + damping
        if values[0] <= 0:
            msg = (
                f"damping: K + {damping:.3g}·I is not positive definite (smallest eigenvalue {values[0]:.3g}); "
                "pass a larger damping."
            )
            raise ValueError(msg)
        return float(np.sum(np.log(values)))

    def inverse(self, damping: float = 0.0, heuristic: str | None = None) -> KroneckerOperator:
        r"""An inverse of the damped operator, as a `KroneckerOperator`.

        Parameters
        ----------
        damping : float
            δ ≥ 0.
        heuristic : {None, "pi", "exact"}
            ``"exact"``: :math:`(A \otimes G + \delta I)^{-1}` through the
            factors' eigendecompositions (EKFAC blocks are always inverted
            this way). None: :math:`(A + \sqrt\delta I)^{-1} \otimes (G + \sqrt\delta I)^{-1}`,
            by Cholesky, which damps more than δ (curvlinops' default).
            ``"pi"``: the same with :math:`\pi\sqrt\delta` and :math:`\sqrt\delta/\pi`,
            :math:`\pi^2 = (\mathrm{tr} A / a) / (\mathrm{tr} G / g)`
            (Martens & Grosse, 2015).

        Raises
        ------
        ValueError
            If the damped blocks are singular (pass a larger damping).
        """
        damping = _check_damping(damping)
        if heuristic not in HEURISTICS:
            msg = f"heuristic: expected one of {HEURISTICS}, got {heuristic!r}."
            raise ValueError(msg)
        blocks = [block.damped_inverse(damping, heuristic) for block in self.blocks]
        return KroneckerOperator(blocks, self._indices, self.shape[0], names=self.names, dtype=self.dtype)

    def to_dense(self, *, max_params: int = DEFAULT_MAX_DENSE) -> np.ndarray:
        """The P × P matrix (refused above ``max_params``)."""
        size = self.shape[0]
        if size > max_params:
            msg = f"max_params: to_dense of a {size} × {size} operator exceeds max_params={max_params}; raise it to insist."
            raise ValueError(msg)
        out = np.zeros((size, size))
        for block, index in zip(self.blocks, self._indices):
            flat = _index_array(index)
            out[np.ix_(flat, flat)] = block.dense()
        return out.astype(self.dtype, copy=False)

    # -- persistence -------------------------------------------------------------
    def save(self, path: str | os.PathLike | BinaryIO) -> None:
        """Write the blocks to one ``.npz`` file, atomically; read it back with `hessop.load`.

        ``path``: a file name ending in ``.npz``, or a binary file object.
        """
        entries: dict[str, np.ndarray] = {
            "format": np.array(FORMAT_NAME),
            "version": np.array(FORMAT_VERSION),
            "kind": np.array("kronecker"),
            "size": np.array(self.shape[0]),
            "dtype": np.array(self.dtype.name),
            "names": np.array(self.names, dtype=str),
            "forms": np.array([type(block).__name__ for block in self.blocks], dtype=str),
        }
        for i, (block, index) in enumerate(zip(self.blocks, self._indices)):
            entries[f"index_{i}"] = _index_array(index)
            if isinstance(block, Kron):
                entries[f"A_{i}"], entries[f"G_{i}"] = block.A, block.G
            else:
                if block.Ua is not None:
                    entries[f"Ua_{i}"] = block.Ua
                entries[f"Ug_{i}"], entries[f"values_{i}"] = block.Ug, block.values
        write_archive(path, entries)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} P={self.shape[0]} blocks={len(self.blocks)} dtype={self.dtype}>"


def from_entries(entries: dict[str, np.ndarray], where: str) -> KroneckerOperator:
    """The `KroneckerOperator` that ``save`` wrote, from the archive's entries (for `hessop.load`)."""
    try:
        if str(entries["format"]) != FORMAT_NAME or int(entries["version"]) != FORMAT_VERSION:
            msg = f"{where}: format {str(entries['format'])!r} version {int(entries['version'])} is not supported."
            raise ValueError(msg)
        blocks = []
        for i, form in enumerate(entries["forms"]):
            if form == "Kron":
                blocks.append(Kron(entries[f"A_{i}"], entries[f"G_{i}"]))
            elif form == "EigenKron":
                blocks.append(EigenKron(entries.get(f"Ua_{i}"), entries[f"Ug_{i}"], entries[f"values_{i}"]))
            else:
                msg = f"{where}: unknown block form {str(form)!r}."
                raise ValueError(msg)
        for name, array in entries.items():
            if array.dtype.kind == "f":
                check_finite_array(array, name)
        indices = [entries[f"index_{i}"] for i in range(len(blocks))]
        return KroneckerOperator(blocks, indices, int(entries["size"]), names=list(entries["names"]), dtype=str(entries["dtype"]))
    except KeyError as err:
        msg = f"{where}: missing {err.args[0]!r}."
        raise ValueError(msg) from None
    except (TypeError, ValueError) as err:
        if str(err).startswith(where):
            raise
        msg = f"{where}: {err}"
        raise ValueError(msg) from None
