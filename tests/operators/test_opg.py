"""OPGOperator and per_example_gradients against J^T J / N from autodiff."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from conftest import compiled_with_xla, dense_per_example_gradients, rel_err

import hessop
from hessop.dense.columns import dense_from_operator
from hessop.operators import opg


@pytest.mark.parametrize("parts", ["one part", "a part per variable"])
def test_opg_products_equal_jtj_over_n(case, parts, request):
    # Every column from OPG products (to_dense itself sums per-example gradients).
    if parts == "a part per variable":
        request.getfixturevalue("parts_per_variable")
    G = hessop.OPGOperator(case.model, case.loss_fn, (case.x, case.y), params=case.params, batch_size=16)
    J = dense_per_example_gradients(case)
    dense = dense_from_operator(G, max_params=10_000, block_size=5, closed_form=False)
    assert rel_err(dense, J.T @ J / case.num_data) < 1e-10


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_to_dense_sums_per_example_gradients_in_pieces(case, reduction, monkeypatch):
    # Rows for about 7 examples a GEMM: batches of 16 are cut into pieces,
    # and the pieces' rows are gathered across batch boundaries.
    G = hessop.OPGOperator(case.model, case.loss_fn, (case.x, case.y), params=case.params, batch_size=16, reduction=reduction)
    monkeypatch.setattr(opg, "_ROWS_BYTES", 7 * G.num_params * G.dtype.itemsize)
    pieces = []
    rows_of_batch = G._engine.per_example_gradients
    G._engine.per_example_gradients = lambda x, y: pieces.append(int(tf.shape(tf.nest.flatten(x)[0])[0])) or rows_of_batch(x, y)
    J = dense_per_example_gradients(case)
    expected = J.T @ J / (case.num_data if reduction == "mean" else 1)
    dense = G.to_dense()
    assert rel_err(dense, expected) < 1e-10
    assert np.array_equal(dense, dense.T)
    assert max(pieces) == 7 and sum(pieces) == case.num_data
    assert not G._engine._compiled  # no product was traced: only per-example gradients


def test_xla_compiled_opg_matches_autodiff(mlp):
    G = hessop.OPGOperator(mlp.model, mlp.loss_fn, (mlp.x, mlp.y), batch_size=20, jit_compile=True)
    J = dense_per_example_gradients(mlp)
    block = np.random.default_rng(5).normal(size=(G.shape[0], 2))
    assert rel_err(G @ block[:, 0], J.T @ (J @ block[:, 0]) / mlp.num_data) < 1e-10
    assert rel_err(G @ block, J.T @ (J @ block) / mlp.num_data) < 1e-10
    assert compiled_with_xla(G)


def test_sum_reduction_and_dataset(logistic):
    J = dense_per_example_gradients(logistic)
    dataset = tf.data.Dataset.from_tensor_slices((logistic.x, logistic.y)).batch(100)
    G_sum = hessop.OPGOperator(logistic.model, logistic.loss_fn, dataset, reduction="sum")
    assert rel_err(G_sum @ np.eye(5), J.T @ J) < 1e-10


def test_opg_is_uncentred(mlp):
    G = hessop.OPGOperator(mlp.model, mlp.loss_fn, (mlp.x, mlp.y))
    J = dense_per_example_gradients(mlp)
    mean_gradient = J.mean(axis=0)
    assert np.linalg.norm(mean_gradient) > 1e-2  # away from a stationary point
    dense = G.to_dense()
    assert rel_err(dense, np.cov(J.T, bias=True)) > 1e-2  # not the covariance
    assert rel_err(dense - np.outer(mean_gradient, mean_gradient), np.cov(J.T, bias=True)) < 1e-10


def test_per_example_gradients_of_every_case_match_autodiff(case):
    # One gradient per example, vectorised over the batch (conv, Embedding and two-input models too).
    stacked = hessop.per_example_gradients(
        case.model, case.loss_fn, (case.x, case.y), params=case.params, batch_size=9, concatenate=True
    )
    assert rel_err(stacked, dense_per_example_gradients(case)) < 1e-10


@pytest.mark.parametrize("batch_size", [5, 64])
def test_per_example_gradients(mlp, batch_size):
    expected = dense_per_example_gradients(mlp)
    blocks = list(hessop.per_example_gradients(mlp.model, mlp.loss_fn, (mlp.x, mlp.y), batch_size=batch_size))
    assert [b.shape[0] for b in blocks] == [batch_size] * (64 // batch_size) + ([64 % batch_size] if 64 % batch_size else [])
    assert rel_err(np.vstack(blocks), expected) < 1e-10
    stacked = hessop.per_example_gradients(mlp.model, mlp.loss_fn, (mlp.x, mlp.y), concatenate=True)
    assert rel_err(stacked, expected) < 1e-10
    with pytest.raises(ValueError, match="max_rows"):
        hessop.per_example_gradients(mlp.model, mlp.loss_fn, (mlp.x, mlp.y), concatenate=True, max_rows=10)
