"""Kernels for spectral operators A = Q diag(λ) Qᵀ + τ (I − QQᵀ).

Q is P×K with orthonormal columns, stored C-contiguous in float32 or float64;
τ (``tail``) is 0 for a low-rank operator. Every kernel has a numba version
(``parallel=True``, ``cache=True``) and a numpy twin with the same signature
that the tests hold it to. Numba kernels accumulate in float64 whatever the
storage dtype, and write into buffers the caller passes.

The expensive part is reading Q (P·K numbers); the kernels are organised to
read it as few times as possible:

* ``apply``: A x = Q((λ − τ) ∘ Qᵀx) + τx, two passes over Q and no P-sized
  temporaries.
* ``quadratic_form``: xᵀAx = Σ (λ_k − τ)(Qᵀx)_k² + τ‖x‖², one pass.
* ``diagonal``: diag(A)_i = τ + Σ_k (λ_k − τ) Q_ik², one pass.

The projection Qᵀx splits the rows into contiguous chunks, each accumulating
into its own partial result, so no atomics are needed; the expansion and the
diagonal are independent per row. Vectors (m = 1) and blocks have separate
kernels: a vector's inner loop runs over K, a block's over its m columns.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

__all__ = ["KERNELS", "ENGINES"]

ENGINES = ("numba", "numpy")


_MAX_CHUNKS = 32

# -- numba ---------------------------------------------------------------------------
# Reassociation lets LLVM vectorise float64 sums; unlike full fastmath it keeps
# NaN/inf semantics (inputs are validated finite anyway).


@njit(cache=True, parallel=True, fastmath={"reassoc", "contract"})
def _project_vector(Q, x, out):  # noqa: N803
    """out[:K] += Qᵀx, out[K] += xᵀx for one vector; K contiguous so the k-loop vectorises."""
    P, K = Q.shape
    # A fixed chunk count (not the thread count, which would make the function
    # uncacheable) gives each thread several contiguous chunks.
    n_chunks = min(_MAX_CHUNKS, max(1, P // 4096))
    chunk = (P + n_chunks - 1) // n_chunks
    partial = np.zeros((n_chunks, K + 1))
    for t in prange(n_chunks):
        acc = np.zeros(K + 1)
        for i in range(t * chunk, min(P, (t + 1) * chunk)):
            xi = np.float64(x[i])
            acc[K] += xi * xi
            for k in range(K):
                acc[k] += np.float64(Q[i, k]) * xi
        partial[t] = acc
    for t in range(n_chunks):
        out += partial[t]


@njit(cache=True, parallel=True, fastmath={"reassoc", "contract"})
def _project_block(Q, X, out):  # noqa: N803
    """out[:K] += QᵀX, out[K] += column sums of X² for a (P, m) block."""
    P, K = Q.shape
    m = X.shape[1]
    n_chunks = min(_MAX_CHUNKS, max(1, P // 4096))
    chunk = (P + n_chunks - 1) // n_chunks
    partial = np.zeros((n_chunks, K + 1, m))
    for t in prange(n_chunks):
        acc = np.zeros((K + 1, m))
        row = np.empty(m)
        for i in range(t * chunk, min(P, (t + 1) * chunk)):
            for j in range(m):
                row[j] = np.float64(X[i, j])
                acc[K, j] += row[j] * row[j]
            for k in range(K):
                qik = np.float64(Q[i, k])
                for j in range(m):
                    acc[k, j] += qik * row[j]
        partial[t] = acc
    for t in range(n_chunks):
        out += partial[t]


@njit(cache=True, parallel=True, fastmath={"reassoc", "contract"})
def _expand_vector(Q, c, x, tail, out):  # noqa: N803
    """out = Q c + tail x for one vector: a float64 dot product per row."""
    P, K = Q.shape
    for i in prange(P):
        value = tail * np.float64(x[i])
        for k in range(K):
            value += np.float64(Q[i, k]) * c[k]
        out[i] = value


@njit(cache=True, parallel=True, fastmath={"reassoc", "contract"})
def _expand_block(Q, C, X, tail, out):  # noqa: N803
    """out = Q C + tail X for a (P, m) block, a float64 row accumulator per row."""
    P, K = Q.shape
    m = X.shape[1]
    n_chunks = max(1, P // 512)
    chunk = (P + n_chunks - 1) // n_chunks
    for t in prange(n_chunks):
        row = np.empty(m)
        for i in range(t * chunk, min(P, (t + 1) * chunk)):
            for j in range(m):
                row[j] = tail * np.float64(X[i, j])
            for k in range(K):
                qik = np.float64(Q[i, k])
                for j in range(m):
                    row[j] += qik * C[k, j]
            for j in range(m):
                out[i, j] = row[j]


def _project_numba(Q, X, out):  # noqa: N803
    if X.shape[1] == 1:
        _project_vector(Q, X[:, 0], out[:, 0])
    else:
        _project_block(Q, X, out)


def _expand_numba(Q, C, X, tail, out):  # noqa: N803
    if X.shape[1] == 1:
        _expand_vector(Q, np.ascontiguousarray(C[:, 0]), X[:, 0], tail, out[:, 0])
    else:
        _expand_block(Q, C, X, tail, out)


@njit(cache=True, parallel=True, fastmath={"reassoc", "contract"})
def _diagonal_numba(Q, shifted, tail, out):  # noqa: N803
    P, K = Q.shape
    for i in prange(P):
        value = tail
        for k in range(K):
            qik = np.float64(Q[i, k])
            value += shifted[k] * qik * qik
        out[i] = value


# -- numpy twins ---------------------------------------------------------------------
def _project_numpy(Q, X, out):  # noqa: N803
    Q64, X64 = Q.astype(np.float64, copy=False), X.astype(np.float64, copy=False)  # noqa: N806
    out[:-1] += Q64.T @ X64
    out[-1] += np.einsum("ij,ij->j", X64, X64)


def _expand_numpy(Q, C, X, tail, out):  # noqa: N803
    out[...] = Q.astype(np.float64, copy=False) @ C + tail * X.astype(np.float64, copy=False)


def _diagonal_numpy(Q, shifted, tail, out):  # noqa: N803
    Q64 = Q.astype(np.float64, copy=False)  # noqa: N806
    out[...] = tail + (Q64 * Q64) @ shifted


KERNELS = {
    "numba": {"project": _project_numba, "expand": _expand_numba, "diagonal": _diagonal_numba},
    "numpy": {"project": _project_numpy, "expand": _expand_numpy, "diagonal": _diagonal_numpy},
}


# -- the three operations, in terms of the kernels --------------------------------------
def project(engine: str, Q: np.ndarray, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # noqa: N803
    """(Qᵀ X, column sums of X²) in float64, one pass over Q."""
    out = np.zeros((Q.shape[1] + 1, X.shape[1]))
    KERNELS[engine]["project"](Q, X, out)
    return out[:-1], out[-1]


def apply(engine: str, Q: np.ndarray, shifted: np.ndarray, tail: float, X: np.ndarray) -> np.ndarray:  # noqa: N803
    """A X for A = Q diag(shifted + tail) Qᵀ + tail (I − QQᵀ); X is (P, m)."""
    coefficients, _ = project(engine, Q, X)
    coefficients *= shifted[:, None]
    out = np.empty(X.shape, dtype=Q.dtype)
    KERNELS[engine]["expand"](Q, coefficients, X, float(tail), out)
    return out


def quadratic_form(engine: str, Q: np.ndarray, shifted: np.ndarray, tail: float, X: np.ndarray) -> np.ndarray:  # noqa: N803
    """xᵀAx for each column of X, one pass over Q."""
    coefficients, squared_norms = project(engine, Q, X)
    return shifted @ (coefficients * coefficients) + tail * squared_norms


def diagonal(engine: str, Q: np.ndarray, shifted: np.ndarray, tail: float) -> np.ndarray:  # noqa: N803
    out = np.empty(Q.shape[0])
    KERNELS[engine]["diagonal"](Q, shifted, float(tail), out)
    return out
