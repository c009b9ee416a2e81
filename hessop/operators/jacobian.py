"""JacobianOperator: per-example loss gradients, or the Jacobian of model outputs."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from hessop.autodiff.engine import check_parameter_paths, first_call_on_batch
from hessop.autodiff.losses import resolve_loss
from hessop.operators.base import DataPassOperator

__all__ = ["JacobianOperator"]

TARGETS = ("loss", "outputs")


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
    model, data, params, batch_size, dtype, progress, check_deterministic, strategy, jit_compile
        As for `HessianOperator`.
    loss_fn : callable, keras.losses.Loss, str or None
        Per-example loss as for `HessianOperator` (a callable returning a
        scalar batch mean cannot give per-example gradients and is refused).
        Ignored, and may be None, for ``target="outputs"``.
    target : {"loss", "outputs"}
        Which Jacobian.

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
    >>> J = hessop.JacobianOperator(lambda x: tf.linalg.matvec(x, beta), lambda y, f: 0.5 * (f - y) ** 2,
    ...                             (x, y), params=[beta])
    >>> J.shape
    (3, 2)
    >>> bool(np.allclose(J @ np.eye(2), (x @ beta.numpy() - y)[:, None] * x))  # rows: residual * x_n
    True
    """

    def __init__(
        self,
        model: Any,
        loss_fn: Callable[[Any, Any], Any] | None,
        data: Any,
        *,
        target: str = "loss",
        params: Sequence[Any] | None = None,
        batch_size: int | None = None,
        dtype: Any = None,
        progress: bool = False,
        check_deterministic: bool = True,
        strategy: Any = None,
        jit_compile: bool = False,
    ) -> None:
        if target not in TARGETS:
            msg = f"target: expected one of {TARGETS}, got {target!r}."
            raise ValueError(msg)
        self.target = target
        uses_loss = target == "loss"
        if uses_loss:
            loss_fn = resolve_loss(loss_fn, model, "JacobianOperator(target='loss')")
        super().__init__(
            model,
            loss_fn if uses_loss else None,
            data,
            params=params,
            batch_size=batch_size,
            reduction="sum",  # rows are unweighted per-example quantities
            dtype=dtype,
            progress=progress,
            check_deterministic=check_deterministic and uses_loss,
            per_example_loss=True,
            shape=(0, 0),  # set below, once the output width is known
            strategy=strategy,
            jit_compile=jit_compile,
        )
        if uses_loss:
            self.num_outputs = 1
        else:
            x0, _ = self._probe_batch()
            outputs = first_call_on_batch(lambda: self._engine.outputs(x0), 0, x0)
            self.num_outputs = int(outputs.shape[0]) // self._batches.batch_sizes[0]
            check_parameter_paths(self._engine.outputs.get_concrete_function(x0).graph, self._engine.variables)
        self.shape = (self.num_data * self.num_outputs, self.num_params)
        prefix = "loss" if uses_loss else "outputs"
        self._forward, self._backward = f"jvp_{prefix}", f"vjp_{prefix}"

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
        if self._forward == "jvp_loss":
            return self._per_example_rows(self._engine.per_example_gradients, "row_blocks")
        return self._per_example_rows(self._engine.output_jacobian_rows, "row_blocks")

    def _apply(self, rows: tf.Tensor) -> tf.Tensor:
        return self._stacked(self._forward, rows)

    def _apply_adjoint(self, rows: tf.Tensor) -> tf.Tensor:
        # J is unweighted (rows are per-example quantities), so no 1/N here.
        return self._sliced_sum(self._backward, rows, self.num_outputs)
