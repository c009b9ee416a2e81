"""Exact second derivatives through tf.nn.moments, scoped to hessop's graphs (hessop/autodiff/moments.py)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import tensorflow as tf
from conftest import dense_hessian
from zoo import FD_RTOL, cnn_groupnorm_case, fd_hessian_product, layernorm_mlp_case

import hessop
from hessop.autodiff import moments as _moments


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_layernorm_hessian_matches_finite_differences_where_tensorflow_does_not():
    case = layernorm_mlp_case()
    H = hessop.HessianOperator(case.model, case.loss_fn, (case.x, case.y))
    v = np.random.default_rng(0).standard_normal(H.shape[1])
    expected = fd_hessian_product(case, v)
    assert _rel(H @ v, expected) < FD_RTOL
    # TensorFlow's own double backprop (the tape's) is far off: what hessop used to return.
    assert _rel(dense_hessian(case) @ v, expected) > 1e-2


def test_users_graphs_keep_tensorflows_moments():
    """Outside hessop's graphs tf.nn.moments is TensorFlow's own: its StopGradient stays."""
    case = layernorm_mlp_case()
    hessop.HessianOperator(case.model, case.loss_fn, (case.x, case.y))  # installs the switch

    @tf.function
    def users_function(x):
        return tf.nn.moments(x, axes=[-1])

    graph = users_function.get_concrete_function(tf.TensorSpec((None, 3), tf.float64)).graph
    assert any(op.type == "StopGradient" for op in graph.get_operations())
    mean, variance = tf.nn.moments(tf.constant([[1.0, 2.0, 4.0]], tf.float64), axes=[-1])  # eager
    np.testing.assert_allclose([float(mean[0]), float(variance[0])], [7 / 3, np.var([1.0, 2.0, 4.0])])


def test_moments_values_equal_tensorflows():
    x = tf.constant(np.random.default_rng(1).normal(size=(4, 3, 5)))
    for axes, keepdims in (([-1], False), ([1, 2], True), ([0], False)):
        expected = _moments._tensorflow_moments(x, axes, keepdims=keepdims)

        @_moments.exact_moments
        def inside(x, axes=axes, keepdims=keepdims):
            return tf.nn.moments(x, axes, keepdims=keepdims)

        actual = tf.function(inside)(x)
        for a, e in zip(actual, expected):
            np.testing.assert_allclose(a.numpy(), e.numpy(), rtol=1e-14)


def test_other_threads_are_not_switched_while_hessop_traces():
    """A user's graph traced on another thread, while hessop traces, keeps TensorFlow's moments."""
    case = layernorm_mlp_case()
    found = []
    stop = threading.Event()

    def users_thread():
        while not stop.is_set():
            fn = tf.function(lambda x: tf.nn.moments(x, axes=[-1]))
            graph = fn.get_concrete_function(tf.TensorSpec((None, 3), tf.float64)).graph
            found.append(any(op.type == "StopGradient" for op in graph.get_operations()))

    thread = threading.Thread(target=users_thread)
    thread.start()
    try:
        H = hessop.HessianOperator(case.model, case.loss_fn, (case.x, case.y))
        H @ np.ones(H.shape[1])
    finally:
        stop.set()
        thread.join()
    assert found and all(found)


def test_users_stop_gradient_stays_and_is_named():
    case = layernorm_mlp_case()
    model = case.model

    def frozen_scale(x):
        logits = model(x, training=False)
        return logits * tf.stop_gradient(tf.reduce_max(logits, axis=-1, keepdims=True))

    with pytest.warns(UserWarning, match=r"1 stop_gradient op\(s\) on a path from the parameters") as record:
        H = hessop.HessianOperator(frozen_scale, case.loss_fn, (case.x, case.y), params=model.trainable_variables)
    assert record[0].filename == __file__  # the user's line, not hessop's
    # The Hessian is that of the function with the stopped value held fixed.
    v = np.random.default_rng(2).standard_normal(H.shape[1])
    fixed = tf.stop_gradient(tf.reduce_max(model(case.x, training=False), axis=-1, keepdims=True))
    held = type(case)("held", lambda x: model(x, training=False) * fixed, case.loss_fn, case.x, case.y, model.trainable_variables)
    assert _rel(H @ v, fd_hessian_product(held, v)) < FD_RTOL


def test_no_warning_for_normalisation_layers(recwarn):
    case = layernorm_mlp_case()
    hessop.HessianOperator(case.model, case.loss_fn, (case.x, case.y))
    assert not [w for w in recwarn if "stop_gradient" in str(w.message)]


def test_groupnorm_and_mirrored_replicas():
    """Replica threads of a MirroredStrategy trace into hessop's graph: exact there too."""
    if len(tf.config.list_logical_devices("CPU")) < 2:
        pytest.skip("needs two logical CPU devices")
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        case = cnn_groupnorm_case()
    v = np.random.default_rng(3).standard_normal(sum(int(np.prod(w.shape)) for w in case.variables))
    expected = fd_hessian_product(case, v)
    H = hessop.HessianOperator(case.model, case.loss_fn, (case.x, case.y), batch_size=4, strategy=strategy)
    assert H.num_data == 8 and "2 replicas" in repr(H)
    assert _rel(H @ v, expected) < FD_RTOL


def test_the_switch_is_put_back_when_tensorflows_moments_is_restored(recwarn):
    """Something in the process restores TensorFlow's tf.nn.moments: the next trace switches it again."""
    case = layernorm_mlp_case()
    hessop.HessianOperator(case.model, case.loss_fn, (case.x, case.y))  # installs the switch
    switch = tf.nn.moments
    tf.nn.moments = _moments._tensorflow_moments  # as a module reload or another library would
    try:
        H = hessop.HessianOperator(case.model, case.loss_fn, (case.x, case.y))
        v = np.random.default_rng(3).standard_normal(H.shape[1])
        assert _rel(H @ v, fd_hessian_product(case, v)) < FD_RTOL
        assert tf.nn.moments is switch
    finally:
        tf.nn.moments = switch
    assert not [w for w in recwarn if "stop_gradient" in str(w.message)]
