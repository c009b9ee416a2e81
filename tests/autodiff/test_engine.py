"""The engine: fallbacks where TensorFlow's fast paths fail (a Keras RNN layer), variable parts, traced signatures.

Forward-mode autodiff cannot pass the while loop of a Keras ``SimpleRNN``
(its captured variables have no handle data), and pfor cannot vectorise the
second derivative through it. Every operator must still give the products of
the dense references, with a warning that says what it does instead.
"""

from __future__ import annotations

import logging
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import Case, dense_ggn, dense_hessian, dense_output_jacobian, dense_per_example_gradients, tensorflow_log

from hessop import GGNOperator, HessianOperator, JacobianOperator, OPGOperator
from hessop.autodiff import engine as _engine
from hessop.operators.ggn import ggn
from hessop.operators.hessian import hvp_forward, hvp_reverse
from hessop.operators.jacobian import jvp_loss
from hessop.operators.opg import opg

RNG = np.random.default_rng(7)
NOT_VECTORISED = "cannot be vectorised"
TWO_REVERSE_PASSES = "two reverse passes"


@pytest.fixture(scope="module")
def rnn() -> Case:
    keras.utils.set_random_seed(6)
    rng = np.random.default_rng(6)
    model = keras.Sequential(
        [keras.Input((4, 2), dtype="float64"), keras.layers.SimpleRNN(3, dtype="float64"), keras.layers.Dense(3, dtype="float64")]
    )
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None, dtype="float64")
    return Case("rnn", model, loss, rng.normal(size=(12, 4, 2)), rng.integers(0, 3, size=12))


def check(operator, dense: np.ndarray, *, looped: bool = True) -> None:
    """Matvec and a block of 3 against ``dense``; whether the block warned that it loops.

    The warning is all the block says: pfor's own report of each op it could
    not convert (NodeDefs and stacks, logged at ERROR) stays out of the log.
    """
    vector = RNG.normal(size=dense.shape[1])
    block = RNG.normal(size=(dense.shape[1], 3))
    np.testing.assert_allclose(operator.matvec(vector), dense @ vector, rtol=1e-10, atol=1e-12)
    with tensorflow_log() as logged, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        np.testing.assert_allclose(operator.matmat(block), dense @ block, rtol=1e-10, atol=1e-12)
    assert any(NOT_VECTORISED in str(w.message) for w in caught) == looped
    assert [record.getMessage()[:80] for record in logged if record.levelno >= logging.ERROR] == []


def test_hessian_reverse_loops_over_a_block_that_pfor_cannot_vectorise(rnn):
    H = HessianOperator(rnn.model, rnn.loss_fn, (rnn.x, rnn.y), batch_size=5, hvp_mode="reverse")
    check(H, dense_hessian(rnn))


def test_hessian_auto_keeps_reverse_when_forward_mode_fails(rnn, monkeypatch):
    monkeypatch.setattr(_engine, "_MODE_SEARCH_AFTER", 0.0)  # search on the first product
    H = HessianOperator(rnn.model, rnn.loss_fn, (rnn.x, rnn.y), batch_size=5, hvp_mode="auto")
    with pytest.warns(UserWarning, match="forward-over-reverse HVP unavailable"):
        check(H, dense_hessian(rnn))
    assert H._engine._chosen_mode == {"single": "reverse", "block": "reverse"}


def test_hessian_forward_names_the_mode_when_forward_mode_fails(rnn):
    H = HessianOperator(rnn.model, rnn.loss_fn, (rnn.x, rnn.y), batch_size=5, hvp_mode="forward")
    with pytest.raises(ValueError, match=r"^hvp_mode='forward'.*use hvp_mode='reverse'"):
        H.matvec(np.ones(H.shape[0]))


def dense_opg(case: Case) -> np.ndarray:
    gradients = dense_per_example_gradients(case)
    return gradients.T @ gradients / case.num_data


@pytest.mark.parametrize(
    ("make", "reference", "looped"),
    [
        (lambda c: GGNOperator(c.model, c.loss_fn, (c.x, c.y), batch_size=5), dense_ggn, True),
        (lambda c: OPGOperator(c.model, c.loss_fn, (c.x, c.y), batch_size=5), dense_opg, True),
        (lambda c: JacobianOperator(c.model, c.loss_fn, (c.x, c.y), batch_size=5), dense_per_example_gradients, True),
        # A first derivative through the loop: pfor vectorises its block.
        (lambda c: JacobianOperator(c.model, None, (c.x, c.y), batch_size=5, target="outputs"), dense_output_jacobian, False),
    ],
    ids=["ggn", "opg", "jacobian-loss", "jacobian-outputs"],
)
def test_jacobian_vector_products_from_two_reverse_passes_when_forward_mode_fails(rnn, make, reference, looped):
    operator = make(rnn)
    with pytest.warns(UserWarning, match=TWO_REVERSE_PASSES):
        check(operator, reference(rnn), looped=looped)


@pytest.mark.parametrize(
    ("make", "reference"),
    [
        (lambda c: HessianOperator(c.model, c.loss_fn, (c.x, c.y), batch_size=5, hvp_mode="reverse"), dense_hessian),
        (lambda c: GGNOperator(c.model, c.loss_fn, (c.x, c.y), batch_size=5), dense_ggn),
    ],
    ids=["hessian-reverse", "ggn"],
)
def test_to_dense_by_parts_through_the_fallbacks(rnn, make, reference, monkeypatch):
    # The restricted products of to_dense loop over their blocks, and the
    # GGN's Jacobian-vector products take two reverse passes in a part too.
    # Variables of 6, 9, 3 (the RNN) and 9, 3 (the dense layer) entries: with
    # parts from 9 entries on, one part each (a graph each to trace).
    monkeypatch.setattr(_engine, "_MIN_PART_SIZE", 9)
    operator = make(rnn)
    assert operator._dense_parts == ((0, 18), (18, 30))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense = operator.to_dense(block_size=7)
    np.testing.assert_allclose(dense, reference(rnn), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("target", "looped"), [("loss", False), ("outputs", True)])
def test_per_example_rows_through_the_rnn(rnn, target, looped):
    # Per-example gradients vectorise through the loop; the nested Jacobian of
    # each example's outputs does not, and loops over the examples instead.
    J = JacobianOperator(rnn.model, rnn.loss_fn, (rnn.x, rnn.y), batch_size=5, target=target)
    reference = dense_per_example_gradients if target == "loss" else dense_output_jacobian
    with tensorflow_log() as logged, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = np.vstack(list(J.row_blocks()))
    np.testing.assert_allclose(rows, reference(rnn), rtol=1e-10, atol=1e-12)
    assert any(NOT_VECTORISED in str(w.message) for w in caught) == looped
    assert [record.getMessage()[:80] for record in logged if record.levelno >= logging.ERROR] == []


def test_variable_parts_keep_small_variables_with_the_part_before():
    # Kernel 10×50, bias 50, kernel 50×5, bias 5, kernel 5×1, bias 1: P = 811,
    # so a part begins at a variable of 64 entries or more (the larger of 64
    # and P / 16) once the part before has that many.
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(50), keras.layers.Dense(5), keras.layers.Dense(1)])
    engine = _engine.Engine(model, None)
    assert engine.sizes == [500, 50, 250, 5, 5, 1]
    assert engine.variable_parts() == ((0, 2), (2, 6))
    with pytest.raises(ValueError, match="part: jvp_loss has no restricted form"):
        engine.function(jvp_loss, "block", (0, 2))


@pytest.mark.parametrize("product", [hvp_forward, hvp_reverse, opg, ggn], ids=lambda product: product.__name__)
def test_single_products_are_traced_with_the_batch_and_the_vector_only(logistic, product):
    # The symmetric products' methods also take part=None; traced with that
    # default in the signature, every call of the concrete function was
    # milliseconds slower (a Hessian matvec 2.1 instead of 1.4 gradients).
    engine = _engine.Engine(logistic.model, logistic.loss_fn)
    vector = RNG.normal(size=engine.num_params)
    compiled = engine.function(product, "single")
    value = compiled(logistic.x, logistic.y, vector).numpy()
    args, kwargs = compiled._concrete.structured_input_signature
    assert (len(args), kwargs) == (3, {})
    if product.__name__.startswith("hvp"):  # the summed loss's Hessian: N times the mean's
        np.testing.assert_allclose(value, logistic.num_data * dense_hessian(logistic) @ vector, rtol=1e-10)


RETRACING = "triggered tf.function retracing"


@pytest.fixture
def fresh_retracing_counts(monkeypatch):
    """TensorFlow's retracing counts as in a new process (it warns at most twice per function, ever)."""
    from tensorflow.python.eager.polymorphic_function import polymorphic_function

    monkeypatch.setattr(
        polymorphic_function, "_frequent_tracing_detector_manager", polymorphic_function._FrequentTracingDetectorManager()
    )


def test_operators_built_in_a_loop_do_not_warn_of_retracing(logistic, fresh_retracing_counts):
    # Every engine compiles its own functions from the same code. TensorFlow
    # counted their traces together and, from the third operator, warned the
    # user to define the function outside the loop.
    reference = dense_hessian(logistic)
    vector = RNG.normal(size=reference.shape[1])
    with tensorflow_log() as logged:
        for _ in range(6):
            H = HessianOperator(logistic.model, logistic.loss_fn, (logistic.x, logistic.y), batch_size=400)
            np.testing.assert_allclose(H.matvec(vector), reference @ vector, rtol=1e-10)
    assert [record.getMessage()[:80] for record in logged if RETRACING in record.getMessage()] == []


def test_a_compiled_function_that_keeps_retracing_still_warns(fresh_retracing_counts):
    square = _engine.compiled(lambda value: value * value)
    with tensorflow_log() as logged:
        for value in range(6):  # a new Python number each call: a new trace each call
            square(value)
    assert any(RETRACING in record.getMessage() for record in logged)


UNCONNECTED = "does not depend on 1 of the 2 variables"


def test_variables_the_loss_does_not_reach_are_reported_once():
    # tf.numpy_function has no gradient: TensorFlow leaves w1's gradient
    # unconnected, and hessop's rows for w1 were zeros without a word.
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 3)), rng.normal(size=30)
    w1, w2 = tf.Variable(rng.normal(size=(3, 4)), name="w1"), tf.Variable(rng.normal(size=4), name="w2")

    def model(inputs):
        hidden = tf.ensure_shape(tf.numpy_function(np.tanh, [inputs @ w1], tf.float64), [None, 4])
        return tf.linalg.matvec(hidden, w2)

    def squared_error(targets, outputs):
        return (targets - outputs) ** 2

    hidden = np.tanh(x @ w1.numpy())
    expected = np.zeros((16, 16))
    expected[12:, 12:] = 2 * hidden.T @ hidden / len(x)  # the w2 block of the mean squared error
    for make in (HessianOperator, GGNOperator):
        operator = make(model, squared_error, (x, y), params=[w1, w2], batch_size=16)
        with pytest.warns(UserWarning, match=rf"^params: the loss \(or model output\) {UNCONNECTED} \('w1:0'; 12 of the P = 16"):
            np.testing.assert_allclose(operator @ np.eye(16)[:, 12], expected[:, 12], rtol=1e-12, atol=1e-15)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per operator
            np.testing.assert_allclose(operator.to_dense(), expected, rtol=1e-12, atol=1e-15)


def test_a_loss_linear_in_a_variable_is_not_reported():
    # Its second derivative is unconnected for good reason; only first derivatives are checked.
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(20, 3)), rng.normal(size=20)
    w = tf.Variable(rng.normal(size=3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        H = HessianOperator(lambda inputs: tf.linalg.matvec(inputs, w), lambda t, f: -t * f, (x, y), params=[w])
        np.testing.assert_array_equal(H.to_dense(), np.zeros((3, 3)))
