"""Refusals of suspicious input across the package, and warnings attributed to the user's line."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
import scipy.sparse.linalg as sla
import tensorflow as tf
from conftest import F64, mlp_case

import hessop
from hessop._validation import check_symmetric, warn


def test_warn_points_at_the_users_line():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        warn("direct")
    assert record[0].filename == __file__


def test_traced_warning_points_at_the_users_line():
    case = mlp_case(num_data=8)
    with pytest.warns(UserWarning, match="loss_fn returned float32") as record:
        hessop.HessianOperator(case.model, keras.losses.SparseCategoricalCrossentropy(from_logits=True), (case.x, case.y))
    assert record[0].filename == __file__


def test_non_symmetric_operator_is_refused_where_a_symmetric_one_is_needed():
    matrix = np.array([[2.0, 1.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match="hessian: expected a symmetric operator"):
        hessop.covariance(sla.aslinearoperator(matrix), num_data=10, method="dense")
    with pytest.raises(ValueError, match="expected a symmetric operator"):
        hessop.standard_errors(sla.aslinearoperator(matrix), num_data=10)
    with pytest.raises(ValueError, match="op: expected a symmetric operator"):
        hessop.eigen(sla.aslinearoperator(np.diag([3.0, 2.0, 1.0]) + np.triu(np.ones((3, 3)), 1)), k=1)
    symmetric = np.array([[2.0, 0.5], [0.5, 1.0]])
    check_symmetric(sla.aslinearoperator(symmetric), "hessian")  # passes
    check_symmetric(sla.aslinearoperator(symmetric.astype(np.float32) * (1 + 1e-7)), "hessian")


def test_summary_refuses_a_negative_variance_as_standard_errors_does():
    beta = tf.Variable([1.0, -0.2], dtype=tf.float64, name="beta")
    cov = np.diag([0.04, -0.01])
    with pytest.raises(ValueError, match="negative variance"):
        hessop.summary([beta], cov)
    with pytest.raises(ValueError, match="not positive definite"):
        hessop.standard_errors(sla.aslinearoperator(np.diag([4.0, -1.0])), num_data=10)


def test_predictive_variance_refuses_an_indefinite_covariance():
    w = tf.Variable([1.0, 2.0], dtype=tf.float64)
    x = np.array([[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match="predictive variance is negative for 1 of 2 examples"):
        hessop.predictive_variance(lambda x: tf.linalg.matvec(x, w)[:, None], x, np.diag([0.5, -0.25]), params=[w])


def test_eigen_refuses_bad_power_iterations_and_tol():
    A = sla.aslinearoperator(np.diag([3.0, 2.0, 1.0]))
    with pytest.raises(ValueError, match=r"power_iterations: expected an int >= 0, got -1"):
        hessop.eigen(A, k=1, method="randomized", power_iterations=-1)
    for tol in (np.nan, -1.0, "1e-3"):
        with pytest.raises(ValueError, match="tol: expected a finite number >= 0"):
            hessop.eigen(A, k=1, tol=tol)


def test_spectral_density_of_a_psd_operator_reports_no_negative_mass():
    rng = np.random.default_rng(0)
    factor = rng.standard_normal((60, 5))
    gram = factor @ factor.T / 60  # PSD, rank 5: Lanczos meets its zero eigenvalues at ± round-off
    density = hessop.spectral_density(sla.aslinearoperator(gram), num_probes=4, num_lanczos=20, seed=0)
    assert " 0.0% of the mass below -σ" in str(density)


def test_half_precision_operator_dtype_is_refused():
    case = mlp_case(num_data=8)
    with pytest.raises(ValueError, match="dtype: float16 is too narrow"):
        hessop.HessianOperator(case.model, case.loss_fn, (case.x, case.y), dtype="float16")


def test_mixed_precision_inside_a_custom_layer_is_refused():
    class Block(keras.layers.Layer):
        def __init__(self):
            super().__init__(dtype="float32")
            self.inner = keras.layers.Dense(3, dtype="mixed_float16")

        def call(self, x):
            return tf.cast(self.inner(x), "float32")

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(1)(Block()(inputs)))
    x, y = np.ones((6, 4), np.float32), np.zeros((6, 1), np.float32)
    with pytest.raises(ValueError, match="compute in half precision"):
        hessop.HessianOperator(model, keras.losses.MeanSquaredError(reduction=None), (x, y))
    with pytest.raises(ValueError, match="compute in half precision"):
        hessop.JacobianOperator(model, None, (x, None), target="outputs")


def test_dataset_of_unknown_length_is_refused_not_hung():
    case = mlp_case(num_data=8)

    def forever():
        while True:
            yield case.x, case.y

    spec = (tf.TensorSpec((None, 5), tf.float64), tf.TensorSpec((None,), tf.int64))
    endless = tf.data.Dataset.from_generator(forever, output_signature=spec)
    with pytest.raises(ValueError, match="number of batches is unknown.*assert_cardinality"):
        hessop.HessianOperator(case.model, case.loss_fn, endless)
    counted = tf.data.Dataset.from_generator(lambda: iter([(case.x, case.y)]), output_signature=spec)
    H = hessop.HessianOperator(case.model, case.loss_fn, counted.apply(tf.data.experimental.assert_cardinality(1)))
    assert H.num_data == 8


@pytest.mark.parametrize("where", ["x", "y"])
def test_inf_in_data_is_named_at_construction(where):
    case = mlp_case(num_data=8)
    x = case.x.copy()
    x[3, 1] = np.inf  # tanh(inf) = 1: the loss stays finite
    with pytest.raises(ValueError, match=r"x has non-finite values \(NaN or inf\) in 1 of its 8 examples \(rows 3"):
        if where == "x":
            hessop.HessianOperator(case.model, case.loss_fn, (x, case.y))
        else:
            hessop.JacobianOperator(case.model, None, (x, None), target="outputs")


def test_strings_and_numpy_inside_a_loss_get_messages_in_hessops_words():
    case = mlp_case(num_data=8)
    with pytest.raises(TypeError, match="holds strings.*StringLookup"):
        hessop.HessianOperator(case.model, case.loss_fn, (np.full((8, 5), "a"), case.y))

    def numpy_loss(y, f):
        return np.mean(np.asarray(f), axis=1)

    with pytest.raises(TypeError, match="calls numpy on a tensor.*keras.ops"):
        hessop.HessianOperator(case.model, numpy_loss, (case.x, case.y))


def test_float64_keras_loss_keeps_float64():
    case = mlp_case(num_data=8)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hessop.HessianOperator(case.model, loss, (case.x, case.y))
