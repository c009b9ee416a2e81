"""Per-layer (or per-group) diagonal blocks of any symmetric operator, with per-block spectra and traces."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.sparse.linalg import LinearOperator

from hessop._validation import check_positive_int
from hessop.dense.columns import DEFAULT_MAX_DENSE
from hessop.spectral.eigen import eigen
from hessop.spectral.estimators import trace as estimate_trace

__all__ = ["BlockDiagonalOperator", "block_diagonal"]

# Blocks up to this size are built densely (one block product) for eigen and trace.
_DENSE_BLOCK = 64


def _layer_of(name: str) -> str:
    """A variable's layer: its name up to the last '/', without TensorFlow's ':0' suffix."""
    name = name.split(":")[0]
    return name.rsplit("/", 1)[0] if "/" in name else name


def _groups_from_variables(op: Any, blocks: str) -> tuple[list[str], list[np.ndarray]]:
    params = getattr(op, "params", None)
    if params is None:
        msg = (
            f"blocks: {blocks!r} reads the operator's variables (op.params), which {type(op).__name__} does not have; "
            "pass blocks as a list of flat index arrays."
        )
        raise TypeError(msg)
    return variable_groups(params, blocks)


def variable_groups(params: Sequence[Any], blocks: str = "layer") -> tuple[list[str], list[np.ndarray]]:
    """Names and flat index arrays of ``params`` grouped by layer (``"layer"``) or one per variable."""
    names, indices, start = [], [], 0
    for variable in params:
        size = int(np.prod(tuple(variable.shape), dtype=np.int64))
        key = _layer_of(variable.name) if blocks == "layer" else variable.name.split(":")[0]
        if blocks == "layer" and names and names[-1] == key:
            indices[-1] = np.concatenate([indices[-1], np.arange(start, start + size)])
        else:
            names.append(key)
            indices.append(np.arange(start, start + size))
        start += size
    return names, indices


class _Restricted(LinearOperator):
    """One diagonal block E_bᵀ A E_b: products pad with zeros, apply A, and keep the block's rows."""

    def __init__(self, op: Any, index: np.ndarray) -> None:
        self._op, self._index = op, index
        super().__init__(dtype=np.dtype(op.dtype), shape=(index.size, index.size))

    def _matmat(self, X: np.ndarray) -> np.ndarray:
        padded = np.zeros((self._op.shape[0], X.shape[1]), dtype=np.result_type(X, self.dtype))
        padded[self._index] = X
        return np.asarray(self._op.matmat(padded))[self._index]

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        return self._matmat(np.reshape(x, (-1, 1)))[:, 0]

    def _adjoint(self) -> _Restricted:
        return self

    def to_dense(self) -> np.ndarray:
        return self._matmat(np.eye(self.shape[0]))


class BlockDiagonalOperator(LinearOperator):
    """The block-diagonal restriction of a symmetric operator: blocks of parameters, each with its own spectrum.

    Built by `block_diagonal`. A product with k vectors is one block product
    of the underlying operator with k × (number of blocks) vectors.

    Attributes
    ----------
    names : list of str
        One per block (the layer's name for ``blocks="layer"``).
    indices : list of numpy.ndarray
        The flat parameters of each block.
    """

    def __init__(self, op: Any, names: Sequence[str], indices: Sequence[np.ndarray]) -> None:
        self._op = op
        self.names = list(names)
        self.indices = [np.asarray(index, dtype=np.int64) for index in indices]
        super().__init__(dtype=np.dtype(op.dtype), shape=op.shape)

    def __len__(self) -> int:
        return len(self.names)

    def block(self, key: int | str) -> LinearOperator:
        """Block ``key`` (its position or name) as a LinearOperator of its own size."""
        position = self.names.index(key) if isinstance(key, str) else int(key)
        return _Restricted(self._op, self.indices[position])

    def _matmat(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X)
        k = X.shape[1]
        padded = np.zeros((self.shape[0], k * len(self.indices)), dtype=np.result_type(X, self.dtype))
        for b, index in enumerate(self.indices):
            padded[index, b * k : (b + 1) * k] = X[index]
        products = np.asarray(self._op.matmat(padded))
        out = np.zeros((self.shape[0], k), dtype=products.dtype)
        for b, index in enumerate(self.indices):
            out[index] = products[index, b * k : (b + 1) * k]
        return out

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        return self._matmat(np.reshape(x, (-1, 1)))[:, 0]

    def _adjoint(self) -> BlockDiagonalOperator:
        return self

    def eigen(self, k: int = 1, **kwargs: Any) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The top ``k`` eigenpairs of each block, by name: small blocks densely, others by `hessop.eigen`.

        Blocks with fewer than k parameters give all of theirs. ``kwargs`` go to `hessop.eigen`.
        """
        k = check_positive_int(k, "k")
        out = {}
        for position, name in enumerate(self.names):
            block = self.block(position)
            if block.shape[0] <= max(_DENSE_BLOCK, 2 * k + 1):
                values, vectors = np.linalg.eigh(block.to_dense())
                order = np.argsort(values)[::-1][:k]
                out[name] = (values[order], vectors[:, order])
            else:
                out[name] = eigen(block, k, **kwargs)
        return out

    def trace(self, **kwargs: Any) -> dict[str, float]:
        """The trace of each block, by name.

        Exact from the operator's diagonal where it has a fast one (GGN, OPG,
        KFAC: one data pass for all blocks) and for small blocks; otherwise
        estimated by `hessop.trace` with ``kwargs``.
        """
        fast = getattr(self._op, "_fast_diagonal", None)
        diagonal = fast("exact", 1, 0) if fast is not None else None
        out = {}
        for position, name in enumerate(self.names):
            index = self.indices[position]
            if diagonal is not None:
                out[name] = float(np.sum(diagonal[index]))
            elif index.size <= _DENSE_BLOCK:
                out[name] = float(np.trace(self.block(position).to_dense()))
            else:
                out[name] = estimate_trace(self.block(position), **kwargs)
        return out

    def to_dense(self, *, max_params: int = DEFAULT_MAX_DENSE) -> np.ndarray:
        """The P × P block-diagonal matrix (each block from products with its unit vectors)."""
        size = self.shape[0]
        if size > max_params:
            msg = f"max_params: to_dense of a {size} × {size} operator exceeds max_params={max_params}; raise it to insist."
            raise ValueError(msg)
        widest = max(index.size for index in self.indices)
        out = np.zeros((size, size))
        # One block product: column j of every block at once.
        units = np.zeros((size, widest))
        for index in self.indices:
            units[index, np.arange(index.size)] = 1.0
        products = self._matmat(units)
        for index in self.indices:
            out[np.ix_(index, index)] = products[index][:, : index.size]
        return out

    def __repr__(self) -> str:
        return f"<{type(self).__name__} P={self.shape[0]} blocks={len(self.names)} of {type(self._op).__name__}>"


def block_diagonal(
    op: Any, blocks: str | Sequence[Any] = "layer", *, names: Sequence[str] | None = None
) -> BlockDiagonalOperator:
    """The block-diagonal restriction of a symmetric operator, by layer, by variable or by given groups.

    Answers "the top eigenvalue of each layer" and per-layer traces for any
    operator (H, GGN, OPG, KFAC, a scipy operator).

    Parameters
    ----------
    op : LinearOperator
        Square and symmetric.
    blocks : "layer", "variable" or sequence of int arrays
        ``"layer"``: consecutive variables whose names share their path up to
        the last '/' (a Keras layer's kernel and bias); ``"variable"``: one
        block per variable; both read ``op.params``. Or the flat indices of
        each block, which together cover 0 … P−1 exactly once.
    names : sequence of str, optional
        Names for given index blocks (default "block 0", …).

    Returns
    -------
    BlockDiagonalOperator

    Examples
    --------
    >>> import numpy as np, scipy.sparse.linalg as sla, hessop
    >>> matrix = np.array([[2.0, 1.0, 0.5], [1.0, 3.0, 0.2], [0.5, 0.2, 4.0]])
    >>> A = sla.aslinearoperator(matrix)
    >>> B = hessop.block_diagonal(A, [np.array([0, 1]), np.array([2])], names=["w", "b"])
    >>> B.to_dense()
    array([[2., 1., 0.],
           [1., 3., 0.],
           [0., 0., 4.]])
    >>> {name: round(float(values[0]), 4) for name, (values, _) in B.eigen(k=1).items()}
    {'w': 3.618, 'b': 4.0}
    """
    shape = getattr(op, "shape", None)
    if shape is None or len(shape) != 2 or shape[0] != shape[1]:
        msg = f"op: expected a square LinearOperator, got {type(op).__name__} with shape {shape}."
        raise TypeError(msg)
    if isinstance(blocks, str):
        if blocks not in ("layer", "variable"):
            msg = f"blocks: expected 'layer', 'variable' or a list of index arrays, got {blocks!r}."
            raise ValueError(msg)
        if names is not None:
            msg = "names: only for blocks given as index arrays; 'layer' and 'variable' blocks are named by the variables."
            raise ValueError(msg)
        names, indices = _groups_from_variables(op, blocks)
    else:
        indices = [np.asarray(index, dtype=np.int64).ravel() for index in blocks]
        if not indices:
            msg = "blocks: expected at least one block."
            raise ValueError(msg)
        names = [f"block {i}" for i in range(len(indices))] if names is None else [str(n) for n in names]
        if len(names) != len(indices):
            msg = f"names: expected one name per block ({len(indices)}), got {len(names)}."
            raise ValueError(msg)
    counts = np.zeros(shape[0], dtype=np.int64)
    for index in indices:
        if index.size and (index.min() < 0 or index.max() >= shape[0]):
            msg = f"blocks: indices must lie in 0 … {shape[0] - 1}."
            raise ValueError(msg)
        np.add.at(counts, index, 1)
    if np.any(counts != 1):
        position = int(np.flatnonzero(counts != 1)[0])
        msg = f"blocks: each parameter must belong to exactly one block; parameter {position} is in {counts[position]}."
        raise ValueError(msg)
    return BlockDiagonalOperator(op, names, indices)
