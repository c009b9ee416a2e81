"""OPGOperator (outer product of gradients G = JᵀJ/N) and per-example gradients."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from hessop.autodiff.engine import Engine
from hessop.dense.columns import DenseHooks
from hessop.operators.base import CurvatureOptions, SymmetricDataPassOperator, with_options

__all__ = ["OPGOperator", "opg", "per_example_gradients"]

# `to_dense` sums per-example gradients in GEMMs of about this many bytes of rows.
_ROWS_BYTES = 64 * 2**20


def opg(engine: Engine, x: Any, y: Any, v: tf.Tensor, part: tuple[int, ...] | None = None) -> tf.Tensor:
    """J_bᵀ J_b v on one batch (traced), J_b's rows the per-example loss gradients.

    One forward pass carries both modes: J v forward, then Jᵀ (J v) backward.
    ``part``: restricted to a variable range (`Engine.part_variables`).
    """
    with tf.GradientTape() as tape:
        losses, jv = engine.linearize(lambda: engine.per_example_loss(x, y, strict=True), v, part)
    rows = engine.part_variables(part)[1]
    return engine.concat(engine.gradients(tape, losses, tf.stop_gradient(jv), rows))


@with_options(CurvatureOptions)
class OPGOperator(SymmetricDataPassOperator):
    r"""Outer product of per-example gradients, :math:`G = \frac1N \sum_n g_n g_n^\top = J^\top J / N`.

    Matrix-free: per batch, :math:`J_b v` (forward mode) then
    :math:`J_b^\top (J_b v)` (reverse mode) in one forward pass; J is never
    stored. With ``reduction="sum"`` the operator is :math:`J^\top J`. G is
    uncentred (it is not the gradient covariance :math:`G - \bar g \bar g^\top`).

    Parameters
    ----------
    model, loss_fn, data
        As for `HessianOperator`; ``loss_fn`` must give per-example losses (a
        Keras loss object does, whatever its ``reduction``).

    Other Parameters
    ----------------
    params, batch_size, reduction, dtype, progress, check_deterministic, strategy, jit_compile : optional
        As for `HessianOperator`.

    Examples
    --------
    >>> import numpy as np, tensorflow as tf, hessop
    >>> beta = tf.Variable([0.5, -1.0], dtype=tf.float64)
    >>> x = np.array([[1.0, 2.0], [0.5, -1.0], [2.0, 0.0]]); y = np.array([1.0, 0.0, 3.0])
    >>> def squared_error(y, f):
    ...     return 0.5 * (f - y) ** 2
    >>> G = hessop.OPGOperator(
    ...     lambda x: tf.linalg.matvec(x, beta), squared_error, (x, y), params=[beta]
    ... )
    >>> grads = (x @ beta.numpy() - y)[:, None] * x
    >>> bool(np.allclose(G.to_dense(), grads.T @ grads / 3))
    True
    """

    def _fast_diagonal(self, method: str, mc_samples: int, seed: int) -> np.ndarray:
        """Σₙ gₙ²·scale from per-example gradients: one backward pass per example, exact for any ``method``."""
        total = np.zeros(self.num_params)
        for rows in self._per_example_rows(self._engine.per_example_gradients, "diagonal"):
            total += np.sum(rows.astype(np.float64) ** 2, axis=0)
        return total * self.scale

    _product = staticmethod(opg)
    _per_example_loss = True

    def per_example_gradients(self) -> Iterator[np.ndarray]:
        """Yield the rows of J batch by batch, each a (B, P) array (never all of J at once)."""
        return self._per_example_rows(self._engine.per_example_gradients, "per_example_gradients")

    def dense_hooks(self) -> DenseHooks:
        """As for the other symmetric operators, and G itself from per-example gradients (``known_dense``)."""
        return dataclasses.replace(super().dense_hooks(), known_dense=self._known_dense)

    def _known_dense(self) -> np.ndarray | None:
        """G itself, for `to_dense`: Σ_n g_n g_nᵀ times `scale`, from per-example gradients; None under a multi-replica strategy.

        One data pass and one GEMM per ``_ROWS_BYTES`` of rows (numpy's
        ``a.T @ a``, a symmetric rank-k update), instead of a data pass per
        block of unit vectors (``bench_dense.py`` compares them). A batch larger than that is taken
        in pieces, so the rows held at once stay within it.
        """
        if self._replicas is not None:
            return None
        rows_at_once = max(1, _ROWS_BYTES // (self.num_params * self.dtype.itemsize))
        dense = np.zeros(self.shape, dtype=self.dtype)
        pending: list[np.ndarray] = []
        for rows in self._per_example_rows(self._engine.per_example_gradients, "to_dense", rows_at_once):
            pending.append(rows)
            if sum(len(r) for r in pending) >= rows_at_once:
                dense += _gram(pending)
                pending = []
        if pending:
            dense += _gram(pending)
        dense *= self.dtype.type(self.scale)
        return dense


def _gram(blocks: list[np.ndarray]) -> np.ndarray:
    rows = blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
    return rows.T @ rows


def per_example_gradients(
    model: Any,
    loss_fn: Callable[[Any, Any], Any],
    data: Any,
    *,
    params: Sequence[Any] | None = None,
    batch_size: int | None = None,
    dtype: Any = None,
    concatenate: bool = False,
    max_rows: int = 100_000_000,
) -> Iterator[np.ndarray] | np.ndarray:
    r"""Per-example gradients :math:`g_n = \nabla_\theta \ell_n`, vectorized per batch.

    Each batch is one vectorized Jacobian of the per-example losses (pfor), not a
    Python loop over examples.

    Parameters
    ----------
    model, loss_fn, data, params, batch_size, dtype
        As for `OPGOperator`.
    concatenate : bool
        False (default): return an iterator of (B, P) blocks, one per batch.
        True: return one (N, P) array.
    max_rows : int
        With ``concatenate=True``, refuse when N·P exceeds this many numbers.

    Returns
    -------
    iterator of numpy.ndarray, or numpy.ndarray
        Rows in data order, flat parameter order along columns.

    Examples
    --------
    >>> import numpy as np, tensorflow as tf, hessop
    >>> beta = tf.Variable([0.5, -1.0], dtype=tf.float64)
    >>> x = np.array([[1.0, 2.0], [0.5, -1.0], [2.0, 0.0]]); y = np.array([1.0, 0.0, 3.0])
    >>> def squared_error(y, f):
    ...     return 0.5 * (f - y) ** 2
    >>> J = hessop.per_example_gradients(
    ...     lambda x: tf.linalg.matvec(x, beta), squared_error, (x, y),
    ...     params=[beta], concatenate=True,
    ... )
    >>> J.shape
    (3, 2)
    """
    G = OPGOperator(model, loss_fn, data, params=params, batch_size=batch_size, dtype=dtype, check_deterministic=False)
    if not concatenate:
        return G.per_example_gradients()
    if G.num_data * G.num_params > max_rows:
        msg = (
            f"concatenate: N·P = {G.num_data}·{G.num_params} numbers exceeds max_rows={max_rows}; "
            "iterate over the blocks instead or raise max_rows."
        )
        raise ValueError(msg)
    return np.concatenate(list(G.per_example_gradients()), axis=0)
