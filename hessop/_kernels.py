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
kernels: a vector's inner loop runs over K; for a block, ``_project_block``
adds rank-8 updates into an L1-resident accumulator and ``_expand_block``
computes 4 × 2 tiles of float64 dot products.
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


# Block kernels (m ≥ 2). numba leaves LLVM's SLP vectoriser off, so register-
# tiled micro-kernels written as scalar code stay scalar; only the loop
# vectoriser runs, over innermost loops. Each kernel is therefore written so
# its innermost loop runs over contiguous float64 memory and does several
# FMAs per load and store.


# No "reassoc" here: the k-loop below is not a reduction, so it vectorises
# without it, and with it LLVM rewrites the tree of eight products as one chain
# of eight dependent FMAs per accumulator update, which waits on FMA latency
# (the kernel took 7–16 % longer that way, medians of three runs).
@njit(cache=True, parallel=True, fastmath={"contract"})
def _project_block(Q, X, out):  # noqa: N803
    """out[:K] += QᵀX, out[K] += column sums of X² for a (P, m) block.

    Rank-8 updates: eight rows of Q, converted to float64, update row j of a
    (m, K) accumulator with Σ_r X[i+r, j] Q[i+r, :] in one vectorised loop
    over k, so each load and store of the accumulator (which stays in L1)
    carries eight products, summed as a tree of depth three. K is padded to a
    multiple of 4 so that loop has no scalar remainder.
    """
    P, K = Q.shape
    m = X.shape[1]
    F = 8  # noqa: N806  (rows per update; the loop below names all eight)
    K4 = (K + 3) // 4 * 4  # noqa: N806
    n_chunks = min(_MAX_CHUNKS, max(1, P // 4096))
    chunk = (P + n_chunks - 1) // n_chunks
    partial = np.zeros((n_chunks, m, K4 + 1))  # column K4: squared norms
    for t in prange(n_chunks):
        acc = np.zeros((m, K4 + 1))
        q = np.zeros((F, K4))  # columns K..K4-1 stay zero
        start = t * chunk
        stop = min(P, start + chunk)
        stop_folded = start + (stop - start) // F * F
        for i in range(start, stop_folded, F):
            for r in range(F):
                for k in range(K):
                    q[r, k] = Q[i + r, k]
            q0, q1, q2, q3, q4, q5, q6, q7 = q[0], q[1], q[2], q[3], q[4], q[5], q[6], q[7]
            for j in range(m):
                x0 = np.float64(X[i, j])
                x1 = np.float64(X[i + 1, j])
                x2 = np.float64(X[i + 2, j])
                x3 = np.float64(X[i + 3, j])
                x4 = np.float64(X[i + 4, j])
                x5 = np.float64(X[i + 5, j])
                x6 = np.float64(X[i + 6, j])
                x7 = np.float64(X[i + 7, j])
                a = acc[j]
                a[K4] += ((x0 * x0 + x1 * x1) + (x2 * x2 + x3 * x3)) + ((x4 * x4 + x5 * x5) + (x6 * x6 + x7 * x7))
                for k in range(K4):
                    a[k] += ((q0[k] * x0 + q1[k] * x1) + (q2[k] * x2 + q3[k] * x3)) + (
                        (q4[k] * x4 + q5[k] * x5) + (q6[k] * x6 + q7[k] * x7)
                    )
        for i in range(stop_folded, stop):  # fewer than F rows left
            for j in range(m):
                xj = np.float64(X[i, j])
                acc[j, K4] += xj * xj
                for k in range(K):
                    acc[j, k] += np.float64(Q[i, k]) * xj
        partial[t] = acc
    for t in range(n_chunks):
        out[:K] += partial[t, :, :K].T
        out[K] += partial[t, :, K4]


@njit(cache=True, parallel=True, fastmath={"reassoc", "contract"})
def _expand_vector(Q, c, x, tail, out):  # noqa: N803
    """out = Q c + tail x for one vector: a float64 dot product per row."""
    P, K = Q.shape
    for i in prange(P):
        value = tail * np.float64(x[i])
        for k in range(K):
            value += np.float64(Q[i, k]) * c[k]
        out[i] = value


@njit(cache=True, fastmath={"reassoc", "contract"})
def _dot_tile(a, b, c, d, u, v, n):
    """The 4 × 2 dot products of rows a, b, c, d with u and v over their first n entries."""
    au = av = bu = bv = cu = cv = du = dv = 0.0
    for r in range(n):
        au += a[r] * u[r]
        av += a[r] * v[r]
        bu += b[r] * u[r]
        bv += b[r] * v[r]
        cu += c[r] * u[r]
        cv += c[r] * v[r]
        du += d[r] * u[r]
        dv += d[r] * v[r]
    return au, av, bu, bv, cu, cv, du, dv


@njit(cache=True, parallel=True, fastmath={"reassoc", "contract"})
def _expand_block(Q, Ct, X, tail, out):  # noqa: N803
    """out = Q C + tail X for a (P, m) block.

    ``Ct`` is Cᵀ in float64, zero-padded to an even number of rows and to a
    multiple of 4 columns. Four rows of Q are converted to float64 once (and
    zero-padded alike, so the dot products have no scalar remainder), then
    each pair of columns of C gives 4 × 2 dot products in one loop.
    """
    P, K = Q.shape
    m = X.shape[1]
    K4 = Ct.shape[1]  # noqa: N806
    n_chunks = max(1, P // 1024)
    chunk = (P + n_chunks - 1) // n_chunks
    for t in prange(n_chunks):
        q = np.zeros((4, K4))  # columns K..K4-1 stay zero
        start = t * chunk
        stop = min(P, start + chunk)
        stop4 = start + (stop - start) // 4 * 4
        for i in range(start, stop4, 4):
            for r in range(4):
                for k in range(K):
                    q[r, k] = Q[i + r, k]
            q0, q1, q2, q3 = q[0], q[1], q[2], q[3]
            for j in range(0, m, 2):
                s00, s01, s10, s11, s20, s21, s30, s31 = _dot_tile(q0, q1, q2, q3, Ct[j], Ct[j + 1], K4)
                if tail != 0.0:  # a low-rank operator never reads X here
                    s00 += tail * np.float64(X[i, j])
                    s10 += tail * np.float64(X[i + 1, j])
                    s20 += tail * np.float64(X[i + 2, j])
                    s30 += tail * np.float64(X[i + 3, j])
                    if j + 1 < m:
                        s01 += tail * np.float64(X[i, j + 1])
                        s11 += tail * np.float64(X[i + 1, j + 1])
                        s21 += tail * np.float64(X[i + 2, j + 1])
                        s31 += tail * np.float64(X[i + 3, j + 1])
                out[i, j] = s00
                out[i + 1, j] = s10
                out[i + 2, j] = s20
                out[i + 3, j] = s30
                if j + 1 < m:
                    out[i, j + 1] = s01
                    out[i + 1, j + 1] = s11
                    out[i + 2, j + 1] = s21
                    out[i + 3, j + 1] = s31
        for i in range(stop4, stop):
            for j in range(m):
                value = tail * np.float64(X[i, j])
                for k in range(K):
                    value += np.float64(Q[i, k]) * Ct[j, k]
                out[i, j] = value


def _project_numba(Q, X, out):  # noqa: N803
    if X.shape[1] == 1:
        _project_vector(Q, X[:, 0], out[:, 0])
    else:
        _project_block(Q, X, out)


def _expand_numba(Q, C, X, tail, out):  # noqa: N803
    m = X.shape[1]
    if m == 1:
        _expand_vector(Q, np.ascontiguousarray(C[:, 0]), X[:, 0], tail, out[:, 0])
    else:
        K = C.shape[0]  # noqa: N806
        Ct = np.zeros((m + m % 2, (K + 3) // 4 * 4))  # noqa: N806
        Ct[:m, :K] = C.T
        _expand_block(Q, Ct, X, tail, out)


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


# ``apply`` and ``quadratic_form`` also return the column sums of X² that the
# projection computes anyway: a non-finite entry of X makes its column's sum
# non-finite, so callers can validate X without another pass over it (and the
# numpy twins are kept quiet about the NaN they will be asked to refuse).
def apply(engine: str, Q: np.ndarray, shifted: np.ndarray, tail: float, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # noqa: N803
    """(A X, column sums of X²) for A = Q diag(shifted + tail) Qᵀ + tail (I − QQᵀ); X is (P, m)."""
    with np.errstate(invalid="ignore", over="ignore"):
        coefficients, squared_norms = project(engine, Q, X)
        coefficients *= shifted[:, None]
        out = np.empty(X.shape, dtype=Q.dtype)
        KERNELS[engine]["expand"](Q, coefficients, X, float(tail), out)
    return out, squared_norms


def quadratic_form(engine: str, Q: np.ndarray, shifted: np.ndarray, tail: float, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # noqa: N803
    """(xᵀAx for each column x of X, column sums of X²), one pass over Q."""
    with np.errstate(invalid="ignore", over="ignore"):
        coefficients, squared_norms = project(engine, Q, X)
        return shifted @ (coefficients * coefficients) + tail * squared_norms, squared_norms


def diagonal(engine: str, Q: np.ndarray, shifted: np.ndarray, tail: float) -> np.ndarray:  # noqa: N803
    out = np.empty(Q.shape[0])
    KERNELS[engine]["diagonal"](Q, shifted, float(tail), out)
    return out
