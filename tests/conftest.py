"""Small model cases shared by the tests, and independent dense references.

Every reference here is computed without hessop's engine: the full-data loss in
one batch, differentiated twice with `tf.GradientTape.jacobian`.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import contextlib
import logging
from collections.abc import (
    Callable,
    Iterator,
)
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np
import pytest
import tensorflow as tf

# Two logical CPU devices, for MirroredStrategy tests; must precede any TF op.
try:
    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0],
        [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()],
    )
except RuntimeError:  # already initialised (e.g. a plugin ran TF first): distribute tests skip
    pass

from hessop.autodiff import engine as _engine

F64 = "float64"


@dataclass
class Case:
    """A model, a per-example loss, data, and (optionally) explicit params."""

    name: str
    model: Any
    loss_fn: Callable[[Any, Any], Any]
    x: Any
    y: Any
    params: list | None = None
    output_loss: Callable[[Any, Any], Any] | None = field(default=None, repr=False)

    @property
    def variables(self) -> list:
        params = self.params if self.params is not None else self.model.trainable_variables
        return [p.value if isinstance(p, keras.Variable) else p for p in params]

    @property
    def num_data(self) -> int:
        return int(tf.nest.flatten(self.x)[0].shape[0])

    def predict(self, x: Any) -> tf.Tensor:
        if isinstance(self.model, keras.layers.Layer):
            return self.model(x, training=False)
        return self.model(x)

    def per_example_loss(self, x: Any = None, y: Any = None) -> tf.Tensor:
        x = self.x if x is None else x
        y = self.y if y is None else y
        loss = tf.convert_to_tensor(self.loss_fn(y, self.predict(x)))
        return tf.reshape(loss, [-1]) if loss.shape.rank else loss

    def mean_loss(self) -> tf.Tensor:
        return tf.reduce_mean(self.per_example_loss())


@contextlib.contextmanager
def tensorflow_log() -> Iterator[list[logging.LogRecord]]:
    """The records TensorFlow's logger passes on (after its filters) within this block."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = tf.get_logger()
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def flat(tensors: list) -> tf.Tensor:
    return tf.concat([tf.reshape(t, [-1]) for t in tensors], axis=0)


def dense_hessian(case: Case) -> np.ndarray:
    """Hessian of the mean loss: Jacobian of the full-data gradient (no hessop code)."""
    variables = case.variables
    with tf.GradientTape(persistent=True) as outer:
        with tf.GradientTape() as inner:
            loss = case.mean_loss()
        grad = flat(inner.gradient(loss, variables, unconnected_gradients="zero"))
    blocks = outer.jacobian(grad, variables, unconnected_gradients="zero")
    size = int(grad.shape[0])
    return np.concatenate([np.reshape(b.numpy(), (size, -1)) for b in blocks], axis=1)


def dense_per_example_gradients(case: Case) -> np.ndarray:
    """(N, P): Jacobian of the per-example losses, one batch, no hessop code."""
    with tf.GradientTape() as tape:
        losses = case.per_example_loss()
    blocks = tape.jacobian(losses, case.variables, unconnected_gradients="zero")
    return np.concatenate([np.reshape(b.numpy(), (case.num_data, -1)) for b in blocks], axis=1)


def dense_output_jacobian(case: Case) -> np.ndarray:
    """(N*C, P): Jacobian of the flattened outputs, example-major."""
    with tf.GradientTape() as tape:
        outputs = tf.reshape(case.predict(case.x), [-1])
    blocks = tape.jacobian(outputs, case.variables, unconnected_gradients="zero")
    return np.concatenate([np.reshape(b.numpy(), (int(outputs.shape[0]), -1)) for b in blocks], axis=1)


def dense_ggn(case: Case) -> np.ndarray:
    """J_f^T (d^2 mean-loss / d f^2) J_f from dense autodiff pieces."""
    jf = dense_output_jacobian(case)
    outputs = tf.convert_to_tensor(case.predict(case.x))
    with tf.GradientTape() as outer:
        outer.watch(outputs)
        with tf.GradientTape() as inner:
            inner.watch(outputs)
            loss = tf.reduce_mean(tf.reshape(case.loss_fn(case.y, outputs), [-1]))
        grad = tf.reshape(inner.gradient(loss, outputs), [-1])
    output_hessian = np.reshape(outer.jacobian(grad, outputs).numpy(), (grad.shape[0], -1))
    return jf.T @ output_hessian @ jf


def dense_gradient(case: Case) -> np.ndarray:
    with tf.GradientTape() as tape:
        loss = case.mean_loss()
    return flat(tape.gradient(loss, case.variables, unconnected_gradients="zero")).numpy()


# -- model cases ---------------------------------------------------------------
def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def logistic_case(num_data: int = 1003, num_features: int = 4, seed: int = 0) -> Case:
    rng = _rng(seed)
    x = rng.normal(size=(num_data, num_features))
    true_beta = rng.normal(size=num_features)
    y = (rng.uniform(size=num_data) < 1 / (1 + np.exp(-x @ true_beta))).astype(F64)[:, None]
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((num_features,), dtype=F64), keras.layers.Dense(1, dtype=F64)])
    loss = keras.losses.BinaryCrossentropy(from_logits=True, reduction=None, dtype=F64)
    return Case("logistic", model, loss, x, y)


def poisson_case(num_data: int = 300, seed: int = 1) -> Case:
    rng = _rng(seed)
    x = np.column_stack([np.ones(num_data), rng.normal(size=(num_data, 2))])
    beta = tf.Variable([0.3, 0.2, -0.4], dtype=tf.float64)
    y = rng.poisson(np.exp(x @ np.array([0.3, 0.2, -0.4]))).astype(F64)

    def poisson_nll(y_true: Any, log_rate: Any) -> tf.Tensor:
        return tf.exp(log_rate) - y_true * log_rate

    return Case("poisson", lambda x: tf.linalg.matvec(x, beta), poisson_nll, x, y, params=[beta])


def mlp_case(num_data: int = 64, seed: int = 2) -> Case:
    rng = _rng(seed)
    x = rng.normal(size=(num_data, 5))
    y = rng.integers(0, 3, size=num_data)
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((5,), dtype=F64),
            keras.layers.Dense(4, activation="tanh", dtype=F64),
            keras.layers.Dense(3, dtype=F64),
        ]
    )
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None, dtype=F64)
    return Case("mlp", model, loss, x, y)


def conv_case(num_data: int = 24, seed: int = 3) -> Case:
    rng = _rng(seed)
    x = rng.normal(size=(num_data, 6, 6, 1))
    y = rng.integers(0, 2, size=num_data)
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((6, 6, 1), dtype=F64),
            keras.layers.Conv2D(2, 3, activation="tanh", dtype=F64),
            keras.layers.MaxPooling2D(2, dtype=F64),
            keras.layers.Flatten(dtype=F64),
            keras.layers.Dense(2, dtype=F64),
        ]
    )
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None, dtype=F64)
    return Case("conv", model, loss, x, y)


def multi_input_case(num_data: int = 40, seed: int = 4) -> Case:
    """Functional model with two inputs, an Embedding and normalization layers."""
    rng = _rng(seed)
    tokens = rng.integers(0, 6, size=(num_data, 3))
    numeric = rng.normal(size=(num_data, 2))
    y = rng.normal(size=(num_data, 1))
    keras.utils.set_random_seed(seed)
    in_tokens = keras.Input((3,), dtype="int32")
    in_numeric = keras.Input((2,), dtype=F64)
    embedded = keras.layers.Flatten(dtype=F64)(keras.layers.Embedding(6, 2, dtype=F64)(in_tokens))
    normed = keras.layers.LayerNormalization(dtype=F64)(in_numeric)
    joined = keras.layers.Concatenate(dtype=F64)([embedded, normed])
    hidden = keras.layers.Dense(3, activation="tanh", dtype=F64)(joined)
    hidden = keras.layers.BatchNormalization(dtype=F64)(hidden)
    out = keras.layers.Dense(1, dtype=F64)(hidden)
    model = keras.Model([in_tokens, in_numeric], out)
    loss = keras.losses.MeanSquaredError(reduction=None, dtype=F64)
    return Case("multi_input", model, loss, (tokens, numeric), y)


CASES = {
    "logistic": logistic_case,
    "poisson": poisson_case,
    "mlp": mlp_case,
    "conv": conv_case,
    "multi_input": multi_input_case,
}


@pytest.fixture
def parts_per_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every variable a part of its own for `to_dense` (the tiny cases here are otherwise one part)."""
    monkeypatch.setattr(_engine, "_MIN_PART_SIZE", 1)
    monkeypatch.setattr(_engine, "_MAX_PARTS", 2**62)


@pytest.fixture(params=sorted(CASES))
def case(request: pytest.FixtureRequest) -> Case:
    return CASES[request.param]()


@pytest.fixture
def mlp() -> Case:
    return mlp_case()


@pytest.fixture
def logistic() -> Case:
    return logistic_case()


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), np.finfo(float).tiny))


def compiled_with_xla(operator: Any) -> bool:
    """True when the operator has compiled per-batch products and XLA compiles each of them."""
    compiled = list(operator._engine._compiled.values())
    return bool(compiled) and all(traced._function._jit_compile for traced in compiled)
