"""numba kernels against their numpy twins, float32 and float64."""

from __future__ import annotations

import numpy as np
import pytest

from hessop import _kernels


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
        assert fast.shape == reference.shape
        assert np.allclose(fast, reference, rtol=rtol, atol=rtol * np.abs(reference).max()), name


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
