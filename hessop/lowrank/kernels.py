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
kernels: a vector's inner loop runs over K. Blocks go through float64 BLAS
on chunks of rows by default; with ``HESSOP_SIMD_TILES=1`` they run numba
kernels built on the LLVM-IR register tiles of `hessop.lowrank.simd`, which
convert in L1-sized pieces and run at about sgemm's speed
(`hessop.lowrank.tiles`).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from hessop.lowrank.tiles import SIMD_TILES, TILE_ROWS, VECTOR_WIDTH

__all__ = ["KERNELS", "ENGINES"]

ENGINES = ("numba", "numpy")


_MAX_CHUNKS = 32

# -- numba ---------------------------------------------------------------------------
# Reassociation lets LLVM vectorise float64 sums; unlike full fastmath it keeps
# NaN/inf semantics (inputs are validated finite anyway).


@njit(cache=True, parallel=True, fastmath={"reassoc", "contract"})
def _project_vector(Q, x, out):
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


# Opt-in block kernels (m ≥ 2, HESSOP_SIMD_TILES=1). Both are blocked around
# the register tiles of `hessop.lowrank.simd`: rows of Q and X are first
# converted to float64 into small scratch buffers that stay in L1, and the
# tiles read those. Without the opt-in they never compile, and the LLVM-IR
# module is never imported.
_PROJECT_ROWS = 16  # rows converted per step; of 8, 16, 24, 32, 64, 128 and 256 rows, 8–16 were fastest
if SIMD_TILES:
    from hessop.lowrank.simd import outer_product_tile

    _tile_wide = outer_product_tile(TILE_ROWS, 2)
    _tile_narrow = outer_product_tile(TILE_ROWS, 1)


@njit(cache=True)
def _tile_columns(A, a_off, a_step, a_row, B, count, acc, c_off, m_pad):
    """acc[c_off + r m_pad + j] += Σ_t A[a_off + t a_step + r a_row] B[t m_pad + j], r < TILE_ROWS, j < m_pad.

    Two-vector tiles across the m_pad columns (a multiple of VECTOR_WIDTH), and
    a one-vector tile for an odd vector left over.
    """
    j0 = 0
    while j0 + 2 * VECTOR_WIDTH <= m_pad:
        _tile_wide(A, a_off, a_step, a_row, B, j0, m_pad, count, acc, c_off + j0, m_pad)
        j0 += 2 * VECTOR_WIDTH
    if j0 < m_pad:
        _tile_narrow(A, a_off, a_step, a_row, B, j0, m_pad, count, acc, c_off + j0, m_pad)


@njit(cache=True, parallel=True)
def _project_block(Q, X, out):
    """out[:K] += QᵀX, out[K] += column sums of X² for a (P, m) block.

    Each thread takes contiguous chunks of rows; for every 16 rows it converts
    Q's rows (K padded to a multiple of TILE_ROWS) and X's rows (m padded to a
    multiple of VECTOR_WIDTH) to float64 and adds their products into its
    (K, m) float64 accumulator, one TILE_ROWS × (2 or 1 vectors) tile at a time.
    """
    P, K = Q.shape
    m = X.shape[1]
    rows = _PROJECT_ROWS
    k_tile = TILE_ROWS
    K_pad = (K + k_tile - 1) // k_tile * k_tile
    m_pad = (m + VECTOR_WIDTH - 1) // VECTOR_WIDTH * VECTOR_WIDTH
    n_chunks = min(_MAX_CHUNKS, max(1, P // 4096))
    chunk = (P + n_chunks - 1) // n_chunks
    partial = np.zeros((n_chunks, K_pad * m_pad + m))  # the last m entries: squared norms
    for t in prange(n_chunks):
        q = np.zeros(rows * K_pad)  # padding stays zero
        x = np.zeros(rows * m_pad)
        acc = np.zeros(K_pad * m_pad)
        squares = np.zeros(m_pad)
        start = t * chunk
        stop = min(P, start + chunk)
        for i in range(start, stop, rows):
            n = min(rows, stop - i)
            for s in range(n):
                for k in range(K):
                    q[s * K_pad + k] = Q[i + s, k]
                for j in range(m):
                    x[s * m_pad + j] = X[i + s, j]
            # Squares from the float64 copy, in a loop of their own: accumulating
            # them inside the copy above made the kernel slower.
            for s in range(n):
                for j in range(m_pad):
                    squares[j] += x[s * m_pad + j] * x[s * m_pad + j]
            for k0 in range(0, K_pad, k_tile):  # a tile's rows are k0..k0+TILE_ROWS-1
                _tile_columns(q, k0, K_pad, 1, x, n, acc, k0 * m_pad, m_pad)
        partial[t, : K_pad * m_pad] = acc
        partial[t, K_pad * m_pad :] = squares[:m]
    total = partial.sum(axis=0)
    for k in range(K):
        for j in range(m):
            out[k, j] += total[k * m_pad + j]
    for j in range(m):
        out[K, j] += total[K_pad * m_pad + j]


@njit(cache=True, parallel=True, fastmath={"reassoc", "contract"})
def _expand_vector(Q, c, x, tail, out):
    """out = Q c + tail x for one vector: a float64 dot product per row."""
    P, K = Q.shape
    for i in prange(P):
        value = tail * np.float64(x[i])
        for k in range(K):
            value += np.float64(Q[i, k]) * c[k]
        out[i] = value


@njit(cache=True, parallel=True)
def _expand_block(Q, C, X, tail, out):
    """out = Q C + tail X for a (P, m) block.

    ``C`` is float64, (K, m_pad) with m_pad = m rounded up to a multiple of
    VECTOR_WIDTH and zero columns beyond m. TILE_ROWS rows of Q at a time are
    converted to float64; their products with C accumulate in a
    TILE_ROWS × m_pad tile (2 or 1 vectors wide per register tile), which is
    then written out with tail X added in float64 and rounded once.
    """
    P, K = Q.shape
    m = X.shape[1]
    m_pad = C.shape[1]
    rows = TILE_ROWS
    C_flat = C.ravel()
    n_chunks = max(1, P // 1024)
    chunk = ((P + n_chunks - 1) // n_chunks + rows - 1) // rows * rows
    for t in prange(n_chunks):
        q = np.zeros(rows * K)  # rows past a short last tile are read but never written out
        acc = np.empty(rows * m_pad)
        for i in range(t * chunk, min(P, (t + 1) * chunk), rows):
            n = min(rows, P - i)
            for r in range(n):
                for k in range(K):
                    q[r * K + k] = Q[i + r, k]
            acc[:] = 0.0
            _tile_columns(q, 0, 1, K, C_flat, K, acc, 0, m_pad)  # a tile's rows are rows of Q
            if tail != 0.0:  # a low-rank operator never reads X here
                for r in range(n):
                    for j in range(m):
                        out[i + r, j] = acc[r * m_pad + j] + tail * np.float64(X[i + r, j])
            else:
                for r in range(n):
                    for j in range(m):
                        out[i + r, j] = acc[r * m_pad + j]


def _project_numba(Q, X, out):
    if X.shape[1] == 1:
        _project_vector(Q, X[:, 0], out[:, 0])
    elif SIMD_TILES:
        _project_block(Q, X, out)
    else:
        _project_blas(Q, X, out)


def _expand_numba(Q, C, X, tail, out):
    m = X.shape[1]
    if m == 1:
        _expand_vector(Q, np.ascontiguousarray(C[:, 0]), X[:, 0], tail, out[:, 0])
    elif not SIMD_TILES:
        _expand_blas(Q, C, X, tail, out)
    else:
        C_padded = np.zeros((C.shape[0], (m + VECTOR_WIDTH - 1) // VECTOR_WIDTH * VECTOR_WIDTH))
        C_padded[:, :m] = C
        _expand_block(Q, C_padded, X, tail, out)


@njit(cache=True, parallel=True, fastmath={"reassoc", "contract"})
def _diagonal_numba(Q, shifted, tail, out):
    P, K = Q.shape
    for i in prange(P):
        value = tail
        for k in range(K):
            qik = np.float64(Q[i, k])
            value += shifted[k] * qik * qik
        out[i] = value


# -- default block kernels: float64 BLAS on chunks of rows ---------------------------------
# Rows of Q and X converted to float64 at a time, so that the float64 copies
# stay small (about 2 MB for K = 50, in cache) whatever P; of 4,096, 16,384
# and 65,536 rows, 4,096 was fastest.
_BLAS_ROWS = 4096


def _row_chunks(P):
    return ((start, min(P, start + _BLAS_ROWS)) for start in range(0, P, _BLAS_ROWS))


def _project_blas(Q, X, out):
    for start, stop in _row_chunks(Q.shape[0]):
        q = Q[start:stop].astype(np.float64, copy=False)
        x = X[start:stop].astype(np.float64, copy=False)
        out[:-1] += q.T @ x
        out[-1] += np.einsum("ij,ij->j", x, x)


def _expand_blas(Q, C, X, tail, out):
    for start, stop in _row_chunks(Q.shape[0]):
        rows = Q[start:stop].astype(np.float64, copy=False) @ C
        if tail:
            rows += tail * X[start:stop].astype(np.float64, copy=False)
        out[start:stop] = rows


# -- numpy twins ---------------------------------------------------------------------
def _project_numpy(Q, X, out):
    Q64, X64 = Q.astype(np.float64, copy=False), X.astype(np.float64, copy=False)
    out[:-1] += Q64.T @ X64
    out[-1] += np.einsum("ij,ij->j", X64, X64)


def _expand_numpy(Q, C, X, tail, out):
    out[...] = Q.astype(np.float64, copy=False) @ C + tail * X.astype(np.float64, copy=False)


def _diagonal_numpy(Q, shifted, tail, out):
    Q64 = Q.astype(np.float64, copy=False)
    out[...] = tail + (Q64 * Q64) @ shifted


KERNELS = {
    "numba": {"project": _project_numba, "expand": _expand_numba, "diagonal": _diagonal_numba},
    "numpy": {"project": _project_numpy, "expand": _expand_numpy, "diagonal": _diagonal_numpy},
}


# -- the three operations, in terms of the kernels --------------------------------------
def project(engine: str, Q: np.ndarray, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Qᵀ X, column sums of X²) in float64, one pass over Q."""
    out = np.zeros((Q.shape[1] + 1, X.shape[1]))
    KERNELS[engine]["project"](Q, X, out)
    return out[:-1], out[-1]


# ``apply`` and ``quadratic_form`` also return the column sums of X² that the
# projection computes anyway: a non-finite entry of X makes its column's sum
# non-finite, so callers can validate X without another pass over it (and the
# numpy twins are kept quiet about the NaN they will be asked to refuse).
def apply(engine: str, Q: np.ndarray, shifted: np.ndarray, tail: float, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(A X, column sums of X²) for A = Q diag(shifted + tail) Qᵀ + tail (I − QQᵀ); X is (P, m)."""
    with np.errstate(invalid="ignore", over="ignore"):
        coefficients, squared_norms = project(engine, Q, X)
        coefficients *= shifted[:, None]
        out = np.empty(X.shape, dtype=Q.dtype)
        KERNELS[engine]["expand"](Q, coefficients, X, float(tail), out)
    return out, squared_norms


def quadratic_form(engine: str, Q: np.ndarray, shifted: np.ndarray, tail: float, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(xᵀAx for each column x of X, column sums of X²), one pass over Q."""
    with np.errstate(invalid="ignore", over="ignore"):
        coefficients, squared_norms = project(engine, Q, X)
        return shifted @ (coefficients * coefficients) + tail * squared_norms, squared_norms


def diagonal(engine: str, Q: np.ndarray, shifted: np.ndarray, tail: float) -> np.ndarray:
    out = np.empty(Q.shape[0])
    KERNELS[engine]["diagonal"](Q, shifted, float(tail), out)
    return out
