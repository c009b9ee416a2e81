"""A zoo of tiny real architectures, built as users write them, with references
that do not use TensorFlow's second derivatives through the model.

TensorFlow's own double backprop can be wrong (``tf.nn.moments`` holds the
mean fixed inside LayerNormalization and GroupNormalization), so the Hessian's
reference here is a central finite difference of the float64 gradient, and
the GGN's is built from first-order Jacobians (`conftest.dense_ggn`).

Activations are smooth (tanh, gelu, sigmoid): a ReLU kink inside the finite
difference's step would spoil it.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf
from conftest import F64, Case, flat

__all__ = ["ZOO", "fd_hessian_product"]


def _rng(seed: int) -> np.random.Generator:
    keras.utils.set_random_seed(seed)
    return np.random.default_rng(seed)


def _sparse_ce() -> Any:
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None, dtype=F64)


def _mse() -> Any:
    return keras.losses.MeanSquaredError(reduction=None, dtype=F64)


def layernorm_mlp_case(num_data: int = 16, seed: int = 19) -> Case:
    """Dense, LayerNormalization, Dense: TensorFlow's own Hessian of this is 35 % off."""
    rng = _rng(seed)
    x = rng.normal(size=(num_data, 5))
    y = rng.integers(0, 3, size=num_data)
    model = keras.Sequential(
        [
            keras.Input((5,), dtype=F64),
            keras.layers.Dense(4, activation="tanh", dtype=F64),
            keras.layers.LayerNormalization(dtype=F64),
            keras.layers.Dense(3, dtype=F64),
        ]
    )
    return Case("layernorm_mlp", model, _sparse_ce(), x, y)


def transformer_case(num_data: int = 10, length: int = 4, seed: int = 10) -> Case:
    """Embedding, self-attention with a residual, LayerNormalization, pooling, Dense head."""
    rng = _rng(seed)
    tokens = rng.integers(0, 7, size=(num_data, length))
    y = rng.integers(0, 3, size=num_data)
    inputs = keras.Input((length,), dtype="int32")
    h = keras.layers.Embedding(7, 4, dtype=F64)(inputs)
    attended = keras.layers.MultiHeadAttention(num_heads=2, key_dim=2, dtype=F64)(h, h)
    h = keras.layers.LayerNormalization(dtype=F64)(keras.layers.Add(dtype=F64)([h, attended]))
    h = keras.layers.GlobalAveragePooling1D(dtype=F64)(h)
    outputs = keras.layers.Dense(3, dtype=F64)(h)
    return Case("transformer", keras.Model(inputs, outputs), _sparse_ce(), tokens, y)


def _set_moving_statistics(model: keras.Model, rng: np.random.Generator) -> None:
    """Moving statistics away from (0, 1), as after training, so inference-mode BN is not the identity."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(rng.normal(scale=0.3, size=layer.moving_mean.shape))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, size=layer.moving_variance.shape))


def cnn_batchnorm_case(num_data: int = 8, seed: int = 11) -> Case:
    """Conv2D, BatchNormalization (inference mode), Dropout, Dense."""
    rng = _rng(seed)
    x = rng.normal(size=(num_data, 5, 5, 1))
    y = rng.integers(0, 2, size=num_data)
    model = keras.Sequential(
        [
            keras.Input((5, 5, 1), dtype=F64),
            keras.layers.Conv2D(2, 3, activation="tanh", dtype=F64),
            keras.layers.BatchNormalization(dtype=F64),
            keras.layers.Dropout(0.5, dtype=F64),
            keras.layers.Flatten(dtype=F64),
            keras.layers.Dense(2, dtype=F64),
        ]
    )
    _set_moving_statistics(model, rng)
    return Case("cnn_batchnorm", model, _sparse_ce(), x, y)


def cnn_groupnorm_case(num_data: int = 8, seed: int = 12) -> Case:
    rng = _rng(seed)
    x = rng.normal(size=(num_data, 5, 5, 1))
    y = rng.integers(0, 2, size=num_data)
    model = keras.Sequential(
        [
            keras.Input((5, 5, 1), dtype=F64),
            keras.layers.Conv2D(4, 3, activation="tanh", dtype=F64),
            keras.layers.GroupNormalization(groups=2, dtype=F64),
            keras.layers.GlobalAveragePooling2D(dtype=F64),
            keras.layers.Dense(2, dtype=F64),
        ]
    )
    return Case("cnn_groupnorm", model, _sparse_ce(), x, y)


def separable_case(num_data: int = 8, seed: int = 13) -> Case:
    """A MobileNet-style block: depthwise 3×3, pointwise 1×1, BatchNormalization, swish."""
    rng = _rng(seed)
    x = rng.normal(size=(num_data, 5, 5, 2))
    y = rng.integers(0, 2, size=num_data)
    model = keras.Sequential(
        [
            keras.Input((5, 5, 2), dtype=F64),
            keras.layers.DepthwiseConv2D(3, activation="tanh", dtype=F64),
            keras.layers.Conv2D(3, 1, dtype=F64),
            keras.layers.BatchNormalization(dtype=F64),
            keras.layers.Activation("swish", dtype=F64),
            keras.layers.GlobalAveragePooling2D(dtype=F64),
            keras.layers.Dense(2, dtype=F64),
        ]
    )
    _set_moving_statistics(model, rng)
    return Case("separable", model, _sparse_ce(), x, y)


def _recurrent_case(name: str, layer: type, seed: int, num_data: int = 5, length: int = 2) -> Case:
    """A recurrent layer, unrolled: its while loop costs a vectorised block 30 s of tracing
    (tests/test_engine.py covers the loop itself)."""
    rng = _rng(seed)
    x = rng.normal(size=(num_data, length, 2))
    y = rng.normal(size=(num_data, 1))
    model = keras.Sequential(
        [keras.Input((length, 2), dtype=F64), layer(2, unroll=True, dtype=F64), keras.layers.Dense(1, dtype=F64)]
    )
    return Case(name, model, _mse(), x, y)


def lstm_case() -> Case:
    return _recurrent_case("lstm", keras.layers.LSTM, 14)


def gru_case() -> Case:
    return _recurrent_case("gru", keras.layers.GRU, 15)


def dict_input_case(num_data: int = 12, seed: int = 16) -> Case:
    """A functional model called with a dict of named inputs."""
    rng = _rng(seed)
    x = {"numeric": rng.normal(size=(num_data, 3)), "extra": rng.normal(size=(num_data, 2))}
    y = rng.normal(size=(num_data, 1))
    numeric = keras.Input((3,), dtype=F64, name="numeric")
    extra = keras.Input((2,), dtype=F64, name="extra")
    h = keras.layers.Concatenate(dtype=F64)([keras.layers.Dense(3, activation="gelu", dtype=F64)(numeric), extra])
    h = keras.layers.LayerNormalization(dtype=F64)(keras.layers.Dense(3, activation="tanh", dtype=F64)(h))
    outputs = keras.layers.Dense(1, dtype=F64)(h)
    return Case("dict_input", keras.Model({"numeric": numeric, "extra": extra}, outputs), _mse(), x, y)


class SubclassedModel(keras.Model):
    def __init__(self) -> None:
        super().__init__(dtype=F64)
        self.hidden = keras.layers.Dense(4, activation="tanh", dtype=F64)
        self.norm = keras.layers.UnitNormalization(dtype=F64)
        self.head = keras.layers.Dense(3, dtype=F64)

    def call(self, x: Any, training: bool = False) -> Any:
        return self.head(self.norm(self.hidden(x)) + 0.5 * self.hidden(x))


def subclassed_case(num_data: int = 12, seed: int = 17) -> Case:
    rng = _rng(seed)
    x = rng.normal(size=(num_data, 3))
    y = rng.integers(0, 3, size=num_data)
    model = SubclassedModel()
    model(x[:1])  # build
    return Case("subclassed", model, _sparse_ce(), x, y)


class _Module(tf.Module):
    """A plain tf.Module: no Keras at all."""

    def __init__(self, rng: np.random.Generator) -> None:
        super().__init__()
        self.w1 = tf.Variable(rng.normal(size=(3, 4)), dtype=tf.float64)
        self.b1 = tf.Variable(rng.normal(size=4) * 0.1, dtype=tf.float64)
        self.w2 = tf.Variable(rng.normal(size=(4, 1)), dtype=tf.float64)

    def __call__(self, x: Any) -> tf.Tensor:
        h = tf.tanh(tf.matmul(x, self.w1) + self.b1)
        mean, variance = tf.nn.moments(h, axes=[-1], keepdims=True)  # a hand-written layer norm
        return tf.matmul((h - mean) * tf.math.rsqrt(variance + 1e-3), self.w2)


def module_case(num_data: int = 12, seed: int = 18) -> Case:
    rng = _rng(seed)
    x = rng.normal(size=(num_data, 3))
    y = (rng.uniform(size=(num_data, 1)) < 0.5).astype(F64)
    module = _Module(rng)
    loss = keras.losses.BinaryCrossentropy(from_logits=True, reduction=None, dtype=F64)
    return Case("tf_module", module, loss, x, y, params=list(module.trainable_variables))


ZOO = {
    "layernorm_mlp": layernorm_mlp_case,
    "transformer": transformer_case,
    "cnn_batchnorm": cnn_batchnorm_case,
    "cnn_groupnorm": cnn_groupnorm_case,
    "separable": separable_case,
    "lstm": lstm_case,
    "gru": gru_case,
    "dict_input": dict_input_case,
    "subclassed": subclassed_case,
    "tf_module": module_case,
}

# The central difference's step, for unit vectors: its truncation error is
# about ε²·|∇³ℓ|/6 ≈ 1e-10 and its round-off about u·|∇ℓ|/ε ≈ 1e-11 (u =
# 2.2e-16), both far below the tolerance the tests use (`FD_RTOL`).
FD_EPS = 1e-5
FD_RTOL = 1e-6


def _mean_gradient(case: Case) -> np.ndarray:
    with tf.GradientTape() as tape:
        loss = case.mean_loss()
    return flat(tape.gradient(loss, case.variables, unconnected_gradients="zero")).numpy()


def fd_hessian_product(case: Case, v: np.ndarray, eps: float = FD_EPS) -> np.ndarray:
    """H v by a central difference of the float64 mean gradient along v (no second derivatives)."""
    variables = case.variables
    start = [var.numpy() for var in variables]
    norm = float(np.linalg.norm(v))
    step = eps * v / norm

    def shifted(sign: float) -> np.ndarray:
        offset = 0
        for var, value in zip(variables, start):
            var.assign(value + sign * step[offset : offset + value.size].reshape(value.shape))
            offset += value.size
        return _mean_gradient(case)

    try:
        difference = (shifted(1.0) - shifted(-1.0)) / (2 * eps)
    finally:
        for var, value in zip(variables, start):
            var.assign(value)
    return difference * norm
