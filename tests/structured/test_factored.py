"""KroneckerOperator against dense numpy: products, inverses, log-determinants, diagonals, save/load."""

from __future__ import annotations

import io

import numpy as np
import pytest
from scipy.sparse.linalg import aslinearoperator

import hessop
from hessop.structured.factored import EigenKron, Kron, KroneckerOperator


def _spd(rng: np.random.Generator, n: int, shift: float = 0.1) -> np.ndarray:
    m = rng.normal(size=(n, n))
    return m @ m.T / n + shift * np.eye(n)


def _operator(rng: np.random.Generator) -> KroneckerOperator:
    """Three blocks over a permuted flat vector: full A, diagonal A, an exact block [1] ⊗ M."""
    blocks = [
        Kron(_spd(rng, 3), _spd(rng, 2)),
        Kron(rng.uniform(0.5, 2, size=4), _spd(rng, 3)),
        Kron(np.ones((1, 1)), _spd(rng, 5)),
    ]
    order = rng.permutation(6 + 12 + 5)
    indices = [order[:6], order[6:18], order[18:]]
    return KroneckerOperator(blocks, indices, 23, names=["a", "b", "c"])


def _dense_by_hand(K: KroneckerOperator) -> np.ndarray:
    out = np.zeros(K.shape)
    for block, index in zip(K.blocks, K._indices):
        index = np.arange(index.start, index.stop) if isinstance(index, slice) else index
        A = np.diag(block.A) if block.A.ndim == 1 else block.A
        out[np.ix_(index, index)] = np.kron(A, block.G)
    return out


def test_products_and_exact_quantities_match_the_dense_matrix() -> None:
    rng = np.random.default_rng(0)
    K = _operator(rng)
    D = _dense_by_hand(K)
    X = rng.normal(size=(23, 3))
    np.testing.assert_allclose(K @ X, D @ X, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(K.matvec(X[:, 0]), D @ X[:, 0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(K.rmatvec(X[:, 0]), D @ X[:, 0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(K.to_dense(), D, rtol=1e-12, atol=1e-14)
    assert K.trace() == pytest.approx(np.trace(D), rel=1e-12)
    np.testing.assert_allclose(K.diagonal(), np.diag(D), rtol=1e-12)
    assert K.frobenius_norm() == pytest.approx(np.linalg.norm(D), rel=1e-12)
    np.testing.assert_allclose(K.eigenvalues(), np.linalg.eigvalsh(D), rtol=1e-10, atol=1e-12)
    for damping in (0.0, 0.3):
        assert K.logdet(damping) == pytest.approx(np.linalg.slogdet(D + damping * np.eye(23))[1], rel=1e-10)


def test_inverses_match_their_formulas() -> None:
    rng = np.random.default_rng(1)
    K = _operator(rng)
    D, identity, damping = _dense_by_hand(K), np.eye(23), 0.2
    np.testing.assert_allclose(K.inverse(damping, heuristic="exact").to_dense(), np.linalg.inv(D + damping * identity), rtol=1e-9)
    # Factor damping: (A + √δ I)⁻¹ ⊗ (G + √δ I)⁻¹ block by block, and π-scaled.
    for heuristic in (None, "pi"):
        expected = np.zeros_like(D)
        for block, index in zip(K.blocks, K._indices):
            index = np.arange(index.start, index.stop) if isinstance(index, slice) else index
            A = np.diag(block.A) if block.A.ndim == 1 else block.A
            pi = np.sqrt((np.trace(A) / len(A)) / (np.trace(block.G) / len(block.G))) if heuristic == "pi" else 1.0
            root = np.sqrt(damping)
            inverse = np.kron(
                np.linalg.inv(A + pi * root * np.eye(len(A))), np.linalg.inv(block.G + root / pi * np.eye(len(block.G)))
            )
            expected[np.ix_(index, index)] = inverse
        np.testing.assert_allclose(K.inverse(damping, heuristic=heuristic).to_dense(), expected, rtol=1e-9)
    # The inverse is an operator usable by scipy.
    np.testing.assert_allclose(
        aslinearoperator(K.inverse(damping, "exact")) @ (D @ np.ones(23) + damping), np.ones(23), rtol=1e-9
    )


def test_eigen_blocks_match_dense() -> None:
    rng = np.random.default_rng(2)
    Ua, Ug = np.linalg.qr(rng.normal(size=(3, 3)))[0], np.linalg.qr(rng.normal(size=(2, 2)))[0]
    values = rng.uniform(0.1, 2, size=(3, 2))
    K = KroneckerOperator(
        [EigenKron(Ua, Ug, values), EigenKron(None, np.eye(1), values[:, :1])], [np.arange(6), np.arange(6, 9)], 9
    )
    U = np.kron(Ua, Ug)
    D = np.zeros((9, 9))
    D[:6, :6] = U @ np.diag(values.ravel()) @ U.T
    D[6:, 6:] = np.diag(values[:, 0])
    np.testing.assert_allclose(K.to_dense(), D, atol=1e-14)
    x = rng.normal(size=9)
    np.testing.assert_allclose(K @ x, D @ x, atol=1e-13)
    np.testing.assert_allclose(K.diagonal(), np.diag(D), atol=1e-14)
    assert K.trace() == pytest.approx(np.trace(D))
    assert K.frobenius_norm() == pytest.approx(np.linalg.norm(D))
    assert K.logdet(0.1) == pytest.approx(np.linalg.slogdet(D + 0.1 * np.eye(9))[1])
    np.testing.assert_allclose(K.inverse(0.1).to_dense(), np.linalg.inv(D + 0.1 * np.eye(9)), rtol=1e-10)


@pytest.mark.parametrize("as_file", [False, True])
def test_save_and_load_round_trip(tmp_path, as_file: bool) -> None:
    rng = np.random.default_rng(3)
    K = _operator(rng)
    E = K.inverse(0.5, heuristic="exact")
    for op in (K, E):
        if as_file:
            buffer = io.BytesIO()
            op.save(buffer)
            buffer.seek(0)
            loaded = hessop.load(buffer)
        else:
            path = tmp_path / "k.npz"
            op.save(str(path))
            loaded = hessop.load(path)
        assert isinstance(loaded, KroneckerOperator)
        assert loaded.names == op.names
        np.testing.assert_array_equal(loaded.to_dense(), op.to_dense())


def test_refusals_name_the_argument(tmp_path) -> None:
    rng = np.random.default_rng(4)
    K = _operator(rng)
    with pytest.raises(ValueError, match="damping"):
        K.inverse(-1.0)
    with pytest.raises(TypeError, match="damping"):
        K.logdet("0.1")
    with pytest.raises(ValueError, match="heuristic"):
        K.inverse(0.1, heuristic="tikhonov")
    singular = KroneckerOperator([Kron(np.zeros((2, 2)), np.eye(2))], [np.arange(4)], 4)
    with pytest.raises(ValueError, match="damping"):
        singular.logdet()
    with pytest.raises(ValueError, match="damping"):
        singular.inverse(0.0)
    with pytest.raises(ValueError, match="exactly one block"):
        KroneckerOperator([Kron(np.eye(2), np.eye(2))], [np.array([0, 1, 2, 2])], 4)
    with pytest.raises(ValueError, match="entries"):
        KroneckerOperator([Kron(np.eye(2), np.eye(2))], [np.arange(3)], 4)
    with pytest.raises(ValueError, match="max_params"):
        K.to_dense(max_params=5)
    with pytest.raises(ValueError, match=".npz"):
        K.save(tmp_path / "k.bin")
    bad = tmp_path / "bad.npz"
    np.savez(bad, format=np.array("hessop.kronecker_operator"), version=np.array(1), kind=np.array("kronecker"))
    with pytest.raises(ValueError, match="missing"):
        hessop.load(bad)
