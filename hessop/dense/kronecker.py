"""The Hessian block of a Keras Dense layer's kernel in closed form, for `to_dense`.

A ``keras.layers.Dense`` layer computes ``z_n = x_n W + b`` for each example:
W enters the loss only through z, and linearly. The block of W's entries in
the Hessian of Σ_n ℓ_n is therefore exactly

    H_WW[(i, a), (j, b)] = Σ_n x_n[i] x_n[j] M_n[a, b],   M_n = ∂²ℓ_n / ∂z_n²,

a sum of Kronecker products (x_n x_nᵀ) ⊗ M_n, in Keras's row-major flat order
of W (index i·d_out + a). And because b enters the same way, M_n is also the
Hessian of ℓ_n alone with respect to b: hessop computes it per example (each
a batch of one, vectorised over the batch) without touching the model's
graph. The layer's inputs x_n come from a Keras sub-model that ends there.

Built from HVPs, W's d_in·d_out columns each cost a pass through the whole
model; here the block costs one GEMM of (d_in² × N)·(N × d_out²) and d_out
HVPs per example through the layers after W. For an MLP 64-64-10 on 512
examples that is a GEMM of 17 GFLOP in place of 4,096 of the 4,810 columns,
and to_dense took 2.5–2.9 × less time (benchmarks/RESULTS.md, dense section).

The assumptions (W and b used once, by this layer, and nowhere else in the
loss; examples independent) hold for ``keras.layers.Dense`` layers of a
Sequential or functional model, called once and without regularizers, which
`find_dense_kernel` checks; what it cannot see (a custom layer
reusing ``dense.kernel``, a loss coupling examples) `to_dense` catches by
comparing the block with a product of the model's own Hessian.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf

from hessop.autodiff.data import examples_in, slice_examples
from hessop.autodiff.engine import TracedOnce

try:
    import keras
except ImportError:  # pragma: no cover - keras ships with tensorflow
    keras = None

__all__ = ["DenseKernel", "factors_function", "find_dense_kernel", "kernel_block"]

# Examples per GEMM when summing the Kronecker products: a chunk holds
# (d_in² + d_out²) numbers per example, kept under this many bytes.
_CHUNK_BYTES = 64 * 2**20
# The per-example bias Hessians of a chunk of c examples run c·d_out
# Hessian-vector products of one example at once (pfor over both), each
# with its own activations: c is cut to keep c·d_out at most this.
_TANGENTS_AT_ONCE = 8192

_ZERO = tf.UnconnectedGradients.ZERO


@dataclass(frozen=True)
class DenseKernel:
    """A Dense layer whose kernel block `kernel_block` computes: variable indices, sizes, its input."""

    name: str  # the layer's
    kernel: int
    bias: int
    d_in: int
    d_out: int
    layer_inputs: Any  # a Keras model: the hessop model's inputs -> this layer's inputs (B, d_in)

    @property
    def size(self) -> int:
        return self.d_in * self.d_out


def find_dense_kernel(engine: Any) -> DenseKernel | None:
    """The largest eligible ``keras.layers.Dense`` kernel among the engine's variables, or None.

    Eligible: a layer of exactly that class (not a subclass, which may call
    its kernel differently), with a bias, without LoRA, quantization or
    regularizers, called once (as the model's config says) on inputs of rank 2, in a Keras model
    whose inputs are known, and whose kernel and bias are both among the
    operator's variables.
    """
    model = engine.model
    if keras is None or not isinstance(model, keras.Model):
        return None
    index = {id(variable): i for i, variable in enumerate(engine.variables)}
    # Unknown (a layer without a config): the numerical check of the block
    # (`SymmetricDataPassOperator._check_dense`) still catches a shared layer.
    calls = _calls_per_layer(model)
    candidates = []
    for layer in getattr(model, "layers", []):
        if type(layer) is not keras.layers.Dense or not layer.use_bias:
            continue
        if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
            continue
        if any(getattr(layer, f"{kind}_regularizer", None) for kind in ("kernel", "bias", "activity")):
            # Its penalty, added to the loss as the docs show, reaches W
            # directly (and the bias's Hessian, per example): not through z alone.
            continue
        kernel, bias = index.get(id(layer.kernel.value)), index.get(id(layer.bias.value))
        if kernel is None or bias is None:
            continue
        if calls is not None and calls.get(layer.name, 0) != 1:
            continue  # called more than once (shared), each call with its own inputs
        layer_input = layer.input
        if not isinstance(layer_input, keras.KerasTensor) or len(layer_input.shape) != 2:
            continue
        candidates.append((layer, kernel, bias, layer_input))
    if not candidates:
        return None
    layer, kernel, bias, layer_input = max(candidates, key=lambda c: engine.sizes[c[1]])
    try:
        layer_inputs = keras.Model(_model_inputs(model), layer_input)
    except (AttributeError, ValueError, TypeError, RuntimeError):
        return None  # a subclassed model: no graph of layers to cut
    d_in, d_out = (int(d) for d in engine.shapes[kernel])
    return DenseKernel(name=layer.name, kernel=kernel, bias=bias, d_in=d_in, d_out=d_out, layer_inputs=layer_inputs)


def _calls_per_layer(model: Any) -> dict[str, int] | None:
    """How many times each top-level layer is called in ``model``, by name; None where the model does not say.

    From the model's public config: a functional model lists each layer's
    inbound nodes (one per call); a Sequential model calls each entry once.
    """
    if isinstance(model, keras.Sequential):
        names = [layer.name for layer in model.layers]
        return {name: names.count(name) for name in names}
    try:
        layers = model.get_config()["layers"]
        return {entry["name"]: len(entry["inbound_nodes"]) for entry in layers}
    except (KeyError, TypeError, NotImplementedError, ValueError, AttributeError):
        return None  # a subclassed model, or a layer without a config


def _model_inputs(model: Any) -> Any:
    """The model's symbolic inputs in the structure it is called with (a Sequential model's: one tensor)."""
    if isinstance(model, keras.Sequential):
        (inputs,) = model.inputs
        return inputs
    return model.input


def factors_function(engine: Any, dense_kernel: DenseKernel, curvature: str) -> TracedOnce:
    """Compiled ``(x, y) -> (X, M)``: the layer's inputs (B, d_in) and per-example curvatures of the bias (B, d_out, d_out).

    ``curvature``: "hessian" (∂²ℓ_n/∂b²) or "ggn" (J_bᵀ ∇²_f ℓ_n J_b, with
    J_b the Jacobian of the example's outputs f with respect to b). Either
    is the z-space matrix of the kernel's block, as b enters like W.
    """
    bias = engine.variables[dense_kernel.bias]

    def bias_hessian(xn: Any, yn: Any) -> tf.Tensor:
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                # A batch of one: a scalar (batch-mean) loss is this example's loss.
                loss = tf.reduce_sum(engine.per_example_loss(xn, yn))
            gradient = inner.gradient(loss, bias, unconnected_gradients=_ZERO)
        return outer.jacobian(gradient, bias, unconnected_gradients=_ZERO, experimental_use_pfor=True)

    def bias_ggn(xn: Any, yn: Any) -> tf.Tensor:
        # As hessop.operators.ggn.ggn: several output heads are one output, in tf.nest.flatten order.
        with tf.GradientTape() as tape:
            predictions = engine.call_model(xn)
            outputs = tf.concat([tf.reshape(head, [-1]) for head in tf.nest.flatten(predictions)], axis=0)
        output_jacobian = tape.jacobian(outputs, bias, unconnected_gradients=_ZERO, experimental_use_pfor=True)  # (C, d_out)
        fixed = tf.nest.map_structure(tf.stop_gradient, predictions)
        with tf.GradientTape() as outer:
            outer.watch(fixed)
            with tf.GradientTape() as inner:
                inner.watch(fixed)
                loss = tf.reduce_sum(engine.per_example_loss(xn, yn, fixed))
            gradient = tf.concat(
                [tf.reshape(g, [-1]) for g in tf.nest.flatten(inner.gradient(loss, fixed, unconnected_gradients=_ZERO))], 0
            )
        blocks = outer.jacobian(gradient, tf.nest.flatten(fixed), unconnected_gradients=_ZERO, experimental_use_pfor=True)
        output_hessian = tf.concat([tf.reshape(b, (tf.shape(gradient)[0], -1)) for b in blocks], axis=1)  # (C, C)
        return tf.matmul(output_jacobian, tf.matmul(output_hessian, output_jacobian), transpose_a=True)

    single = {"hessian": bias_hessian, "ggn": bias_ggn}[curvature]

    def factors(x: Any, y: Any) -> tuple[tf.Tensor, tf.Tensor]:
        inputs = tf.cast(dense_kernel.layer_inputs(x, training=False), engine.dtype)
        curvatures = engine.per_example(f"per-example bias curvatures ({curvature})", single, x, y)
        return inputs, curvatures

    return engine.per_batch(factors)


@tf.function(reduce_retracing=True)
def _kronecker_sum(inputs: tf.Tensor, curvatures: tf.Tensor) -> tf.Tensor:
    """Σ_n vec(x_n x_nᵀ) vec(M_n)ᵀ: shape (d_in², d_out²)."""
    outer = tf.reshape(inputs[:, :, None] * inputs[:, None, :], [tf.shape(inputs)[0], -1])
    return tf.matmul(outer, tf.reshape(curvatures, [tf.shape(curvatures)[0], -1]), transpose_a=True)


def kernel_block(batches: Any, factors: TracedOnce, dense_kernel: DenseKernel, scale: float) -> np.ndarray:
    """The kernel's block (d_in·d_out square, the compute dtype) summed over ``batches`` of (x, y), times ``scale``.

    ``factors``: the `factors_function` of the engine and kernel. Raises one
    of the engine's trace errors (ValueError, TypeError, ...) where the
    per-example bias curvatures cannot be traced; the caller then builds the
    block from products.
    """
    d_in, d_out = dense_kernel.d_in, dense_kernel.d_out
    total = None
    # The factors of consecutive pieces are gathered until a GEMM's worth:
    # a rank-128 update per piece took 10 % longer in all (MLP 64-64-10, N = 512).
    pending: list[tuple[tf.Tensor, tf.Tensor]] = []
    chunk = 0
    for inputs, curvatures in _factor_pieces(batches, factors, max(1, _TANGENTS_AT_ONCE // d_out)):
        pending.append((inputs, curvatures))
        chunk = max(1, _CHUNK_BYTES // ((d_in * d_in + d_out * d_out) * inputs.dtype.size))
        if sum(int(i.shape[0]) for i, _ in pending) >= chunk:
            total = _accumulate(total, pending, chunk)
            pending = []
    if pending:
        total = _accumulate(total, pending, chunk)
    # [(i, j), (a, b)] -> [(i, a), (j, b)]: W's row-major flat order on both axes.
    block = tf.transpose(tf.reshape(total, (d_in, d_in, d_out, d_out)), (0, 2, 1, 3))
    return tf.reshape(block, (dense_kernel.size, dense_kernel.size)).numpy() * scale


def _factor_pieces(batches: Any, factors: TracedOnce, examples: int) -> Any:
    """``factors`` of each batch, ``examples`` examples at a time."""
    for x, y in batches:
        for first in range(0, examples_in(x), examples):
            yield factors(*slice_examples(x, y, first, first + examples))


def _accumulate(total: tf.Tensor | None, pending: list[tuple[tf.Tensor, tf.Tensor]], chunk: int) -> tf.Tensor:
    """``total`` plus the Kronecker sums of the ``pending`` factors, ``chunk`` examples per GEMM."""
    inputs = tf.concat([i for i, _ in pending], 0)
    curvatures = tf.concat([c for _, c in pending], 0)
    for first in range(0, int(inputs.shape[0]), chunk):
        term = _kronecker_sum(inputs[first : first + chunk], curvatures[first : first + chunk])
        total = term if total is None else total + term
    return total
