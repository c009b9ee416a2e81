"""pfor rules while hessop traces: same values as a Python loop, no transposes or tiles, TF's rules restored."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import threading

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import Case, dense_hessian, dense_per_example_gradients, tensorflow_log
from tensorflow.python.ops.parallel_for import pfor as tf_pfor

from hessop import HessianOperator, per_example_gradients
from hessop.autodiff import pfor as _pfor
from hessop.autodiff.pfor import pfor_rules
from hessop.autodiff.vectorize import ENVIRONMENT_VARIABLE, quiet_conversion_errors

K = 3
RNG = np.random.default_rng(0)


def random(*shape: int, dtype: tf.DType = tf.float64) -> tf.Tensor:
    values = RNG.normal(size=shape)
    if dtype.is_complex:
        values = values + 1j * RNG.normal(size=shape)
    return tf.constant(values, dtype=dtype)


def looped(fn, stacked) -> tf.Tensor:
    """fn on each slice of ``stacked`` (a tensor or a tuple of tensors), stacked."""
    return tf.stack([fn(tf.nest.map_structure(lambda t, i=i: t[i], stacked)) for i in range(K)])


def vectorized(fn, stacked) -> tf.Tensor:
    # Traced, as in the engine: the rules apply while the graph is built.
    @tf.function
    def run(stacked) -> tf.Tensor:
        with pfor_rules():
            return tf.vectorized_map(fn, stacked)

    return run(stacked)


def op_types(fn, stacked: tf.Tensor, *, patched: bool) -> list[str]:
    def build(stacked: tf.Tensor) -> tf.Tensor:
        if patched:
            with pfor_rules():
                return tf.vectorized_map(fn, stacked)
        return tf.vectorized_map(fn, stacked)

    graph = tf.function(build).get_concrete_function(stacked).graph
    # Only ops the result depends on: pfor leaves the unconverted loop body in the graph.
    live, pending = set(), [t.op for t in graph.outputs]
    while pending:
        op = pending.pop()
        if op not in live:
            live.add(op)
            pending.extend(t.op for t in op.inputs)
    return [op.type for op in live]


@pytest.mark.parametrize("stacked", ["a", "b", "ab"])
@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
def test_matmul_rule_matches_a_loop(stacked, transpose_a, transpose_b):
    # (4, 5)·(5, 2) with either operand, or both, stacked over K vectors;
    # distinct sizes so that a wrong axis cannot pass.
    a_shape = (5, 4) if transpose_a else (4, 5)
    b_shape = (2, 5) if transpose_b else (5, 2)
    a, b = random(K, *a_shape), random(K, *b_shape)

    def product(elems: tuple[tf.Tensor, ...]) -> tf.Tensor:
        left = elems[0] if "a" in stacked else a[0]
        right = elems[-1] if "b" in stacked else b[0]
        return tf.matmul(left, right, transpose_a=transpose_a, transpose_b=transpose_b)

    elems = tuple(t for name, t in (("a", a), ("b", b)) if name in stacked)
    np.testing.assert_allclose(vectorized(product, elems), looped(product, elems), rtol=1e-13, atol=1e-13)


def test_stacked_right_operand_is_not_transposed():
    x = random(6, 4)

    def layer(w: tf.Tensor) -> tf.Tensor:
        return tf.matmul(x, w)

    weights = random(K, 4, 3)
    assert "Transpose" in op_types(layer, weights, patched=False)  # TF's rule, which the test would catch
    assert "Transpose" not in op_types(layer, weights, patched=True)
    np.testing.assert_allclose(vectorized(layer, weights), looped(layer, weights), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("dtype", [tf.float64, tf.complex128])
@pytest.mark.parametrize("adj_x", [False, True])
@pytest.mark.parametrize("adj_y", [False, True])
@pytest.mark.parametrize("dot", [True, False])
def test_batch_matmul_rule_matches_a_loop(dtype, adj_x, adj_y, dot):
    # Row times column (the softmax cross-entropy pattern), or a general product.
    rows, cols = (1, 1) if dot else (2, 3)
    # A batch of 5 products of (rows, 4)·(4, cols), each operand possibly adjoint.
    x_shape = (5, 4, rows) if adj_x else (5, rows, 4)
    y_shape = (5, cols, 4) if adj_y else (5, 4, cols)
    x_fixed = random(*x_shape, dtype=dtype)
    x_stacked, y_stacked = random(K, *x_shape, dtype=dtype), random(K, *y_shape, dtype=dtype)

    def right(y: tf.Tensor) -> tf.Tensor:
        return tf.linalg.matmul(x_fixed, y, adjoint_a=adj_x, adjoint_b=adj_y)

    def left(x: tf.Tensor) -> tf.Tensor:
        return tf.linalg.matmul(x, y_stacked[0], adjoint_a=adj_x, adjoint_b=adj_y)

    def both(xy: tuple[tf.Tensor, tf.Tensor]) -> tf.Tensor:
        return tf.linalg.matmul(xy[0], xy[1], adjoint_a=adj_x, adjoint_b=adj_y)

    for fn, elems in [(right, y_stacked), (left, x_stacked), (both, (x_stacked, y_stacked))]:
        np.testing.assert_allclose(vectorized(fn, elems), looped(fn, elems), rtol=1e-13, atol=1e-13)
    if dot:
        assert "BatchMatMulV2" in op_types(right, y_stacked, patched=False)  # TF's rule, which the test would catch
        assert "BatchMatMulV2" not in op_types(right, y_stacked, patched=True)


ACTIVATION_GRADIENTS = {
    # op: (gradient argument, activation argument)
    "TanhGrad": ("dy", "y"),
    "SigmoidGrad": ("dy", "y"),
    "ReluGrad": ("gradients", "features"),
}


@pytest.mark.parametrize("op_type", sorted(ACTIVATION_GRADIENTS))
def test_activation_gradient_rule_matches_a_loop(op_type):
    gradient_name, activation_name = ACTIVATION_GRADIENTS[op_type]
    op = getattr(tf.raw_ops, op_type)
    # Activations in (-1, 1) with exact zeros (ReluGrad's boundary); NaN
    # gradients where ReluGrad selects zero and where it passes them on.
    activation = tf.constant(np.tanh(RNG.normal(size=(4, 5))) * (RNG.random((4, 5)) > 0.2))
    gradient = RNG.normal(size=(K, 4, 5))
    gradient[0, 0, :] = np.nan
    gradient = tf.constant(gradient)

    def stacked_gradient(g: tf.Tensor) -> tf.Tensor:
        return op(**{gradient_name: g, activation_name: activation})

    def stacked_activation(a: tf.Tensor) -> tf.Tensor:  # TF's rule, left in place
        return op(**{gradient_name: gradient[1], activation_name: a})

    def both(ga: tuple[tf.Tensor, tf.Tensor]) -> tf.Tensor:
        return op(**{gradient_name: ga[0], activation_name: ga[1]})

    activations = tf.stack([activation, -activation, activation**2])
    for fn, elems in [(stacked_gradient, gradient), (stacked_activation, activations), (both, (gradient, activations))]:
        np.testing.assert_allclose(vectorized(fn, elems), looped(fn, elems), rtol=1e-15, atol=0)
    assert "Tile" in op_types(stacked_gradient, gradient, patched=False)  # TF's rule, which the test would catch
    assert "Tile" not in op_types(stacked_gradient, gradient, patched=True)


def test_tensorflow_rules_are_restored_after_errors_nesting_and_threads():
    original = dict(tf_pfor._pfor_converter_registry)
    with pytest.raises(RuntimeError), pfor_rules():
        raise RuntimeError("inside")
    assert tf_pfor._pfor_converter_registry == original

    with pfor_rules():
        with pfor_rules():
            pass
        # The outer holder still has hessop's rule after the inner one leaves.
        assert tf_pfor._pfor_converter_registry["MatMul"] is _pfor._RULES["MatMul"]
    assert tf_pfor._pfor_converter_registry == original

    barrier = threading.Barrier(4)

    def hold() -> None:
        with pfor_rules():
            barrier.wait()

    threads = [threading.Thread(target=hold) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert tf_pfor._pfor_converter_registry == original


@pytest.fixture
def hessop_rules(monkeypatch):
    """Operators traced in the test vectorise with this module's rules (opt-in: HESSOP_PFOR_RULES=1)."""
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "1")


def test_the_default_path_never_loads_the_private_rules():
    # A block product and per-example gradients without HESSOP_PFOR_RULES, in a fresh process.
    code = textwrap.dedent(
        """
        import sys
        import numpy as np, tensorflow as tf, hessop
        w = tf.Variable([[1.0], [2.0]], dtype=tf.float64)
        model = lambda x: tf.tanh(tf.matmul(x, w))[:, 0]
        data = (np.random.default_rng(0).normal(size=(8, 2)), np.zeros(8))
        H = hessop.HessianOperator(model, lambda y, f: (f - y) ** 2, data, params=[w])
        H @ np.ones((2, 3))
        hessop.per_example_gradients(model, lambda y, f: (f - y) ** 2, data, params=[w], concatenate=True)
        assert "hessop.autodiff.pfor" not in sys.modules
        """
    )
    env = {key: value for key, value in os.environ.items() if key != ENVIRONMENT_VARIABLE}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]


def test_block_product_and_per_example_gradients_leave_tensorflow_rules_in_place(mlp, hessop_rules):
    original = dict(tf_pfor._pfor_converter_registry)
    H = HessianOperator(mlp.model, mlp.loss_fn, (mlp.x, mlp.y), hvp_mode="reverse")
    V = RNG.normal(size=(H.shape[0], 3))
    np.testing.assert_allclose(H.matmat(V), np.column_stack([H.matvec(v) for v in V.T]), rtol=1e-12, atol=1e-12)
    assert tf_pfor._pfor_converter_registry == original
    rows = per_example_gradients(mlp.model, mlp.loss_fn, (mlp.x, mlp.y), batch_size=16, concatenate=True)
    np.testing.assert_allclose(rows, dense_per_example_gradients(mlp), rtol=1e-10, atol=1e-12)
    assert tf_pfor._pfor_converter_registry == original


def activation_case(activation: str) -> Case:
    """A tiny float64 MLP whose second backward pass has ReluGrad or SigmoidGrad."""
    keras.utils.set_random_seed(5)
    rng = np.random.default_rng(5)
    model = keras.Sequential(
        [
            keras.Input((3,), dtype="float64"),
            keras.layers.Dense(4, activation=activation, dtype="float64"),
            keras.layers.Dense(3, dtype="float64"),
        ]
    )
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None, dtype="float64")
    return Case(activation, model, loss, rng.normal(size=(12, 3)), rng.integers(0, 3, size=12))


@pytest.mark.parametrize("activation", ["relu", "sigmoid"])
@pytest.mark.parametrize("hvp_mode", ["reverse", "forward"])
def test_block_products_through_the_rules_match_a_dense_hessian(activation, hvp_mode, hessop_rules):
    case = activation_case(activation)
    H = HessianOperator(case.model, case.loss_fn, (case.x, case.y), batch_size=5, hvp_mode=hvp_mode)
    V = RNG.normal(size=(H.shape[0], 4))
    np.testing.assert_allclose(H.matmat(V), dense_hessian(case) @ V, rtol=1e-10, atol=1e-12)


def test_quiet_conversion_errors_drops_only_pfor_conversion_errors():
    # Records as pfor's _convert_helper and another TF module make them.
    pfor_path = tf_pfor.__file__

    def record(path: str, function: str, level: int) -> logging.LogRecord:
        return logging.LogRecord("tensorflow", level, path, 1, "message", None, None, func=function)

    logger = tf.get_logger()
    filters = list(logger.filters)
    conversion_error = record(pfor_path, "_convert_helper", logging.ERROR)
    others = [
        record(pfor_path, "_convert_helper", logging.WARNING),
        record(pfor_path, "_fallback_converter", logging.ERROR),
        record(tf.__file__, "_convert_helper", logging.ERROR),
    ]
    with tensorflow_log() as passed:
        with quiet_conversion_errors():
            for each in [conversion_error, *others]:
                logger.handle(each)
        logger.handle(conversion_error)
    assert passed == [*others, conversion_error]
    assert logger.filters == filters
