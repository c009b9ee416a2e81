"""JacobianOperator: per-example loss gradients, or the Jacobian of model outputs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Unpack

import numpy as np
import tensorflow as tf

from hessop.autodiff.engine import Engine, check_parameter_paths, first_call_on_batch
from hessop.autodiff.losses import resolve_loss
from hessop.operators.base import DataPassOperator, PassOptions, with_options

__all__ = ["JacobianOperator", "jvp_loss", "jvp_outputs", "vjp_loss", "vjp_outputs"]

TARGETS = ("loss", "outputs")


# -- per-batch products (traced); J_b has a row per example (per output, for the outputs) --
def jvp_loss(engine: Engine, x: Any, y: Any, v: tf.Tensor) -> tf.Tensor:
    """J_b v, shape (B,): J_b's rows are the per-example loss gradients ∇ℓₙ."""
    return engine.linearize(lambda: engine.per_example_loss(x, y, strict=True), v)[1]


def vjp_loss(engine: Engine, x: Any, y: Any, u: tf.Tensor) -> tf.Tensor:
    """J_bᵀ u, shape (P,), for u of shape (B,)."""
    with tf.GradientTape() as tape:
        losses = engine.per_example_loss(x, y, strict=True)
    return engine.concat(engine.gradients(tape, losses, tf.stop_gradient(u)))


def jvp_outputs(engine: Engine, x: Any, y: Any, v: tf.Tensor) -> tf.Tensor:
    """J_f v, shape (B·C,), example-major: the outputs' Jacobian along v."""
    return tf.reshape(engine.linearize(lambda: engine.outputs(x), v)[1], [-1])


def vjp_outputs(engine: Engine, x: Any, y: Any, u: tf.Tensor) -> tf.Tensor:
    """J_fᵀ u, shape (P,), for u of shape (B·C,)."""
    with tf.GradientTape() as tape:
        outputs = engine.outputs(x)
    cotangent = tf.reshape(tf.stop_gradient(u), tf.shape(outputs))
    return engine.concat(engine.gradients(tape, outputs, cotangent))


@with_options(PassOptions)
class JacobianOperator(DataPassOperator):
    r"""Jacobian of per-example losses (N × P) or of model outputs ((N·C) × P).

    ``target="loss"``: row n is :math:`\nabla_\theta \ell_n`, so
    :math:`J^\top J / N` is the outer product of gradients G.
    ``target="outputs"``: the Jacobian of the flattened model outputs, rows
    ordered example-major (example n's C outputs are rows nC … nC + C − 1).
    A model with several outputs (a dict or list of heads) has them side by
    side in ``tf.nest.flatten`` order (a dict's by sorted key).

    Products are matrix-free: `matvec` is a Jacobian-vector product (forward
    mode) per batch, `rmatvec` a vector-Jacobian product (reverse mode); a block
    of k vectors costs one pass over the data. Composes with ``svds`` and ``lsqr``.

    Parameters
    ----------
    model, data
        As for `HessianOperator`.
    loss_fn : callable, keras.losses.Loss, str or None
        Per-example loss as for `HessianOperator` (a callable returning a
        scalar batch mean cannot give per-example gradients and is refused).
        Ignored, and may be None, for ``target="outputs"``.
    target : {"loss", "outputs"}
        Which Jacobian.

    Other Parameters
    ----------------
    params, batch_size, dtype, progress, check_deterministic, strategy, jit_compile : optional
        As for `HessianOperator` (J has no reduction: its rows are per example).

    Raises
    ------
    ValueError
        Unknown ``target``, a loss that is not per-example, and the data errors
        of `HessianOperator`.

    Examples
    --------
    >>> import numpy as np, tensorflow as tf, hessop
    >>> beta = tf.Variable([0.5, -1.0], dtype=tf.float64)
    >>> x = np.array([[1.0, 2.0], [0.5, -1.0], [2.0, 0.0]]); y = np.array([1.0, 0.0, 3.0])
    >>> def squared_error(y, f):
    ...     return 0.5 * (f - y) ** 2
    >>> J = hessop.JacobianOperator(
    ...     lambda x: tf.linalg.matvec(x, beta), squared_error, (x, y), params=[beta]
    ... )
    >>> J.shape
    (3, 2)
    >>> rows = (x @ beta.numpy() - y)[:, None] * x  # residual * x_n
    >>> bool(np.allclose(J @ np.eye(2), rows))
    True
    """

    def __init__(
        self,
        model: Any,
        loss_fn: Callable[[Any, Any], Any] | None,
        data: Any,
        *,
        target: str = "loss",
        **options: Unpack[PassOptions],
    ) -> None:
        if target not in TARGETS:
            msg = f"target: expected one of {TARGETS}, got {target!r}."
            raise ValueError(msg)
        self.target = target
        uses_loss = target == "loss"
        if uses_loss:
            loss_fn = resolve_loss(loss_fn, model, "JacobianOperator(target='loss')")
            self._forward, self._backward = jvp_loss, vjp_loss
        else:
            self._forward, self._backward = jvp_outputs, vjp_outputs
        super().__init__(
            model,
            loss_fn if uses_loss else None,
            data,
            reduction="sum",  # rows are unweighted per-example quantities
            per_example_loss=True,
            **options,
        )

    def _shape(self) -> tuple[int, int]:
        if self.target == "loss":
            self.num_outputs = 1
        else:
            x0, _ = self._probe_batch()
            outputs = first_call_on_batch(lambda: self._engine.flat_outputs(x0), 0, x0)
            self.num_outputs = int(outputs.shape[0]) // self._batches.batch_sizes[0]
            check_parameter_paths(self._engine.flat_outputs.get_concrete_function(x0).graph, self._engine.variables)
        return self.num_data * self.num_outputs, self.num_params

    def row_blocks(self) -> Iterator[np.ndarray]:
        """Yield the rows of J batch by batch, each a (B·C, P) array (never all of J at once).

        One derivative per example, vectorised over the batch: per-example
        gradients (``target="loss"``, C = 1), or each example's C × P output
        Jacobian (``target="outputs"``), in J's row order. A batch costs about
        B·C gradients of single examples, where ``J.H @ np.eye(B·C)`` would run
        B·C backward passes through the whole batch.

        Examples
        --------
        >>> import numpy as np, tensorflow as tf, hessop
        >>> beta = tf.Variable([0.5, -1.0], dtype=tf.float64)
        >>> x = np.array([[1.0, 2.0], [0.5, -1.0], [2.0, 0.0]])
        >>> J = hessop.JacobianOperator(lambda x: tf.linalg.matvec(x, beta), None, (x, None),
        ...                             params=[beta], target="outputs", batch_size=2)
        >>> [rows.shape for rows in J.row_blocks()]
        [(2, 2), (1, 2)]
        >>> bool(np.allclose(np.vstack(list(J.row_blocks())), x))  # d(x_n·β)/dβ = x_n
        True
        """
        if self.target == "loss":
            return self._per_example_rows(self._engine.per_example_gradients, "row_blocks")
        return self._per_example_rows(self._engine.output_jacobian_rows, "row_blocks")

    def _apply(self, rows: tf.Tensor) -> tf.Tensor:
        return self._stacked(self._forward, rows)

    def _apply_adjoint(self, rows: tf.Tensor) -> tf.Tensor:
        # J is unweighted (rows are per-example quantities), so no 1/N here.
        return self._sliced_sum(self._backward, rows, self.num_outputs)
