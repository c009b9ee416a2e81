"""block_diagonal: per-layer blocks of an operator against its dense matrix."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg as sla

import hessop


def _dense_blocks(dense: np.ndarray, indices: list[np.ndarray]) -> np.ndarray:
    out = np.zeros_like(dense)
    for index in indices:
        out[np.ix_(index, index)] = dense[np.ix_(index, index)]
    return out


def test_layer_blocks_of_a_ggn(mlp):
    G = hessop.GGNOperator(mlp.model, mlp.loss_fn, (mlp.x, mlp.y), params=mlp.params)
    dense = G.to_dense()
    B = hessop.block_diagonal(G, "layer")
    # The mlp case has two Dense layers: kernel and bias of each in one block.
    assert len(B) == len(mlp.variables) // 2
    expected = _dense_blocks(dense, B.indices)
    np.testing.assert_allclose(B.to_dense(), expected, rtol=1e-10, atol=1e-12 * np.abs(dense).max())
    x = np.random.default_rng(0).normal(size=(G.shape[0], 2))
    np.testing.assert_allclose(B @ x, expected @ x, rtol=1e-10, atol=1e-12)
    traces = B.trace()
    for name, index in zip(B.names, B.indices):
        block = dense[np.ix_(index, index)]
        assert traces[name] == pytest.approx(np.trace(block), rel=1e-10)
        top = np.linalg.eigvalsh(block)[-2:][::-1]
        np.testing.assert_allclose(B.eigen(k=2)[name][0], top, rtol=1e-8)
    by_variable = hessop.block_diagonal(G, "variable")
    assert len(by_variable) == len(mlp.variables)


def test_large_blocks_use_lanczos_and_given_groups():
    rng = np.random.default_rng(1)
    m = rng.normal(size=(150, 150))
    dense = m @ m.T
    A = sla.aslinearoperator(dense)
    indices = [np.arange(0, 100), np.arange(100, 150)]
    B = hessop.block_diagonal(A, indices, names=["big", "small"])
    values, _ = B.eigen(k=3)["big"]
    np.testing.assert_allclose(values, np.linalg.eigvalsh(dense[:100, :100])[-3:][::-1], rtol=1e-8)
    traces = B.trace(num_matvecs=99)  # the small block exactly, the big one by Hutch++ on all its 99 probes
    assert traces["small"] == pytest.approx(np.trace(dense[100:, 100:]))
    assert traces["big"] == pytest.approx(np.trace(dense[:100, :100]), rel=0.05)


def test_refusals():
    A = sla.aslinearoperator(np.eye(4))
    with pytest.raises(ValueError, match="exactly one block"):
        hessop.block_diagonal(A, [np.arange(3), np.arange(2, 4)])
    with pytest.raises(ValueError, match="blocks"):
        hessop.block_diagonal(A, "layers")
    with pytest.raises(TypeError, match="op.params"):
        hessop.block_diagonal(A, "layer")
    with pytest.raises(TypeError, match="square"):
        hessop.block_diagonal(sla.aslinearoperator(np.ones((2, 3))), [np.arange(2)])
    with pytest.raises(ValueError, match="names"):
        hessop.block_diagonal(A, [np.arange(4)], names=["a", "b"])
