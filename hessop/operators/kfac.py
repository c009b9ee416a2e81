r"""KFACOperator and EKFACOperator: Kronecker-factored curvature of Keras layers.

For a Dense layer :math:`z = a W (+ b)` the block of the GGN over W is
:math:`\text{scale}\sum_n \sum_c (a_n \otimes g_{nc})(a_n \otimes g_{nc})^\top`,
where :math:`g_{nc} = J_{z_n}^\top s_{nc}` backpropagates column c of a
square root S_n of the loss's Hessian in the outputs (``fisher_type="type2"``),
a sampled one (``"mc"``) or the loss gradient itself (``"empirical"``). KFAC
replaces the sum of Kronecker products by the product of sums,

.. math:: A = \frac1M \sum_m a_m a_m^\top, \qquad G = \text{scale} \sum_m \sum_c g_{mc} g_{mc}^\top,

with M the rows of A (examples, or examples × positions). The block is
A ⊗ G in hessop's (Keras's row-major) order: a kernel is (d_in, d_out).

How the layers are read: while the per-batch function traces, each covered
layer's ``call`` is wrapped (an attribute of that layer object, restored at
once) to record its input and its pre-activation output z; one tape then
differentiates the model outputs with respect to every z at once (one
backward pass per column up to 32 columns, ``tape.jacobian`` beyond). No
weight gradient is formed. For ``"type2"`` the columns are those of the
output Jacobian itself, and :math:`\sum_c g_c g_c^\top = J_z^\top H J_z`
with each example's loss Hessian H: no square root is taken.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorflow as tf

from hessop._validation import check_positive_int
from hessop.autodiff.data import Batches
from hessop.autodiff.engine import Engine, column_gradients, output_matrix, traced_error, unstack_columns
from hessop.operators.base import REDUCTIONS, as_numpy_dtype
from hessop.operators.ggn import loss_output_hessian, loss_output_vectors
from hessop.structured.factored import EigenKron, Kron, KroneckerOperator

try:
    import keras
except ImportError:  # pragma: no cover - keras ships with tensorflow
    keras = None

__all__ = ["EKFACOperator", "KFACOperator"]

FISHER_TYPES = ("type2", "mc", "empirical")
KFAC_APPROXIMATIONS = ("expand", "reduce")


@dataclass
class _Layer:
    """A covered layer: its kind, its variables' positions among the engine's, and its blocks' flat indices."""

    layer: Any
    kind: str  # "dense", "conv2d", "embedding" or "norm"
    variables: dict[str, int]  # role ("kernel", "bias", "gamma", "beta") -> engine variable index
    joint: bool = False  # the bias is a last row of the kernel's block
    blocks: list[tuple[str, np.ndarray, tuple[int, int]]] = field(default_factory=list)  # (role, index, (a, g))

    @property
    def name(self) -> str:
        return self.layer.name


def _walk(layer: Any) -> Iterator[Any]:
    yield layer
    if isinstance(layer, keras.Model):
        for sub in layer.layers:
            yield from _walk(sub)


def _unsupported(layer: Any) -> str | None:
    """Why this covered-type layer cannot be factored, or None."""
    if getattr(layer, "lora_enabled", False):
        return "LoRA is enabled"
    if getattr(layer, "quantization_mode", None):
        return "it is quantized"
    if isinstance(layer, keras.layers.Conv2D):
        if layer.groups != 1:
            return f"groups={layer.groups}"
        if layer.data_format != "channels_last":
            return f"data_format={layer.data_format!r}"
    return None


def _norm_axis_error(layer: Any, rank: int) -> str | None:
    axis = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    if len(axis) != 1 or int(axis[0]) % rank != rank - 1:
        return (
            f"model: layer {layer.name!r} normalises over axis={layer.axis!r}; KFAC covers normalisation over the last axis only."
        )
    return None


_KINDS = {
    "Dense": ("dense", ("kernel", "bias")),
    "Conv2D": ("conv2d", ("kernel", "bias")),
    "Embedding": ("embedding", ("embeddings",)),
    "LayerNormalization": ("norm", ("gamma", "beta")),
    "BatchNormalization": ("norm", ("gamma", "beta")),
}


def find_layers(engine: Engine, separate_bias: bool) -> list[_Layer]:
    """The model's covered layers with the engine's variables; refuses any variable no covered layer owns."""
    model = engine.model
    if keras is None or not isinstance(model, keras.layers.Layer):
        msg = f"model: KFAC reads a Keras model's layers; got {type(model).__name__}. Wrap the computation in Keras layers."
        raise TypeError(msg)
    position = {id(v): i for i, v in enumerate(engine.variables)}
    offsets = np.concatenate([[0], np.cumsum(engine.sizes)])
    found: list[_Layer] = []
    owned: set[int] = set()
    seen_layers: set[int] = set()
    for layer in _walk(model):
        entry = _KINDS.get(type(layer).__name__)
        if entry is None or id(layer) in seen_layers or type(layer) is not getattr(keras.layers, type(layer).__name__):
            continue
        seen_layers.add(id(layer))
        kind, roles = entry
        variables = {}
        for role in roles:
            variable = getattr(layer, role, None)
            if variable is not None and id(getattr(variable, "value", variable)) in position:
                variables[role] = position[id(getattr(variable, "value", variable))]
        if not variables:
            continue
        reason = _unsupported(layer)
        if reason is not None:
            msg = (
                f"model: layer {layer.name!r} ({type(layer).__name__}) cannot be Kronecker-factored: {reason}. "
                "Leave its variables out with params=[...]."
            )
            raise ValueError(msg)
        item = _Layer(layer, kind, variables)

        def flat(role: str, variables: dict[str, int] = variables) -> np.ndarray:
            i = variables[role]
            return np.arange(offsets[i], offsets[i + 1])

        if kind in ("dense", "conv2d"):
            has_kernel, has_bias = "kernel" in variables, "bias" in variables
            d_out = int(layer.kernel.shape[-1])
            d_in = int(np.prod(layer.kernel.shape[:-1]))
            item.joint = has_kernel and has_bias and not separate_bias
            if item.joint:
                item.blocks.append(("kernel", np.concatenate([flat("kernel"), flat("bias")]), (d_in + 1, d_out)))
            else:
                if has_kernel:
                    item.blocks.append(("kernel", flat("kernel"), (d_in, d_out)))
                if has_bias:
                    item.blocks.append(("bias", flat("bias"), (1, d_out)))
        elif kind == "embedding":
            vocab, dim = (int(d) for d in layer.embeddings.shape)
            item.blocks.append(("embeddings", flat("embeddings"), (vocab, dim)))
        else:
            index = np.concatenate([flat(role) for role in ("gamma", "beta") if role in variables])
            item.blocks.append(("norm", index, (1, index.size)))
        owned.update(variables.values())
        found.append(item)
    missing = [i for i in range(len(engine.variables)) if i not in owned]
    if missing:
        names = ", ".join(engine.variables[i].name for i in missing[:5]) + (" …" if len(missing) > 5 else "")
        msg = (
            f"params: KFAC factors Dense, Conv2D, Embedding, LayerNormalization and BatchNormalization layers only; "
            f"{len(missing)} variable(s) belong to none of them ({names}). Leave them out with params=[...], or use an "
            "exact operator (GGNOperator) for them."
        )
        raise ValueError(msg)
    return found


@contextlib.contextmanager
def _recording(layers: Sequence[_Layer], records: dict[str, list[Any]]) -> Iterator[None]:
    """Wrap each layer's ``call`` to record ``(input, z, xhat)``; restored on exit (runs while tracing only)."""
    originals = []
    for item in layers:
        layer = item.layer
        original = layer.call
        originals.append((layer, original))
        records[item.name] = []
        layer.call = _recorder(item, original, records[item.name])
    try:
        yield
    finally:
        for layer, original in originals:
            # The wrapper is an instance attribute: removing it exposes the class's call again.
            with contextlib.suppress(AttributeError):
                object.__delattr__(layer, "call")
            if layer.call != original:  # pragma: no cover - a call the user had set on the instance
                layer.call = original


def _recorder(item: _Layer, original: Any, calls: list[Any]) -> Any:
    layer = item.layer

    def call(inputs: Any, *args: Any, **kwargs: Any) -> Any:
        if item.kind in ("dense", "conv2d"):
            activation = layer.activation
            layer.activation = None
            try:
                z = original(inputs, *args, **kwargs)
            finally:
                layer.activation = activation
            calls.append((inputs, z, None))
            return z if activation is None else activation(z)
        if item.kind == "norm":
            error = _norm_axis_error(layer, inputs.shape.rank)
            if error is not None:
                raise traced_error(ValueError, error)
            gamma = getattr(layer, "gamma", None)
            if gamma is None:
                z = original(inputs, *args, **kwargs)
                calls.append((inputs, z, None))
                return z
            variable = gamma.value
            # z is affine in γ: its derivative along γ = 1 is x̂, the normalised input.
            with tf.autodiff.ForwardAccumulator([variable], [tf.ones_like(variable)]) as accumulator:
                z = original(inputs, *args, **kwargs)
            calls.append((inputs, z, tf.stop_gradient(accumulator.jvp(z))))
            return z
        z = original(inputs, *args, **kwargs)
        calls.append((inputs, z, None))
        return z

    return call


def _positions_mean(t: tf.Tensor) -> tf.Tensor:
    return tf.reduce_mean(t, axis=list(range(1, t.shape.rank - 1))) if t.shape.rank > 2 else t


def _positions_sum(t: tf.Tensor, first: int) -> tf.Tensor:
    return tf.reduce_sum(t, axis=list(range(first, t.shape.rank - 1))) if t.shape.rank > first + 1 else t


class _Factors:
    """The per-batch work of KFAC and EKFAC for one engine and its covered layers."""

    def __init__(self, engine: Engine, layers: list[_Layer], fisher_type: str, mc_samples: int, approx: str) -> None:
        self.engine, self.layers = engine, layers
        self.fisher_type, self.mc_samples, self.approx = fisher_type, mc_samples, approx

    # -- traced pieces -------------------------------------------------------------
    def _backpropagate(
        self, x: Any, y: Any, seed: tf.Tensor | None, outputs_only: bool = False
    ) -> tuple[list[tuple[tf.Tensor, tf.Tensor, Any]], Any]:
        """Per layer: its input a, the R output-gradient columns g (R, B, ..., d_out) and x̂ for norms; and weights.

        For ``"type2"`` the columns are the output Jacobian's (R = K) and the
        weights each example's loss Hessian H (B, K, K): Σ_c g_c g_cᵀ over a
        square root's columns is gᵀ H g, with no eigendecomposition. For
        ``"mc"`` and ``"empirical"`` the columns already carry the loss, and
        the weights are None. ``outputs_only``: the output Jacobian's columns
        without a loss (y unused), weights None.
        """
        engine = self.engine
        records: dict[str, list[Any]] = {}
        with tf.GradientTape(persistent=True) as tape:
            with _recording(self.layers, records):
                predictions = engine.call_model(x)
            flat = output_matrix(predictions, tf.shape(tf.nest.flatten(x)[0])[0])
            with tape.stop_recording():
                if outputs_only:
                    weights = None
                elif self.fisher_type == "type2":
                    weights = loss_output_hessian(engine, x, y, predictions)
                else:
                    weights = None
                    vectors = loss_output_vectors(engine, x, y, predictions, self.fisher_type, self.mc_samples, seed)
            # Examples are independent: one backward pass per column serves the whole batch.
            if weights is not None or outputs_only:
                target = tf.reduce_sum(flat, axis=0)
            else:
                target = tf.einsum("bk,bkr->r", flat, vectors)
            target = unstack_columns(target)  # sliced on the tape, so each entry can be differentiated
        for item in self.layers:
            calls = records[item.name]
            if len(calls) != 1:
                msg = (
                    f"model: layer {item.name!r} was called {len(calls)} times in one call of the model; KFAC needs "
                    "each factored layer called exactly once (leave its variables out with params=[...])."
                )
                raise traced_error(ValueError, msg)
        zs = [records[item.name][0][1] for item in self.layers]
        columns = column_gradients(tape, target, zs)
        layers = [(records[item.name][0][0], g, records[item.name][0][2]) for item, g in zip(self.layers, columns)]
        return layers, weights

    def _layer_inputs(self, item: _Layer, a: Any) -> tf.Tensor:
        """The rows a of A, (B, positions…, d_in): patches for Conv2D, with a column of ones for a joint bias."""
        layer = item.layer
        a = tf.cast(a, self.engine.dtype)
        if item.kind == "conv2d":
            kh, kw = layer.kernel_size
            a = tf.image.extract_patches(
                a,
                sizes=[1, kh, kw, 1],
                strides=[1, *layer.strides, 1],
                rates=[1, *layer.dilation_rate, 1],
                padding=layer.padding.upper(),
            )
        if item.joint:
            a = tf.concat([a, tf.ones_like(a[..., :1])], axis=-1)
        return a

    def batch_factors(self, x: Any, y: Any, seed: tf.Tensor) -> list[tuple[tf.Tensor, tf.Tensor, tf.Tensor]]:
        """Per layer ``(ΣaaT, ΣggT, rows)`` on one batch (traced); A is a vector for an Embedding."""
        out = []
        layers, weights = self._backpropagate(x, y, seed)

        def gram(g: tf.Tensor) -> tf.Tensor:
            """Σ over columns, examples and positions of g gᵀ (or gᵀ H g), g of shape (R, B, …, d)."""
            rows = tf.reshape(g, [-1, g.shape[-1]])
            return tf.matmul(rows, tf.reshape(_weighted(g, weights), [-1, g.shape[-1]]), transpose_a=True)

        for item, (a, g, xhat) in zip(self.layers, layers):
            if item.kind == "norm":
                out.append((tf.ones([1, 1], g.dtype), gram(self._norm_rows(item, g, xhat)), tf.ones([], g.dtype)))
                continue
            if item.kind == "embedding":
                tokens = tf.reshape(tf.cast(a, tf.int32), [-1])
                vocab = item.blocks[0][2][0]
                counts = tf.math.bincount(tokens, minlength=vocab, maxlength=vocab, dtype=g.dtype)
                out.append((counts, gram(g), tf.cast(tf.size(tokens), g.dtype)))
                continue
            a = self._layer_inputs(item, a)
            if self.approx == "reduce":
                a, g = _positions_mean(a), _positions_sum(g, 2)
            a_rows = tf.reshape(a, [-1, a.shape[-1]])
            out.append((tf.matmul(a_rows, a_rows, transpose_a=True), gram(g), tf.cast(tf.shape(a_rows)[0], g.dtype)))
        return out

    def _norm_rows(self, item: _Layer, g: tf.Tensor, xhat: Any) -> tf.Tensor:
        """(R, B, k): the exact per-example, per-column gradients of a normalisation's γ and β."""
        pieces = []
        if "gamma" in item.variables:
            pieces.append(_positions_sum(g * tf.cast(xhat, g.dtype)[None], 2))
        if "beta" in item.variables:
            pieces.append(_positions_sum(g, 2))
        return tf.concat(pieces, axis=-1)

    def batch_eigenvalues(self, x: Any, y: Any, seed: tf.Tensor, bases: list[Any]) -> list[list[tf.Tensor]]:
        """Per layer and block: Σ of the squared per-example gradients in the KFAC eigenbasis (traced)."""
        out = []
        layers, weights = self._backpropagate(x, y, seed)
        for item, (a, g, _), (Ua, Ug) in zip(self.layers, layers, bases):
            if item.kind == "norm":
                out.append([tf.zeros([1, 1], g.dtype)])  # exact blocks need no refit
                continue
            g_rot = tf.tensordot(g, Ug, axes=[[g.shape.rank - 1], [0]])  # (R, B, pos…, g)
            if item.kind == "embedding":
                out.append([self._embedding_eigenvalues(item, a, g_rot, weights)])
                continue
            values = []
            for role, _, _ in item.blocks:
                if role == "bias":  # its per-example gradient is g summed over positions
                    u = _positions_sum(g_rot, 2)
                    values.append(tf.reduce_sum(u * _weighted(u, weights), axis=[0, 1])[None])
                else:
                    values.append(self._kernel_eigenvalues(item, a, g_rot, Ua, weights))
            out.append(values)
        return out

    def batch_output_covariance(
        self, x: Any, blocks: list[list[tuple[tf.Tensor, tf.Tensor, tf.Tensor]]], shared: list[list[bool]]
    ) -> tf.Tensor:
        """(B, K, K): J_f Σ J_fᵀ per example for Σ block-diagonal, each block (U_A ⊗ U_G) diag(v) (U_A ⊗ U_G)ᵀ (traced).

        Per layer and example, the rotated gradient of output k is
        M_k = Σ_t (U_Aᵀ a_t)(U_Gᵀ g_kt)ᵀ over its positions t, and its share
        of the covariance Σ_ij M_k,ij M_l,ij v_ij: no Jacobian row of P
        numbers is formed. With one position, (ã²)ᵀ v is taken first.
        ``shared[l][i]``: block i of layer l has the same U_G as the block
        before it (a kernel and its bias), so the rotation is reused.
        """
        layers, _ = self._backpropagate(x, None, None, outputs_only=True)
        total = None

        def weighted_gram(u: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
            """Σ_j u_kbj u_lbj w_(b)j as (B, K, K): u (K, B, J), weights (J,) or (B, J)."""
            u = tf.transpose(u, [1, 0, 2])
            scaled = u * (weights[:, None, :] if weights.shape.rank == 2 else weights)
            return tf.matmul(scaled, u, transpose_b=True)

        for item, (a, g, xhat), layer_blocks, layer_shared in zip(self.layers, layers, blocks, shared):
            if item.kind == "norm":
                _, Ug, v = layer_blocks[0]
                terms = [weighted_gram(tf.tensordot(self._norm_rows(item, g, xhat), Ug, axes=1), v[0])]
            else:
                terms, g_rot = [], None
                for (role, _, _), (Ua, Ug, v), reuse in zip(item.blocks, layer_blocks, layer_shared):
                    if not reuse:
                        g_rot = tf.tensordot(g, Ug, axes=[[g.shape.rank - 1], [0]])  # (K, B, pos…, d_out)
                    if role == "bias":
                        terms.append(weighted_gram(_positions_sum(g_rot, 2), v[0]))
                        continue
                    inputs = self._layer_inputs(item, a)
                    a_rot = tf.tensordot(inputs, Ua, axes=[[inputs.shape.rank - 1], [0]])
                    if a_rot.shape.rank == 2:
                        terms.append(weighted_gram(g_rot, tf.matmul(a_rot**2, v)))
                        continue
                    a_rot = tf.reshape(a_rot, [tf.shape(a_rot)[0], -1, a_rot.shape[-1]])
                    g_flat = tf.reshape(g_rot, [tf.shape(g_rot)[0], tf.shape(g_rot)[1], -1, g_rot.shape[-1]])
                    rotated = tf.einsum("bta,kbtg->kbag", a_rot, g_flat)
                    rotated = tf.reshape(rotated, [tf.shape(rotated)[0], tf.shape(rotated)[1], -1])
                    terms.append(weighted_gram(rotated, tf.reshape(v, [-1])))
            layer_total = tf.add_n(terms)
            total = layer_total if total is None else total + layer_total
        return total

    def _kernel_eigenvalues(self, item: _Layer, a: Any, g_rot: tf.Tensor, Ua: tf.Tensor, weights: Any) -> tf.Tensor:
        a = self._layer_inputs(item, a)
        if self.approx == "reduce":
            a, g_rot = _positions_mean(a), _positions_sum(g_rot, 2)
        a_rot = tf.tensordot(a, Ua, axes=[[a.shape.rank - 1], [0]])  # (B, pos…, a)
        if a_rot.shape.rank == 2:  # one row per example: the squares factor
            return tf.einsum("ba,bg->ag", a_rot**2, tf.reduce_sum(g_rot * _weighted(g_rot, weights), axis=0))
        a_rot = tf.reshape(a_rot, [tf.shape(a_rot)[0], -1, a_rot.shape[-1]])
        g_rot = tf.reshape(g_rot, [tf.shape(g_rot)[0], tf.shape(g_rot)[1], -1, g_rot.shape[-1]])
        per_example = tf.einsum("bta,rbtg->rbag", a_rot, g_rot)
        return tf.reduce_sum(per_example * _weighted(per_example, weights), axis=[0, 1])

    def _embedding_eigenvalues(self, item: _Layer, tokens: Any, g_rot: tf.Tensor, weights: Any) -> tf.Tensor:
        vocab, dim = item.blocks[0][2]
        tokens = tf.cast(tokens, tf.int64)
        batch = tf.shape(tokens, out_type=tf.int64)[0]
        example = tf.broadcast_to(tf.reshape(tf.range(batch), [-1] + [1] * (tokens.shape.rank - 1)), tf.shape(tokens))
        pairs, segment = tf.unique(tf.reshape(example * vocab + tokens, [-1]))
        rows = tf.reshape(g_rot, [tf.shape(g_rot)[0], -1, dim])  # (R, B·T, dim)
        # Per (example, token) pair: the per-example gradient's row of that token.
        sums = tf.vectorized_map(lambda r: tf.math.unsorted_segment_sum(r, segment, tf.size(pairs)), rows)  # (R, pairs, dim)
        if weights is None:
            squares = tf.reduce_sum(sums**2, axis=0)
        else:
            pair_weights = tf.gather(weights, pairs // vocab)  # (pairs, R, R)
            squares = tf.reduce_sum(sums * tf.einsum("prs,spd->rpd", pair_weights, sums), axis=0)
        return tf.math.unsorted_segment_sum(squares, tf.cast(pairs % vocab, tf.int32), vocab)


def _weighted(t: tf.Tensor, weights: Any) -> tf.Tensor:
    """H t over the column axis, per example: t of shape (R, B, …), H (B, R, R); t itself without weights."""
    if weights is None:
        return t
    # A batched matmul: einsum's "brs,sb...->rb..." was 10x slower on CPU.
    columns = tf.transpose(tf.reshape(t, [tf.shape(t)[0], tf.shape(t)[1], -1]), [1, 0, 2])  # (B, R, rest)
    product = tf.matmul(tf.cast(weights, t.dtype), columns)
    return tf.reshape(tf.transpose(product, [1, 0, 2]), tf.shape(t))


def _check_options(fisher_type: str, mc_samples: int, kfac_approx: str, reduction: str, seed: Any) -> int:
    if fisher_type not in FISHER_TYPES:
        msg = f"fisher_type: expected one of {FISHER_TYPES}, got {fisher_type!r}."
        raise ValueError(msg)
    if kfac_approx not in KFAC_APPROXIMATIONS:
        msg = f"kfac_approx: expected one of {KFAC_APPROXIMATIONS}, got {kfac_approx!r}."
        raise ValueError(msg)
    if reduction not in REDUCTIONS:
        msg = f"reduction: expected one of {REDUCTIONS}, got {reduction!r}."
        raise ValueError(msg)
    check_positive_int(mc_samples, "mc_samples")
    if seed is None:
        return int(np.random.SeedSequence().generate_state(1)[0] >> 1)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        msg = f"seed: expected a non-negative int or None, got {seed!r}."
        raise TypeError(msg)
    return int(seed)


class KFACOperator(KroneckerOperator):
    r"""Kronecker-factored approximate curvature (KFAC) of a Keras model: a block-diagonal P × P operator.

    Each Dense or Conv2D layer's block is A ⊗ G (module docstring); an
    Embedding's A is diagonal (token frequencies); LayerNormalization and
    BatchNormalization scale and offset get their exact block. A variable of
    any other layer is refused by name: leave it out with ``params``.
    Products, the inverse, ``logdet``, ``trace``, ``diagonal`` and
    ``frobenius_norm`` then cost no data pass (`KroneckerOperator`).

    Parameters
    ----------
    model : keras.Model
        Layers are found through ``model.layers`` (nested models included); each
        factored layer must be called once per model call.
    loss_fn, data
        As for `GGNOperator`. The loss must give per-example values.
    fisher_type : {"type2", "mc", "empirical"}
        What G backpropagates: the columns of a square root of the loss's
        Hessian in the outputs (then KFAC approximates the GGN, and is exact
        where the examples' A-rows or G-columns do not vary: deep linear
        networks with squared error, or one example); ``mc_samples`` Gaussian
        combinations of them, seeded (the same expectation at the cost of one
        column each; exact output Hessians are still formed); or the loss's
        gradient (the empirical Fisher, approximating `OPGOperator`).
    mc_samples : int
        Samples per example for ``"mc"``.
    kfac_approx : {"expand", "reduce"}
        For layers applied at several positions (Dense on sequences, Conv2D):
        ``"expand"`` treats each position as a row of A and G; ``"reduce"``
        averages a over positions and sums g (Eschenhagen et al., 2023).
        Embeddings always expand.
    separate_bias : bool
        Give a bias its own block [1] ⊗ G (default, as curvlinops), or a last
        row of ones in the kernel's A (one joint block).
    seed : int or None
        For ``"mc"``; batch i uses the stateless seed (seed, i).

    Other Parameters
    ----------------
    params, batch_size, reduction, dtype, jit_compile : optional
        As for `HessianOperator`. ``reduction="mean"`` divides G by N, so the
        operator approximates the `GGNOperator` of the same reduction.

    Examples
    --------
    >>> import numpy as np, keras, hessop
    >>> rng = np.random.default_rng(0)
    >>> x, y = rng.normal(size=(32, 3)), rng.normal(size=(32, 2))
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, dtype="float64"),
    ...                           keras.layers.Dense(2, dtype="float64")])
    >>> loss = keras.losses.MeanSquaredError(dtype="float64")
    >>> K = hessop.KFACOperator(model, loss, (x, y))
    >>> G = hessop.GGNOperator(model, loss, (x, y))
    >>> block = slice(0, 12)  # the first kernel: deep linear + MSE, KFAC is exact there
    >>> bool(np.allclose(K.to_dense()[block, block], G.to_dense()[block, block]))
    True
    >>> Kinv = K.inverse(damping=1e-3, heuristic="exact")
    >>> ones = np.ones(K.shape[0])
    >>> bool(np.allclose(Kinv @ (K @ ones) + 1e-3 * (Kinv @ ones), 1.0))
    True
    """

    def __init__(
        self,
        model: Any,
        loss_fn: Any,
        data: Any,
        *,
        params: Sequence[Any] | None = None,
        fisher_type: str = "type2",
        mc_samples: int = 1,
        kfac_approx: str = "expand",
        separate_bias: bool = True,
        seed: int | None = None,
        batch_size: int | None = None,
        reduction: str = "mean",
        dtype: Any = None,
        jit_compile: bool = False,
    ) -> None:
        self.seed = _check_options(fisher_type, mc_samples, kfac_approx, reduction, seed)
        if not isinstance(separate_bias, bool):
            msg = f"separate_bias: expected True or False, got {separate_bias!r}."
            raise TypeError(msg)
        self._engine = Engine(model, loss_fn, params, jit_compile=jit_compile)
        self._batches = Batches(data, batch_size)
        self.num_data = self._batches.num_data
        self.reduction = reduction
        self.fisher_type, self.mc_samples, self.kfac_approx = fisher_type, mc_samples, kfac_approx
        self.num_passes = 0
        self._layers = find_layers(self._engine, separate_bias)
        self._work = _Factors(self._engine, self._layers, fisher_type, mc_samples, kfac_approx)
        self.factors = self._kfac_factors()
        blocks, indices, names = self._kron_blocks()
        dtype = as_numpy_dtype(dtype, self._engine.dtype.as_numpy_dtype)
        super().__init__(blocks, indices, self._engine.num_params, names=names, dtype=dtype)

    @property
    def scale(self) -> float:
        """1/N for ``reduction="mean"``, 1 for ``"sum"``."""
        return 1.0 / self.num_data if self.reduction == "mean" else 1.0

    @property
    def params(self) -> list[tf.Variable]:
        return list(self._engine.variables)

    def _pass(self, traced: Any, *extra: Any) -> list[list[np.ndarray]]:
        """One data pass of a per-batch function, summed in float64."""
        self.num_passes += 1
        totals: list[list[np.ndarray]] | None = None
        for index, (x, y) in enumerate(self._batches):
            seed = tf.constant([self.seed, index], dtype=tf.int64)
            values = traced(x, y, seed, *extra)
            arrays = [[np.array(t, dtype=np.float64) for t in tf.nest.flatten(layer)] for layer in values]
            if totals is None:
                totals = arrays
            else:
                for total, batch in zip(totals, arrays):
                    for t, b in zip(total, batch):
                        t += b
        for layer, total in zip(self._layers, totals):
            if not all(np.all(np.isfinite(t)) for t in total):
                msg = (
                    f"data: the curvature factors of layer {layer.name!r} are not finite "
                    "(NaN or inf in the data, outputs or loss)."
                )
                raise ValueError(msg)
        return totals

    def _kfac_factors(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """One data pass: each layer's (A, G)."""
        if not hasattr(self, "_factor_function"):
            self._factor_function = self._engine.per_batch(self._work.batch_factors)
        factors = []
        for item, (A_sum, G_sum, rows) in zip(self._layers, self._pass(self._factor_function)):
            A = A_sum / float(rows) if item.kind != "norm" else A_sum
            factors.append((A, G_sum * self.scale))
        return factors

    def output_covariance(self, x: Any, cov: KroneckerOperator, *, batch_size: int = 256) -> np.ndarray:
        r""":math:`J_f(x)\,\Sigma\,J_f(x)^\top` per example, (N, K, K), for Σ with this operator's block layout.

        ``cov`` is a `KroneckerOperator` over the same blocks, each in
        eigen-form (U_A ⊗ U_G) diag(v) (U_A ⊗ U_G)ᵀ, as a Laplace
        posterior's covariance or ``self.inverse(δ, heuristic="exact")`` is.
        Per layer, the output gradients are rotated into the blocks' bases:
        no Jacobian row of P numbers is formed, so it reaches millions of
        parameters. Layers with a diagonal input factor (Embedding) are refused.
        """
        batch_size = check_positive_int(batch_size, "batch_size")
        if not isinstance(cov, KroneckerOperator) or cov.shape != self.shape or len(cov.blocks) != len(self.blocks):
            msg = f"cov: expected a KroneckerOperator with this operator's {len(self.blocks)} blocks, got {cov!r}."
            raise ValueError(msg)
        tensors, counts, shared, position = [], [], [], 0
        cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for item in self._layers:
            previous = None
            shared.append([])
            for block in cov.blocks[position : position + len(item.blocks)]:
                eigen = block.eigen(cache)
                if eigen.Ua is None:
                    msg = f"cov: layer {item.name!r} has a diagonal input factor (an Embedding); no factored predictive."
                    raise ValueError(msg)
                shared[-1].append(previous is not None and np.array_equal(previous, eigen.Ug))
                previous = eigen.Ug
                tensors += [tf.constant(t, self._engine.dtype) for t in (eigen.Ua, eigen.Ug, eigen.values)]
            counts.append(len(item.blocks))
            position += len(item.blocks)
        starts = np.cumsum([0, *counts])
        key = tuple(tuple(layer) for layer in shared)

        def batch_covariance(x: Any, y: Any, seed: tf.Tensor, *flat: tf.Tensor) -> tf.Tensor:
            triples = [tuple(flat[i : i + 3]) for i in range(0, len(flat), 3)]
            per_layer = [triples[a:b] for a, b in zip(starts[:-1], starts[1:])]
            return self._work.batch_output_covariance(x, per_layer, [list(layer) for layer in key])

        # The blocks are arguments, not constants: a new covariance with the same sharing reuses the trace.
        functions = self.__dict__.setdefault("_covariance_functions", {})
        if key not in functions:
            functions[key] = self._engine.per_batch(batch_covariance)
        seed = tf.constant([0, 0], dtype=tf.int64)
        parts = [
            np.asarray(functions[key](x_batch, None, seed, *tensors), dtype=np.float64)
            for x_batch, _ in Batches((x, None), batch_size)
        ]
        return np.concatenate(parts, axis=0)

    def _kron_blocks(self) -> tuple[list[Kron], list[np.ndarray], list[str]]:
        blocks, indices, names = [], [], []
        for item, (A, G) in zip(self._layers, self.factors):
            for role, index, _ in item.blocks:
                factor = np.ones((1, 1)) if role == "bias" else A
                blocks.append(Kron(factor, G))
                indices.append(index)
                names.append(f"{item.name}/{role}" if len(item.blocks) > 1 else item.name)
        return blocks, indices, names

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} P={self.shape[0]} blocks={len(self.blocks)} fisher_type={self.fisher_type!r} "
            f"kfac_approx={self.kfac_approx!r} num_data={self.num_data} reduction={self.reduction!r}>"
        )


class EKFACOperator(KFACOperator):
    r"""Eigenvalue-corrected KFAC (George et al., 2018): KFAC's eigenbases with refitted eigenvalues.

    Each block is :math:`(U_A \otimes U_G)\,\mathrm{diag}(\Lambda)\,(U_A \otimes U_G)^\top`
    with U_A, U_G the eigenvectors of KFAC's factors and

    .. math:: \Lambda_{ij} = \text{scale} \sum_n \sum_c \big(U_A^\top \nabla_{W} \ell_{nc}\, U_G\big)_{ij}^2,

    the per-example, per-column gradients of the layer (summed over its
    positions) rotated into that basis: a second data pass. Λ is the best
    diagonal in the basis (in Frobenius norm), so EKFAC is exact wherever
    KFAC is, and at least as close to the layer's block otherwise.
    Normalisation blocks stay exact. Takes the arguments of `KFACOperator`.

    Examples
    --------
    >>> import numpy as np, keras, hessop
    >>> rng = np.random.default_rng(1)
    >>> x, y = rng.normal(size=(16, 3)), rng.integers(0, 3, 16)
    >>> model = keras.Sequential([
    ...     keras.Input((3,)),
    ...     keras.layers.Dense(5, activation="tanh", dtype="float64"),
    ...     keras.layers.Dense(3, dtype="float64"),
    ... ])
    >>> loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64")
    >>> E = hessop.EKFACOperator(model, loss, (x, y))
    >>> K = hessop.KFACOperator(model, loss, (x, y))
    >>> E.num_passes, round(E.logdet(damping=1e-2) - K.logdet(damping=1e-2), 6) != 0
    (2, True)
    """

    def _eigenbases(self) -> list[tuple[np.ndarray | None, np.ndarray | None]]:
        """Per layer, the eigenvectors of A (None for an Embedding's diagonal A) and of G; (None, None) for norms."""
        bases = []
        for item, (A, G) in zip(self._layers, self.factors):
            if item.kind == "norm":
                bases.append((None, None))
            else:
                bases.append((None if item.kind == "embedding" else np.linalg.eigh(A)[1], np.linalg.eigh(G)[1]))
        return bases

    def _refit(self, bases: list[tuple[np.ndarray | None, np.ndarray | None]]) -> list[list[np.ndarray]]:
        """The second data pass: per layer and block, Σ of squared rotated per-example gradients (unscaled)."""

        def batch_eigenvalues(x: Any, y: Any, seed: tf.Tensor, *flat_bases: tf.Tensor) -> list[list[tf.Tensor]]:
            return self._work.batch_eigenvalues(x, y, seed, list(zip(flat_bases[::2], flat_bases[1::2])))

        # The bases are arguments, not constants: a refit after new factors reuses the trace.
        if not hasattr(self, "_refit_function"):
            self._refit_function = self._engine.per_batch(batch_eigenvalues)
        placeholder = np.eye(1)
        tensors = [tf.constant(placeholder if basis is None else basis, self._engine.dtype) for pair in bases for basis in pair]
        return self._pass(self._refit_function, *tensors)

    def _kron_blocks(self) -> tuple[list[EigenKron], list[np.ndarray], list[str]]:
        kron, indices, names = super()._kron_blocks()
        bases = self._eigenbases()
        totals = self._refit(bases)
        blocks: list[EigenKron] = []
        position = 0
        for item, values, (Ua, Ug) in zip(self._layers, totals, bases):
            layer_blocks = kron[position : position + len(item.blocks)]
            position += len(item.blocks)
            if item.kind == "norm":
                blocks.extend(block.eigen() for block in layer_blocks)
                continue
            for (role, _, _), refit in zip(item.blocks, values):
                left = np.ones((1, 1)) if role == "bias" else Ua
                blocks.append(EigenKron(left, Ug, refit * self.scale))
        return blocks, indices, names
