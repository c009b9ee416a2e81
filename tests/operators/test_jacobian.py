"""JacobianOperator against closed forms and autodiff Jacobians; adjoint tests."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg as sla
from conftest import (
    Case,
    compiled_with_xla,
    dense_output_jacobian,
    dense_per_example_gradients,
    rel_err,
)

import hessop


def loss_jacobian(case, **kwargs):
    return hessop.JacobianOperator(case.model, case.loss_fn, (case.x, case.y), params=case.params, **kwargs)


def test_logistic_rows_are_residual_times_features(logistic):
    J = loss_jacobian(logistic, batch_size=128)
    kernel, bias = (v.numpy() for v in logistic.variables)
    p = 1 / (1 + np.exp(-(logistic.x @ kernel[:, 0] + bias[0])))
    expected = (p - logistic.y[:, 0])[:, None] * np.column_stack([logistic.x, np.ones(len(p))])
    assert J.shape == (1003, 5)
    assert rel_err(J @ np.eye(5), expected) < 1e-10
    assert rel_err(J.T @ np.eye(1003)[:, :7], expected.T[:, :7]) < 1e-10


def test_loss_jacobian_matches_autodiff(case):
    J = loss_jacobian(case, batch_size=16)
    assert rel_err(J @ np.eye(J.shape[1]), dense_per_example_gradients(case)) < 1e-10


def test_dense_columns_from_unit_rows_made_on_the_device(mlp):
    # dense_from_operator asks hessop's operators for their columns as rows
    # (_lower_block_rows: one part, all rows, for a non-symmetric operator).
    from hessop.dense.columns import dense_from_operator

    J = loss_jacobian(mlp, batch_size=16)
    assert not hasattr(J, "_dense_parts")
    dense = dense_from_operator(J, max_params=10_000, block_size=5)
    assert rel_err(dense, dense_per_example_gradients(mlp)) < 1e-10


def test_output_jacobian_matches_autodiff(case):
    Jf = hessop.JacobianOperator(case.model, None, (case.x, None), params=case.params, target="outputs", batch_size=16)
    expected = dense_output_jacobian(case)
    assert Jf.shape == expected.shape
    assert rel_err(Jf @ np.eye(Jf.shape[1]), expected) < 1e-10
    u = np.random.default_rng(0).normal(size=Jf.shape[0])
    assert rel_err(Jf.rmatvec(u), expected.T @ u) < 1e-10


@pytest.mark.parametrize("target", ["loss", "outputs"])
def test_row_blocks_are_the_rows_of_j_batch_by_batch(case, target):
    if target == "loss":
        J, expected = loss_jacobian(case, batch_size=7), dense_per_example_gradients(case)
    else:
        J = hessop.JacobianOperator(case.model, None, (case.x, None), params=case.params, target="outputs", batch_size=7)
        expected = dense_output_jacobian(case)
    blocks = list(J.row_blocks())
    assert [b.shape[0] for b in blocks] == [size * J.num_outputs for size in J._batches.batch_sizes]
    assert all(b.dtype == J.dtype for b in blocks)
    assert rel_err(np.vstack(blocks), expected) < 1e-10


@pytest.mark.parametrize("target", ["loss", "outputs"])
def test_xla_compiled_jacobian_matches_autodiff(mlp, target):
    data = (mlp.x, mlp.y) if target == "loss" else (mlp.x, None)
    J = hessop.JacobianOperator(mlp.model, mlp.loss_fn, data, target=target, batch_size=20, jit_compile=True)
    expected = dense_per_example_gradients(mlp) if target == "loss" else dense_output_jacobian(mlp)
    rng = np.random.default_rng(7)
    v, u = rng.normal(size=J.shape[1]), rng.normal(size=J.shape[0])
    assert rel_err(J @ v, expected @ v) < 1e-10
    assert rel_err(J.rmatvec(u), expected.T @ u) < 1e-10
    assert compiled_with_xla(J)


@pytest.mark.parametrize("target", ["loss", "outputs"])
def test_adjoint_dot_test(mlp, target):
    J = hessop.JacobianOperator(mlp.model, mlp.loss_fn, (mlp.x, mlp.y), target=target, batch_size=20)
    rng = np.random.default_rng(1)
    v = rng.normal(size=J.shape[1])
    w = rng.normal(size=J.shape[0])
    lhs, rhs = w @ (J @ v), v @ (J.H @ w)
    assert abs(lhs - rhs) <= 1e-12 * abs(lhs) + 1e-14
    block = rng.normal(size=(J.shape[0], 3))
    assert rel_err(J.H @ block, np.column_stack([J.rmatvec(block[:, i]) for i in range(3)])) < 1e-12


def test_empty_blocks_have_the_other_side_s_length(mlp):
    J = loss_jacobian(mlp)
    num_rows, num_params = J.shape
    assert J.matmat(np.ones((num_params, 0))).shape == (num_rows, 0)
    assert J.rmatmat(np.ones((num_rows, 0))).shape == (num_params, 0)
    assert J.tf_rmatmat(np.ones((num_rows, 0))).shape == (num_params, 0)


def test_svds_and_lsqr(mlp):
    J = loss_jacobian(mlp, batch_size=20)
    dense = dense_per_example_gradients(mlp)
    singular = np.sort(sla.svds(J, k=3, tol=1e-12, random_state=0)[1])
    assert np.allclose(singular, np.linalg.svd(dense, compute_uv=False)[:3][::-1], rtol=1e-8)
    b = np.random.default_rng(2).normal(size=J.shape[0])
    solution = sla.lsqr(J, b, atol=1e-14, btol=1e-14, iter_lim=2000)[0]
    assert rel_err(solution, np.linalg.lstsq(dense, b, rcond=None)[0]) < 1e-6


def test_outputs_of_several_heads_side_by_side(mlp):
    # A dict of two heads: rows n·C … n·C + C − 1 hold example n's outputs
    # of both, in sorted-key order, as for one concatenated output.
    import keras

    inputs = keras.Input((mlp.x.shape[1],), dtype="float64")
    first = keras.layers.Dense(2, activation="tanh", dtype="float64")(inputs)
    second = keras.layers.Dense(1, dtype="float64")(first)
    heads = keras.Model(inputs, {"b": second, "a": first})
    joined = keras.Model(inputs, keras.layers.Concatenate(dtype="float64")([first, second]))
    params = heads.trainable_variables
    reference = dense_output_jacobian(Case("joined", joined, None, mlp.x, None, params=params))
    J = hessop.JacobianOperator(heads, None, (mlp.x, None), params=params, target="outputs", batch_size=16)
    assert J.shape == (3 * mlp.num_data, len(reference[0])) and J.num_outputs == 3
    block = np.random.default_rng(5).normal(size=(J.shape[1], 2))
    assert rel_err(J @ block, reference @ block) < 1e-12
    cotangent = np.random.default_rng(6).normal(size=J.shape[0])
    assert rel_err(J.rmatvec(cotangent), reference.T @ cotangent) < 1e-12


def test_bad_target_and_scalar_loss(mlp):
    import keras

    with pytest.raises(ValueError, match="target"):
        hessop.JacobianOperator(mlp.model, mlp.loss_fn, (mlp.x, mlp.y), target="logits")
    keras_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64")

    def mean_loss(y, f):  # a plain callable's scalar: no per-example values to be had
        return keras_loss(y, f)

    with pytest.raises(ValueError, match="^loss_fn: per-example quantities .* need per-example losses"):
        hessop.JacobianOperator(mlp.model, mean_loss, (mlp.x, mlp.y))
    with pytest.raises(TypeError, match=r"^model: expected output tensors, got dict with none\.$"):
        hessop.JacobianOperator(lambda x: {}, None, (mlp.x, None), params=mlp.model.trainable_variables, target="outputs")
    J = loss_jacobian(mlp)
    with pytest.raises(ValueError, match="dimension mismatch"):
        J.rmatvec(np.ones(3))
