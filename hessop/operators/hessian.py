"""HessianOperator: the exact Hessian of a data set's loss as a LinearOperator."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Unpack

import numpy as np
import tensorflow as tf

from hessop.autodiff.engine import TRACE_ERRORS, Engine, traced_error
from hessop.dense.columns import DEFAULT_MAX_DENSE, dense_from_operator
from hessop.operators.base import CurvatureOptions, SymmetricDataPassOperator, _kind_of, with_options

__all__ = ["HessianOperator", "hvp_forward", "hvp_reverse"]

_ZERO = tf.UnconnectedGradients.ZERO


# -- per-batch products (traced) ------------------------------------------------
def hvp_forward(engine: Engine, x: Any, y: Any, v: tf.Tensor, part: tuple[int, ...] | None = None) -> tf.Tensor:
    """∇²(Σₙ ℓₙ) v on one batch, forward-over-reverse: a JVP of the gradient.

    ``part``: restricted to a variable range (`Engine.part_variables`).
    """
    tangent_variables, row_variables = engine.part_variables(part)
    try:
        with tf.autodiff.ForwardAccumulator(tangent_variables, engine.split(v, part)) as acc:
            with tf.GradientTape() as tape:
                loss = engine.summed_loss(x, y)
            grads = engine.gradients(tape, loss, variables=row_variables)
    except TRACE_ERRORS as error:
        # A mistake in the model or loss fails the same way without the
        # accumulator: raise that one as it is.
        engine.summed_loss(x, y)
        reason = engine.forward_mode_failed(error)
        msg = (
            f"hvp_mode='forward': forward-mode autodiff is unavailable for this model ({reason}); "
            "use hvp_mode='reverse' or 'auto'."
        )
        raise traced_error(ValueError, msg) from error
    return engine.concat(acc.jvp(grads, unconnected_gradients=_ZERO))


def hvp_reverse(engine: Engine, x: Any, y: Any, v: tf.Tensor, part: tuple[int, ...] | None = None) -> tf.Tensor:
    """∇²(Σₙ ℓₙ) v on one batch, reverse-over-reverse: the gradient of ⟨∇ℓ, v⟩ (Pearlmutter)."""
    tangent_variables, row_variables = engine.part_variables(part)
    tangents = engine.split(tf.stop_gradient(v), part)
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            loss = engine.summed_loss(x, y)
        grads = engine.gradients(inner, loss, variables=tangent_variables)
        dot = tf.add_n([tf.reduce_sum(g * t) for g, t in zip(grads, tangents)])
    return engine.concat(engine.gradients(outer, dot, variables=row_variables, second_order=True))


# The two modes of ``hvp_mode``; "auto" times them (`Engine.hvp_function`).
HVP_PRODUCTS = {"forward": hvp_forward, "reverse": hvp_reverse}

DENSE_METHODS = ("auto", "hvp")


@with_options(CurvatureOptions)
class HessianOperator(SymmetricDataPassOperator):
    r"""Exact Hessian of the mean (or summed) loss over a data set, matrix-free.

    Every product is a Hessian-vector product (Pearlmutter's trick) summed over
    mini-batches; a block of k vectors costs one pass over the data. No P×P
    matrix is formed unless `to_dense` is called.

    Parameters
    ----------
    model : keras.Model or callable
        Keras model (called with ``training=False``) or any callable
        ``x -> predictions`` whose variables are listed in `params`.
    loss_fn : callable, keras.losses.Loss, str or None
        ``loss_fn(y_true, y_pred)`` returning per-example losses (``[B]`` or
        ``[B, 1]``) or their batch mean (a scalar). A ``keras.losses.Loss``
        object is read by its per-example values whatever its ``reduction``
        (values over extra axes, such as time steps, are averaged per
        example); a name such as ``"sparse_categorical_crossentropy"`` means
        that Keras loss; None means the loss the model was compiled with.
    data : tuple, tf.data.Dataset or iterable
        ``(x, y)`` arrays (x may be a tuple or dict for multi-input models), a
        `tf.data.Dataset` of ``(x, y)`` batches, or a re-iterable (e.g. a list)
        of ``(x, y)`` batches. ``(x, y, sample_weight)`` arrays or batches, as
        Keras takes them, multiply each example's loss by its weight (a mean
        still divides by the number of examples).
    hvp_mode : {"auto", "forward", "reverse"}
        Forward-over-reverse or reverse-over-reverse HVPs. ``"auto"`` (default)
        starts with reverse-over-reverse and, once those products have taken
        4 × as long as tracing them, times both on the first batch and keeps
        the faster, separately for single vectors and blocks (reverse under a
        multi-replica strategy).

    Other Parameters
    ----------------
    params : list of variables, optional
        Variables to differentiate with respect to; default
        ``model.trainable_variables``. Their order defines the flat order.
    batch_size : int, optional
        Mini-batch size for array data; default: all data in one batch.
    reduction : {"mean", "sum"}
        Hessian of :math:`\frac1N\sum_n \ell_n` (default) or of :math:`\sum_n \ell_n`.
    dtype : dtype, optional
        dtype of the operator (numpy in/out); default the parameters' dtype.
    progress : bool
        Show a tqdm progress bar over mini-batches for each product that
        lasts longer than a second. Products then run batch by batch from
        Python instead of as one compiled pass (slower on small batches). For
        one bar over a whole computation, pass ``progress=True`` to `eigen`,
        `trace`, `diagonal` or `spectral_density` instead.
    check_deterministic : bool
        Compare two passes over the data at construction and refuse data or
        models that change between passes (shuffling, random augmentation).
    strategy : tf.distribute.Strategy, optional
        Distribute each batch over the strategy's replicas and all-reduce once
        per product. Default: the strategy in scope, else the one that owns the
        model's variables, else none (single device).
    jit_compile : bool
        Compile the per-batch products with XLA (``tf.function(jit_compile=True)``).
        Off by default: XLA compiles again for every new input shape, and on
        CPUs it was often much slower than graph mode, forward-over-reverse
        above all. Turn it on where ``benchmarks/bench_hvp.py`` shows it pays
        (on a GPU, say).

    Attributes
    ----------
    num_data : int
        Number of examples N.
    num_params : int
        Number of parameters P; ``shape == (P, P)``.
    loss : float
        The loss (mean or sum, per `reduction`) at construction.
    num_products : int
        Vectors multiplied so far (a block of k counts k), for seeing what a
        solver cost; every data-pass operator has it.
    num_passes : int
        Passes over the data so far (a block product is one pass; gradients,
        per-example rows and `to_dense` count theirs too).

    Raises
    ------
    ValueError
        Empty data, mismatched x/y lengths, a loss that is not per-example or
        scalar, a non-finite loss, no trainable variables, non-deterministic data.
    TypeError
        A model, loss, data or params of the wrong kind; a jit_compile that is not a bool.

    Notes
    -----
    With :math:`L(\theta) = \frac1N\sum_{n=1}^N \ell_n(\theta)`, the product is
    :math:`Hv = \frac1N \sum_b \nabla_\theta (\nabla_\theta L_b(\theta)^\top v)`
    with :math:`L_b` the per-batch *sum* of losses, so unequal batch sizes are
    weighted exactly. Each product costs about two gradient evaluations.

    Examples
    --------
    >>> import numpy as np, keras, hessop
    >>> x = np.random.default_rng(0).normal(size=(50, 3))
    >>> y = (x[:, 0] > 0).astype("float64")[:, None]
    >>> model = keras.Sequential(
    ...     [keras.Input((3,)), keras.layers.Dense(1, dtype="float64")]
    ... )
    >>> loss = keras.losses.BinaryCrossentropy(from_logits=True, dtype="float64")
    >>> H = hessop.HessianOperator(model, loss, (x, y), batch_size=16)
    >>> H.shape
    (4, 4)
    >>> bool(np.allclose(H @ np.ones(4), H.to_dense() @ np.ones(4)))
    True
    """

    _product = staticmethod(hvp_reverse)  # the mode that always works; `_per_batch` picks per hvp_mode
    _kernel_curvature = "hessian"
    _differentiates_model_twice = True

    def __init__(
        self,
        model: Any,
        loss_fn: Callable[[Any, Any], Any],
        data: Any,
        *,
        hvp_mode: str = "auto",
        **options: Unpack[CurvatureOptions],
    ) -> None:
        self._setup(model, loss_fn, data, hvp_mode=hvp_mode, **options)

    def _per_batch(self, product: Any, rows: tf.Tensor, part: tuple[int, ...] | None = None) -> Callable[..., tf.Tensor]:
        x0, y0 = self._probe_batch()
        kind = _kind_of(rows)
        # Timing the modes on a few rows keeps "auto" cheap for wide blocks.
        return self._engine.hvp_function(HVP_PRODUCTS, kind, x0, y0, rows if kind == "single" else rows[:4], part)

    def _pass_took(self, kind: str, seconds: float) -> None:
        # Wall time of the pass (on a GPU, whose kernels run asynchronously,
        # an undercount: the "auto" mode search then comes later).
        self._engine.record_hvp_seconds(kind, seconds)

    def to_dense(self, *, max_params: int = DEFAULT_MAX_DENSE, block_size: int | None = None, method: str = "auto") -> np.ndarray:
        """The full P×P Hessian, off-diagonal blocks between variables included.

        Built from Hessian-vector products with blocks of unit vectors, one
        data pass per block (unlike ``tf.hessians``, which returns only the
        per-variable diagonal blocks). Only the lower block triangle is
        computed: the variables fall into parts of consecutive variables
        (small ones such as biases join the part before), a block of a
        part's columns carries its tangent only in that part's variables and
        returns the rows from the part's first variable on, and the rows
        above are the transposed rows of earlier columns.

        With ``method="auto"`` (default), the block of the largest kernel of
        a ``keras.layers.Dense`` layer (exactly that class, with a bias and
        no regularizer, in a Sequential or functional model, called once on
        inputs of rank 2) comes in closed form instead: z_n = x_n W + b is linear in W, so that block is
        Σ_n (x_n x_nᵀ) ⊗ ∂²ℓ_n/∂z_n², and ∂²ℓ_n/∂z_n² is the Hessian of
        ℓ_n with respect to the bias. That replaces W's columns (each a pass
        through the whole model) by one matrix product: for an MLP 64-64-10
        on 512 examples, 4,096 of its 4,810 columns (see
        benchmarks/RESULTS.md). Two random products of the Hessian then
        check the block; where they differ from it by more than the square
        root of the dtype's machine epsilon (a custom layer that reuses the
        kernel, a loss that couples examples), a warning says so and every
        column is built from products.

        Parameters
        ----------
        max_params : int
            Refuse when P exceeds this (the dense matrix needs P² numbers); raise
            it deliberately for larger models.
        block_size : int or None
            Columns per data pass; memory grows with it. None (default): the
            first columns are built with blocks of 16, 32, 64, ... up to 512
            columns (an untimed block and two timed ones each) and the rest with
            the width that cost least per column. The width stops growing
            once one is 10 % slower than the best, or (on Linux, on the CPU)
            once the next one's peak memory, scaled from the last one's,
            would exceed half the memory available; where that cannot be
            measured (other systems, a GPU) at 128.
        method : {"auto", "hvp"}
            "auto": a Dense layer's kernel block in closed form where one
            qualifies (not under a multi-replica strategy), the rest from
            HVPs; "hvp": every column from HVPs.

        Returns
        -------
        numpy.ndarray
            Array of shape (P, P) and the operator's dtype.

        Raises
        ------
        ValueError
            If P > max_params, block_size < 1, or method is not one of the above.

        Examples
        --------
        >>> import numpy as np, keras, hessop
        >>> rng = np.random.default_rng(0)
        >>> x, y = rng.normal(size=(40, 3)), rng.integers(0, 2, size=(40, 1)).astype("float64")
        >>> model = keras.Sequential([
        ...     keras.Input((3,)),
        ...     keras.layers.Dense(4, activation="tanh", dtype="float64"),
        ...     keras.layers.Dense(1, dtype="float64"),
        ... ])
        >>> loss = keras.losses.BinaryCrossentropy(from_logits=True, dtype="float64")
        >>> H = hessop.HessianOperator(model, loss, (x, y))
        >>> dense = H.to_dense()  # the first kernel's 12 × 12 block in closed form
        >>> bool(np.allclose(dense, H.to_dense(method="hvp")))
        True
        """
        if method not in DENSE_METHODS:
            msg = f"method: expected one of {DENSE_METHODS}, got {method!r}."
            raise ValueError(msg)
        return dense_from_operator(self, max_params=max_params, block_size=block_size, closed_form=method == "auto")
