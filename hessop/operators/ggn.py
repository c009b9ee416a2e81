"""GGNOperator: the generalized Gauss-Newton matrix."""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from hessop.autodiff.engine import Engine
from hessop.operators.base import CurvatureOptions, SymmetricDataPassOperator, with_options

__all__ = ["GGNOperator", "ggn"]

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
