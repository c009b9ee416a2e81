"""Fused data passes: a whole pass over the batches in one compiled function.

A product is a sum (or concatenation) of per-batch products. Calling one
compiled function per batch from Python costs a dispatch per batch and an
eager addition, about a third of an HVP on a small MLP. Here the loop over
batches runs inside one ``tf.function``:

- in-memory arrays are sliced inside the graph (the arrays are captured, not
  copied);
- a ``tf.data.Dataset`` is iterated inside the graph;
- other re-iterables (lists of batches, generators' factories) have no fused
  form: their operators keep the per-batch loop.

The per-batch function is the engine's compiled product, called inside the
loop, so its trace (one for all batch sizes) is shared with the per-batch path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tensorflow as tf

from hessop.autodiff.data import Batches, split_pair
from hessop.autodiff.engine import compiled, unknown_axes

__all__ = ["FusedPasses"]

PerBatch = Callable[..., tf.Tensor]
# Batches in flight at once: a second lets one batch's products overlap the
# other's on a multi-core CPU, at up to twice one batch's memory (more gained
# nothing in benchmarks/bench_fused.py).
PARALLEL_ITERATIONS = 2


def _examples(x: Any) -> tf.Tensor:
    return tf.shape(tf.nest.flatten(x)[0])[0]


def _zeros(rows: tf.Tensor, output_size: int) -> tf.Tensor:
    """The sum's start: ``rows.shape[:-1] + (output_size,)`` zeros (traced; the block width is unknown)."""
    return tf.zeros(tf.concat([tf.shape(rows)[:-1], [output_size]], 0), dtype=rows.dtype)


class FusedPasses:
    """Compiled whole-data passes over ``batches``, cached per per-batch function.

    Each method takes the per-batch product ``fn(x, y, rows)`` and the rows
    (one vector (n,) or a block (k, n)) and returns the pass's result as a
    tensor; the compiled pass is traced once per ``fn`` and rows rank, with the
    block width unknown, so neither a new vector nor a new width retraces.
    """

    def __init__(self, batches: Batches) -> None:
        if not batches.fusable:
            msg = "batches: only arrays and tf.data.Datasets have fused passes."
            raise ValueError(msg)
        self._batches = batches
        self._compiled: dict[tuple[Any, ...], Any] = {}

    # -- the loop ------------------------------------------------------------
    def _fold(self, step: Callable[..., Any], state: Any) -> Any:
        """``state = step(x, y, first, stop, state)`` for every batch (traced only).

        ``first`` and ``stop`` are the batch's example range in the data.
        """
        batches = self._batches
        num_batches = batches.num_batches
        if batches.is_static:
            x_all, y_all = batches.arrays
            size, num_data = batches.batch_size, batches.num_data

            def batch(i: tf.Tensor, first: tf.Tensor) -> tuple[Any, Any, tf.Tensor]:
                stop = tf.minimum(first + size, num_data)
                # Tensor bounds keep the batch axis unknown: one trace of the
                # per-batch product serves full batches and the short last one.
                x, y = tf.nest.map_structure(lambda t: None if t is None else t[first:stop], (x_all, y_all))
                return x, y, stop

        else:
            iterator = iter(batches.dataset)

            def batch(i: tf.Tensor, first: tf.Tensor) -> tuple[Any, Any, tf.Tensor]:
                x, y = split_pair(iterator.get_next(), "data")
                return x, y, first + _examples(x)

        def cond(i: tf.Tensor, first: tf.Tensor, state: Any) -> tf.Tensor:
            return i < num_batches

        def body(i: tf.Tensor, first: tf.Tensor, state: Any) -> tuple[Any, ...]:
            x, y, stop = batch(i, first)
            return i + 1, stop, step(x, y, first, stop, state)

        start = (tf.constant(0), tf.constant(0), state)
        return tf.while_loop(cond, body, start, parallel_iterations=PARALLEL_ITERATIONS)[2]

    def _pass(self, key: tuple[Any, ...], make: Callable[[], Callable[[tf.Tensor], tf.Tensor]], rows: tf.Tensor) -> tf.Tensor:
        if key not in self._compiled:
            function = compiled(make())
            # Traced once with the block width unknown; the concrete function
            # skips tf.function's signature matching on each call.
            concrete = function.get_concrete_function(unknown_axes(rows, [0] if rows.shape.rank == 2 else []))
            self._compiled[key] = (function, concrete)
        return self._compiled[key][1](rows)

    @property
    def tracing_counts(self) -> dict[tuple[Any, ...], int]:
        """How often each compiled pass traced (once, unless something retraces)."""
        return {key: int(function.experimental_get_tracing_count()) for key, (function, _) in self._compiled.items()}

    # -- the passes ----------------------------------------------------------
    def summed(self, fn: PerBatch, rows: tf.Tensor, output_size: int) -> tf.Tensor:
        """Σ over batches of ``fn(x, y, rows)``, each of shape ``rows.shape[:-1] + (output_size,)``."""

        def make() -> Callable[[tf.Tensor], tf.Tensor]:
            def whole(rows: tf.Tensor) -> tf.Tensor:
                return self._fold(lambda x, y, first, stop, total: total + fn(x, y, rows), _zeros(rows, output_size))

            return whole

        return self._pass(("summed", fn, rows.shape.rank, output_size), make, rows)

    def stacked(self, fn: PerBatch, rows: tf.Tensor) -> tf.Tensor:
        """The per-batch products ``fn(x, y, rows)`` concatenated along their last axis, in example order."""

        def make() -> Callable[[tf.Tensor], tf.Tensor]:
            def whole(rows: tf.Tensor) -> tf.Tensor:
                pieces = tf.TensorArray(rows.dtype, size=self._batches.num_batches, infer_shape=False)

                def step(x: Any, y: Any, first: tf.Tensor, stop: tf.Tensor, state: Any) -> Any:
                    i, pieces = state
                    # TensorArray.concat joins along the first axis: the last one goes first meanwhile.
                    piece = tf.transpose(fn(x, y, rows))
                    return i + 1, pieces.write(i, piece)

                _, pieces = self._fold(step, (tf.constant(0), pieces))
                return tf.transpose(pieces.concat())

            return whole

        return self._pass(("stacked", fn, rows.shape.rank), make, rows)

    def sliced_sum(self, fn: PerBatch, rows: tf.Tensor, rows_per_example: int, output_size: int) -> tf.Tensor:
        """Σ over batches of ``fn(x, y, piece)``, ``piece`` the batch's slice of the last axis of ``rows``."""

        def make() -> Callable[[tf.Tensor], tf.Tensor]:
            def whole(rows: tf.Tensor) -> tf.Tensor:
                def step(x: Any, y: Any, first: tf.Tensor, stop: tf.Tensor, total: tf.Tensor) -> tf.Tensor:
                    return total + fn(x, y, rows[..., first * rows_per_example : stop * rows_per_example])

                return self._fold(step, _zeros(rows, output_size))

            return whole

        return self._pass(("sliced_sum", fn, rows.shape.rank, rows_per_example, output_size), make, rows)
