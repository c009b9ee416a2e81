"""numba kernels against their numpy twins, float32 and float64."""

from __future__ import annotations

import numpy as np
import pytest

from hessop.lowrank import kernels as _kernels


def orthonormal(size: int, rank: int, dtype, seed: int = 0) -> np.ndarray:
    return np.linalg.qr(np.random.default_rng(seed).normal(size=(size, rank)))[0].astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("size", "rank", "width"), [(7, 1, 1), (5000, 8, 1), (9000, 13, 5), (300, 300, 2)])
def test_numba_matches_numpy_twin(dtype, size, rank, width):
    Q = orthonormal(size, rank, dtype)
    rng = np.random.default_rng(1)
    shifted, tail = rng.normal(size=rank), 0.7
    X = rng.normal(size=(size, width)).astype(dtype)
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    for name, args in {
        "apply": (Q, shifted, tail, X),
        "quadratic_form": (Q, shifted, tail, X),
        "diagonal": (Q, shifted, tail),
    }.items():
        fast = getattr(_kernels, name)("numba", *args)
        reference = getattr(_kernels, name)("numpy", *args)
        if name == "diagonal":  # apply and quadratic_form also return the column sums of X²
            fast, reference = (fast,), (reference,)
        for fast_part, reference_part in zip(fast, reference, strict=True):
            assert fast_part.shape == reference_part.shape, name
            assert np.allclose(fast_part, reference_part, rtol=rtol, atol=rtol * np.abs(reference_part).max()), name


def test_float32_storage_accumulates_in_float64():
    # Many small terms: a float32 accumulator would lose them against a large one.
    size = 200_000
    Q = np.zeros((size, 1), dtype=np.float32)
    Q[:, 0] = 1 / np.sqrt(size)
    X = np.ones((size, 1), dtype=np.float32)
    coefficients, squared_norms = _kernels.project("numba", Q, X)
    exact = size / np.sqrt(np.float64(size))
    assert abs(coefficients[0, 0] - exact) / exact < 1e-6
    assert squared_norms[0] == size


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("size", "rank", "width"),
    [(1, 1, 2), (3, 5, 3), (64, 4, 2), (130, 7, 17), (1001, 50, 16), (2000, 16, 24), (515, 9, 8), (4097, 2, 4), (12291, 3, 5)],
)
def test_block_kernels_cover_tile_remainders(dtype, size, rank, width):
    # The projection converts 16 rows at a time within chunks of ≥ 4096 rows and
    # pads K to a multiple of TILE_ROWS (4 or 8) and m to a multiple of
    # VECTOR_WIDTH (4 or 8), using tiles two vectors wide and one narrow tile
    # for the rest; the expansion takes TILE_ROWS rows of Q at a time. These
    # sizes leave every kind of remainder (12291 = 3 chunks of 4097 rows, each
    # ending with a short step) and none (K = 16, m = 24 and 8).
    rng = np.random.default_rng(size)
    Q = rng.normal(size=(size, rank)).astype(dtype)
    X = rng.normal(size=(size, width)).astype(dtype)
    shifted = rng.normal(size=rank)
    exact_projection = Q.astype(np.float64).T @ X.astype(np.float64)
    coefficients, squared_norms = _kernels.project("numba", Q, X)
    assert np.allclose(coefficients, exact_projection, rtol=1e-12, atol=1e-12)
    assert np.allclose(squared_norms, (X.astype(np.float64) ** 2).sum(axis=0), rtol=1e-12)
    for tail in (0.3, 0.0):  # tail 0 (low rank) skips reading X
        applied, applied_norms = _kernels.apply("numba", Q, shifted, tail, X)
        assert np.array_equal(applied_norms, squared_norms)
        exact = Q.astype(np.float64) @ (shifted[:, None] * exact_projection) + tail * X.astype(np.float64)
        assert applied.dtype == dtype
        tolerance = 1e-5 if dtype == np.float32 else 1e-12
        assert np.allclose(applied, exact, rtol=tolerance, atol=tolerance * np.abs(exact).max())


def test_float32_block_accumulates_in_float64():
    size = 200_000
    Q = np.full((size, 1), 1 / np.sqrt(size), dtype=np.float32)
    X = np.ones((size, 3), dtype=np.float32)
    X[:, 1] = 2.0
    coefficients, squared_norms = _kernels.project("numba", Q, X)
    exact = size * np.float64(Q[0, 0]) * np.array([1.0, 2.0, 1.0])
    assert np.allclose(coefficients[0], exact, rtol=1e-9)
    assert np.array_equal(squared_norms, [size, 4 * size, size])


def test_float32_expansion_accumulates_in_float64():
    # Row i of Q C is 1 plus 300 terms of 1e-8: a float32 accumulator drops each
    # small term against the 1 (float32 spacing at 1 is 1.2e-7) and returns 1.
    size, rank = 40, 301
    Q = np.full((size, rank), 1e-8, dtype=np.float32)
    Q[:, 0] = 1.0
    X = np.zeros((size, 16), dtype=np.float32)
    out = np.empty_like(X)
    _kernels.KERNELS["numba"]["expand"](Q, np.ones((rank, 16)), X, 0.0, out)
    exact = 1.0 + 300 * np.float64(np.float32(1e-8))
    assert np.allclose(out, np.float32(exact), rtol=0, atol=1e-7)
    assert not np.any(out == 1.0)
