"""GGNOperator: the generalized Gauss-Newton matrix."""

from __future__ import annotations

from hessop.operators.base import SymmetricDataPassOperator

__all__ = ["GGNOperator"]


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
    model, loss_fn, data, params, batch_size, reduction, dtype, progress, check_deterministic, strategy, jit_compile
        As for `HessianOperator`. The loss must be a function of the model
        outputs (``loss_fn(y_true, model(x))``); per-example or batch-mean.
        The outputs may be a structure (a dict or list of heads, one loss
        over all of them): f is then all heads together, and the loss's
        Hessian couples them as it would one concatenated output.

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

    _product = "ggn"
    _kernel_curvature = "ggn"
