"""GGNOperator: the generalized Gauss-Newton matrix."""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

try:
    import keras
except ImportError:  # pragma: no cover - keras ships with tensorflow
    keras = None

from hessop.autodiff.engine import Engine, column_gradients, output_matrix, unstack_columns
from hessop.autodiff.losses import KerasLossValues, WeightedTargets
from hessop.operators.base import CurvatureOptions, SymmetricDataPassOperator, with_options

__all__ = ["GGNOperator", "ggn", "loss_output_hessian", "loss_output_vectors"]

FISHER_TYPES = ("type2", "mc", "empirical")

_ZERO = tf.UnconnectedGradients.ZERO


def ggn(engine: Engine, x: Any, y: Any, v: tf.Tensor, part: tuple[int, ...] | None = None) -> tf.Tensor:
    """J_fᵀ ∇²_f(Σₙ ℓₙ) J_f v on one batch (traced): a JVP, an output-space HVP and a VJP.

    ``part``: restricted to a variable range (`Engine.part_variables`).
    """
    with tf.GradientTape() as tape:
        predictions, jv = engine.linearize(lambda: engine.call_model(x), v, part)
    # Hessian of the summed loss w.r.t. the outputs, times J v. Losses are
    # separable over examples, so this is the per-example Hessian blocks at once.
    # Outputs may be a structure (a dict or list of heads): the loss's
    # Hessian then couples the heads, as for one concatenated output.
    fixed = tf.nest.map_structure(tf.stop_gradient, predictions)
    with tf.GradientTape() as outer:
        outer.watch(fixed)
        with tf.GradientTape() as inner:
            inner.watch(fixed)
            loss = tf.reduce_sum(engine.per_example_loss(x, y, fixed))
        grad_f = inner.gradient(loss, fixed, unconnected_gradients=_ZERO)
        pairs = zip(tf.nest.flatten(grad_f), tf.nest.flatten(jv))
        dot = tf.add_n([tf.reduce_sum(g * tf.stop_gradient(t)) for g, t in pairs])
    hjv = tf.nest.map_structure(tf.stop_gradient, outer.gradient(dot, fixed, unconnected_gradients=_ZERO))
    rows = engine.part_variables(part)[1]
    return engine.concat(engine.gradients(tape, predictions, hjv, rows))


def _unflatten_outputs(flat: tf.Tensor, like: Any) -> Any:
    """A (B, K) matrix back into the structure and shapes of the model's outputs (inverse of `output_matrix`)."""
    leaves = [tf.convert_to_tensor(leaf) for leaf in tf.nest.flatten(like)]
    sizes = [int(np.prod(leaf.shape[1:])) for leaf in leaves]
    pieces = tf.split(flat, sizes, axis=1)
    shaped = [tf.reshape(piece, tf.shape(leaf)) for piece, leaf in zip(pieces, leaves)]
    return tf.nest.pack_sequence_as(like, shaped)


# Keras losses whose labels hessop samples for "mc" (exact classes; CE and BCE on logits).
_SAMPLED_LOSSES = ("SparseCategoricalCrossentropy", "CategoricalCrossentropy", "BinaryCrossentropy", "MeanSquaredError")


def _sampled_label_gradients(engine: Engine, y: Any, predictions: Any, samples: int, seed: tf.Tensor) -> tf.Tensor | None:
    """(B, K, R) loss gradients at labels sampled from the model's predictive, or None where that is not known.

    For a Keras softmax or sigmoid cross-entropy on logits, or a squared
    error (a Gaussian whose variance makes E[g gᵀ] the loss's Hessian), the
    gradients at sampled labels have the loss Hessian as covariance, with
    no output Hessian formed. Terms a Keras loss averages (positions,
    outputs) are scaled so the covariance matches. Any other loss, sample
    weights or several outputs: None.
    """
    loss = engine.loss_fn.loss if isinstance(engine.loss_fn, KerasLossValues) else None
    name = type(loss).__name__
    if loss is None or name not in _SAMPLED_LOSSES or type(loss) is not getattr(keras.losses, name, None):
        return None
    leaves = tf.nest.flatten(predictions)
    if isinstance(y, WeightedTargets) or len(leaves) != 1:
        return None
    config = loss.get_config()
    if config.get("label_smoothing") or config.get("ignore_class") is not None or config.get("axis", -1) != -1:
        return None
    if name != "MeanSquaredError" and not config.get("from_logits"):
        return None
    f = tf.stop_gradient(tf.cast(leaves[0], engine.dtype))
    batch = tf.shape(f)[0]
    flat = tf.reshape(f, [batch, -1])
    size = tf.shape(flat)[1]
    terms = tf.cast(size, engine.dtype)
    if name == "MeanSquaredError":
        # ℓ = mean_k (f_k − y_k)²: labels f + √(K/2) ε give gradients −√(2/K) ε, covariance (2/K) I.
        noise = tf.random.stateless_normal(tf.stack([batch, size, samples]), seed, dtype=engine.dtype)
        return -tf.sqrt(2.0 / terms) * noise / np.sqrt(samples)
    if name == "BinaryCrossentropy":
        p = tf.sigmoid(flat)[:, :, None]
        labels = tf.cast(
            tf.random.stateless_uniform(tf.stack([batch, size, samples]), seed, dtype=engine.dtype) < p, engine.dtype
        )
        # ℓ averages K sigmoid terms: gradients (p − y)/K, covariance diag(p(1 − p))/K² · K.
        return (p - labels) / tf.sqrt(terms) / np.sqrt(samples)
    classes = int(f.shape[-1])
    logits = tf.reshape(f, [-1, classes])  # (B·T, C): one categorical per position
    labels = tf.random.stateless_categorical(logits, samples, seed)  # (B·T, R)
    gradients = tf.nn.softmax(logits)[:, None, :] - tf.one_hot(labels, classes, dtype=engine.dtype)  # (B·T, R, C)
    positions = terms / classes
    gradients = tf.transpose(tf.reshape(gradients, [batch, -1, samples, classes]), [0, 1, 3, 2])  # (B, T, C, R)
    return tf.reshape(gradients, [batch, size, samples]) / tf.sqrt(positions) / np.sqrt(samples)


def loss_output_vectors(
    engine: Engine, x: Any, y: Any, predictions: Any, fisher_type: str, samples: int = 1, seed: tf.Tensor | None = None
) -> tf.Tensor:
    """(B, K, R) output-space vectors s whose products Jᵀs build a GGN or Fisher (traced, no gradient).

    ``"type2"``: the K columns of a square root of each example's loss
    Hessian in its K outputs (``S Sᵀ = ∇²_f ℓ``, by eigendecomposition, so
    singular Hessians such as softmax's are fine); ``"mc"``: ``samples``
    loss gradients at labels sampled from the model's predictive for Keras
    cross-entropies on logits and squared error (`_sampled_label_gradients`),
    otherwise Gaussian combinations S ε; either way divided by √samples and
    seeded statelessly by ``seed``, with the loss Hessian as expectation;
    ``"empirical"``: the loss gradient ∇_f ℓ (R = 1).
    """
    if fisher_type == "mc":
        sampled = _sampled_label_gradients(engine, y, predictions, samples, seed)
        if sampled is not None:
            return tf.stop_gradient(sampled)
    if fisher_type == "empirical":
        return tf.stop_gradient(_loss_derivatives(engine, x, y, predictions, second=False)[:, :, None])
    hessian = _loss_derivatives(engine, x, y, predictions, second=True)
    values, vectors = tf.linalg.eigh(hessian)
    root = vectors * tf.sqrt(tf.maximum(values, 0))[:, None, :]
    if fisher_type == "type2":
        return tf.stop_gradient(root)
    noise = tf.random.stateless_normal(tf.stack([tf.shape(root)[0], tf.shape(root)[1], samples]), seed, dtype=root.dtype)
    return tf.stop_gradient(tf.matmul(root, noise) / np.sqrt(samples))


def loss_output_hessian(engine: Engine, x: Any, y: Any, predictions: Any) -> tf.Tensor:
    """(B, K, K): each example's loss Hessian in its K outputs, symmetric (traced, no gradient)."""
    return tf.stop_gradient(_loss_derivatives(engine, x, y, predictions, second=True))


def _loss_derivatives(engine: Engine, x: Any, y: Any, predictions: Any, *, second: bool) -> tf.Tensor:
    """The loss's gradient (B, K) or Hessian (B, K, K) in each example's outputs."""
    batch = tf.shape(tf.nest.flatten(x)[0])[0]
    fixed = tf.stop_gradient(output_matrix(predictions, batch))
    with tf.GradientTape() as outer:
        outer.watch(fixed)
        with tf.GradientTape() as inner:
            inner.watch(fixed)
            loss = tf.reduce_sum(engine.per_example_loss(x, y, _unflatten_outputs(fixed, predictions), strict=True))
        gradient = inner.gradient(loss, fixed, unconnected_gradients=_ZERO)
    if not second:
        return gradient
    hessian = outer.batch_jacobian(gradient, fixed, unconnected_gradients=_ZERO)
    return (hessian + tf.linalg.matrix_transpose(hessian)) / 2


def diagonal_by_backprop(engine: Engine, x: Any, y: Any, seed: tf.Tensor, fisher_type: str, samples: int) -> tf.Tensor:
    """Σₙ Σ_r (Jₙᵀ s_nr)², the diagonal of a batch's GGN (type2), MC Fisher or OPG (empirical), traced.

    Per example, R backward passes of the model (vectorised over the R
    columns and over the examples), never P products.
    """
    vectors = loss_output_vectors(engine, x, y, engine.call_model(x), fisher_type, samples, seed)

    def squares(xn: Any, packed: Any) -> tf.Tensor:
        yn, sn = packed
        with tf.GradientTape(persistent=True) as tape:
            flat = output_matrix(engine.call_model(xn), 1)
            target = unstack_columns(tf.linalg.matvec(sn[0], flat[0], transpose_a=True))  # R columns
        rows = column_gradients(tape, target, engine.variables)  # (R, *shape) per variable
        return tf.reduce_sum(tf.concat([tf.reshape(r, (tf.shape(r)[0], -1)) for r in rows], axis=1) ** 2, axis=0)

    return tf.reduce_sum(engine.per_example("diagonal rows", squares, x, (y, vectors)), axis=0)


@with_options(CurvatureOptions)
class GGNOperator(SymmetricDataPassOperator):
    r"""Generalized Gauss-Newton matrix :math:`\frac1N \sum_n J_n^\top \nabla^2_f \ell_n\, J_n`.

    :math:`J_n` is the Jacobian of example n's model outputs f and
    :math:`\nabla^2_f \ell_n` the Hessian of its loss with respect to those
    outputs. Each product is a JVP, an output-space Hessian-vector product (by
    autodiff, so any twice-differentiable loss works) and a VJP: one forward
    and two cheap backward passes per batch.

    The GGN drops the term :math:`\sum_c \partial_{f_c}\ell\, \nabla^2_\theta f_c`
    of the Hessian. It is positive semi-definite whenever the loss is convex in
    the outputs (cross-entropy on logits, squared error, Poisson on the log
    rate), and equals the Hessian for models linear in θ, e.g. GLMs with a
    canonical link.

    Parameters
    ----------
    model, loss_fn, data
        As for `HessianOperator`. The loss must be a function of the model
        outputs (``loss_fn(y_true, model(x))``); per-example or batch-mean.
        The outputs may be a structure (a dict or list of heads, one loss
        over all of them): f is then all heads together, and the loss's
        Hessian couples them as it would one concatenated output.

    Other Parameters
    ----------------
    params, batch_size, reduction, dtype, progress, check_deterministic, strategy, jit_compile : optional
        As for `HessianOperator`.

    Examples
    --------
    >>> import numpy as np, tensorflow as tf, hessop
    >>> beta = tf.Variable([0.5, -0.25], dtype=tf.float64)
    >>> x = np.array([[1.0, 2.0], [0.5, -1.0], [2.0, 0.0]]); y = np.array([1.0, 0.0, 3.0])
    >>> model = lambda x: tf.linalg.matvec(x, beta)
    >>> poisson = lambda y, eta: tf.exp(eta) - y * eta
    >>> GGN = hessop.GGNOperator(model, poisson, (x, y), params=[beta])
    >>> H = hessop.HessianOperator(model, poisson, (x, y), params=[beta])
    >>> bool(np.allclose(GGN.to_dense(), H.to_dense()))  # canonical link: GGN == Hessian
    True
    """

    _product = staticmethod(ggn)
    _kernel_curvature = "ggn"

    def _fast_diagonal(self, method: str, mc_samples: int, seed: int) -> np.ndarray:
        """The exact (``"exact"``) or Monte-Carlo (``"mc"``) diagonal by backpropagation (`hessop.diagonal`)."""
        fisher_type = "type2" if method == "exact" else "mc"
        key = (fisher_type, mc_samples)
        functions = self.__dict__.setdefault("_diagonal_functions", {})
        if key not in functions:
            functions[key] = self._engine.per_batch(
                lambda x, y, s: diagonal_by_backprop(self._engine, x, y, s, fisher_type, mc_samples)
            )
        total = np.zeros(self.num_params)
        self._count_pass()
        for index, (x, y) in enumerate(self._iter_batches("diagonal")):
            total += functions[key](x, y, tf.constant([seed, index], dtype=tf.int64)).numpy()
        if not np.all(np.isfinite(total)):
            msg = "data: the GGN's diagonal is not finite (NaN or inf in the data, outputs or loss)."
            raise ValueError(msg)
        return total * self.scale
