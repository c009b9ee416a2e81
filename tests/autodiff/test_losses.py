"""Keras losses whatever their reduction, sample weights, losses by name or from compile (hessop/autodiff/losses.py)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import F64, mlp_case, rel_err

import hessop

SCE = keras.losses.SparseCategoricalCrossentropy
SYMMETRIC = [hessop.HessianOperator, hessop.GGNOperator, hessop.OPGOperator]


def _products(loss, operators=SYMMETRIC, batch_size=10, strategy=None, case=None):
    case = case or mlp_case(num_data=32)
    v = np.random.default_rng(0).standard_normal(sum(int(np.prod(w.shape)) for w in case.model.trainable_variables))
    return [op(case.model, loss, (case.x, case.y), batch_size=batch_size, strategy=strategy) @ v for op in operators]


@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "sum", "mean"])
def test_keras_loss_reduction_does_not_change_the_operator(reduction):
    expected = _products(SCE(from_logits=True, reduction=None, dtype=F64))
    actual = _products(SCE(from_logits=True, reduction=reduction, dtype=F64))
    for a, e in zip(actual, expected):
        assert rel_err(a, e) < 1e-13


def test_jacobian_takes_a_default_reduction_loss():
    case = mlp_case(num_data=20)
    J = hessop.JacobianOperator(case.model, SCE(from_logits=True, dtype=F64), (case.x, case.y), batch_size=7)
    reference = hessop.JacobianOperator(case.model, case.loss_fn, (case.x, case.y))
    v = np.random.default_rng(1).standard_normal(J.shape[1])
    assert rel_err(J @ v, reference @ v) < 1e-13


def test_keras_loss_under_mirrored_strategy_is_not_divided_by_replicas():
    if len(tf.config.list_logical_devices("CPU")) < 2:
        pytest.skip("needs two logical CPU devices")
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    case = mlp_case(num_data=32)
    with strategy.scope():
        distributed_model = keras.models.clone_model(case.model)
    distributed_model.set_weights(case.model.get_weights())
    distributed = mlp_case(num_data=32)
    distributed.model = distributed_model
    loss = SCE(from_logits=True, dtype=F64)  # default reduction: Keras halves it in a 2-replica context
    expected = _products(loss)
    actual = _products(loss, strategy=strategy, case=distributed)
    for a, e in zip(actual, expected):
        assert rel_err(a, e) < 1e-12


def test_sequence_losses_are_averaged_over_positions():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(12, 4, 3)), rng.integers(0, 2, size=(12, 4))
    keras.utils.set_random_seed(2)
    model = keras.Sequential([keras.Input((4, 3), dtype=F64), keras.layers.Dense(2, dtype=F64)])
    H = hessop.HessianOperator(model, SCE(from_logits=True, dtype=F64), (x, y), batch_size=5)
    keras_loss = float(SCE(from_logits=True, dtype=F64)(y, model(x)))
    assert H.loss == pytest.approx(keras_loss, rel=1e-13)


def test_sample_weights_multiply_the_per_example_losses():
    case = mlp_case(num_data=30)
    w = np.random.default_rng(3).uniform(size=30)
    loss = SCE(from_logits=True, dtype=F64)
    weighted = hessop.HessianOperator(case.model, loss, (case.x, case.y, w), batch_size=8)
    # Keras's own weighted loss: the weights multiply, the mean divides by N.
    assert weighted.loss == pytest.approx(float(loss(case.y, case.model(case.x), sample_weight=w)), rel=1e-13)
    reweighted = hessop.HessianOperator(
        case.model, lambda yw, f: yw[1] * case.loss_fn(yw[0], f), (case.x, (case.y, w)), batch_size=8
    )
    v = np.random.default_rng(4).standard_normal(weighted.shape[1])
    assert rel_err(weighted @ v, reweighted @ v) < 1e-13
    dataset = tf.data.Dataset.from_tensor_slices((case.x, case.y, w)).batch(8)
    assert (
        rel_err(
            hessop.GGNOperator(case.model, loss, dataset) @ v,
            hessop.GGNOperator(case.model, lambda yw, f: yw[1] * case.loss_fn(yw[0], f), (case.x, (case.y, w))) @ v,
        )
        < 1e-13
    )


def test_bad_sample_weights_are_refused():
    case = mlp_case(num_data=10)
    with pytest.raises(ValueError, match=r"sample_weight must be one array of shape \(N,\)"):
        hessop.HessianOperator(case.model, case.loss_fn, (case.x, case.y, np.ones((10, 3))))
    with pytest.raises(ValueError, match="x and y have different lengths"):
        hessop.HessianOperator(case.model, case.loss_fn, (case.x, case.y, np.ones(9)))
    scalar = SCE(from_logits=True, dtype=F64)
    with pytest.raises(ValueError, match="sample weights need per-example losses"):
        hessop.HessianOperator(case.model, lambda y, f: tf.reduce_mean(scalar.call(y, f)), (case.x, case.y, np.ones(10)))


def test_loss_by_name_and_from_compile():
    case = mlp_case(num_data=20)
    probabilities = keras.Sequential([case.model, keras.layers.Softmax(dtype=F64)])
    by_name = hessop.HessianOperator(probabilities, "sparse_categorical_crossentropy", (case.x, case.y))
    # Keras clips probabilities at 1e-7: close to, not exactly, the logits loss
    assert by_name.loss == pytest.approx(float(np.mean(case.per_example_loss())), rel=1e-6)
    probabilities.compile(loss=SCE(dtype=F64))
    compiled = hessop.HessianOperator(probabilities, None, (case.x, case.y))
    v = np.random.default_rng(5).standard_normal(by_name.shape[1])
    assert rel_err(compiled @ v, by_name @ v) < 1e-12
    with pytest.raises(ValueError, match="not the name of a Keras loss"):
        hessop.HessianOperator(case.model, "no_such_loss", (case.x, case.y))


def test_missing_loss_is_refused_with_the_fix():
    case = mlp_case(num_data=10)
    with pytest.raises(ValueError, match="not compiled with a loss; pass loss_fn"):
        hessop.GGNOperator(case.model, None, (case.x, case.y))
    case.model.compile(loss=[SCE(), SCE()])
    with pytest.raises(ValueError, match="one loss per output"):
        hessop.HessianOperator(case.model, None, (case.x, case.y))


@pytest.mark.parametrize("cut", ["short", "mean_of_one"])
def test_wrong_number_of_loss_values_is_refused(cut):
    case = mlp_case(num_data=32)
    if cut == "short":
        loss = lambda y, f: case.loss_fn(y, f)[:-1]  # noqa: E731
        expected = r"returned 9 values for batch 0 of 10 examples"
    else:
        loss = lambda y, f: tf.reduce_mean(case.loss_fn(y, f), keepdims=True)  # noqa: E731
        expected = r"returned 1 values for batch 0 of 10 examples"
    with pytest.raises(ValueError, match=expected):
        hessop.HessianOperator(case.model, loss, (case.x, case.y), batch_size=10)


def test_scalar_loss_still_works_for_the_hessian_and_is_refused_per_example():
    case = mlp_case(num_data=24)
    mean_loss = lambda y, f: tf.reduce_mean(case.loss_fn(y, f))  # noqa: E731
    H = hessop.HessianOperator(case.model, mean_loss, (case.x, case.y))
    reference = hessop.HessianOperator(case.model, case.loss_fn, (case.x, case.y))
    v = np.random.default_rng(6).standard_normal(H.shape[1])
    assert rel_err(H @ v, reference @ v) < 1e-13
    with pytest.raises(ValueError, match="Pass a keras.losses.Loss object"):
        hessop.OPGOperator(case.model, mean_loss, (case.x, case.y))


def test_sample_weights_reach_closed_form_dense_blocks_and_rows():
    case = mlp_case(num_data=30)
    w = np.random.default_rng(3).uniform(size=30)
    loss = SCE(from_logits=True, dtype=F64)
    for operator in SYMMETRIC:  # to_dense takes the first kernel's block in closed form
        A = operator(case.model, loss, (case.x, case.y, w), batch_size=8)
        assert rel_err(A.to_dense(), A @ np.eye(A.shape[0])) < 1e-12
    J = hessop.JacobianOperator(case.model, loss, (case.x, case.y, w), batch_size=8)
    assert rel_err(np.concatenate(list(J.row_blocks())), J @ np.eye(J.shape[1])) < 1e-12
