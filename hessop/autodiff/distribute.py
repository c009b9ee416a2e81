"""Data passes under a tf.distribute strategy.

Each global batch is cut into contiguous per-replica shards (replica i gets
examples ⌊iB/R⌋ … ⌊(i+1)B/R⌋ − 1, so uneven and even empty shards are fine:
every product is a per-example *sum*). Per-replica partial sums stay on their
devices across all batches and are all-reduced once per data pass: one
all-reduce of k·P numbers per product of k vectors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import tensorflow as tf

from hessop.autodiff.engine import compiled

__all__ = ["Replicas", "resolve_strategy"]


def resolve_strategy(strategy: Any, variables: list[tf.Variable]) -> tf.distribute.Strategy:
    """The given strategy, else the one in scope, else the one owning the variables."""
    if strategy is not None:
        if not isinstance(strategy, tf.distribute.Strategy):
            msg = f"strategy: expected a tf.distribute.Strategy or None, got {type(strategy).__name__}."
            raise TypeError(msg)
        return strategy
    if tf.distribute.has_strategy():
        return tf.distribute.get_strategy()
    for variable in variables:
        owner = getattr(variable, "distribute_strategy", None) or getattr(variable, "_distribute_strategy", None)
        if isinstance(owner, tf.distribute.Strategy):
            return owner
    return tf.distribute.get_strategy()


class Replicas:
    """Runs per-batch products on every replica of ``strategy``."""

    def __init__(self, strategy: tf.distribute.Strategy) -> None:
        self.strategy = strategy
        self.count = int(strategy.num_replicas_in_sync)
        self._guarded: dict[tuple[Callable[..., tf.Tensor], int | None], Callable[..., tf.Tensor]] = {}

    def _guard(self, fn: Callable[..., tf.Tensor], output_size: int | None) -> Callable[..., tf.Tensor]:
        """``fn`` on a shard, or zeros when the shard is empty.

        A batch smaller than the replica count leaves some replicas no
        examples, and vectorized_map (pfor) fails on empty batches. The zero
        result has the shape of ``rows`` with its last axis set to
        ``output_size`` (None: same as ``rows``; 0: empty, for stacked outputs).
        """
        key = (fn, output_size)
        if key not in self._guarded:

            def guarded(x: Any, y: Any, rows: tf.Tensor) -> tf.Tensor:
                size = tf.shape(tf.nest.flatten(x)[0])[0]
                if output_size is None:
                    shape = tf.shape(rows)
                else:
                    shape = tf.concat([tf.shape(rows)[:-1], [output_size]], axis=0)
                return tf.cond(size > 0, lambda: fn(x, y, rows), lambda: tf.zeros(shape, rows.dtype))

            self._guarded[key] = compiled(guarded)
        return self._guarded[key]

    def __repr__(self) -> str:
        return f"{type(self.strategy).__name__}({self.count} replicas)"

    def _bounds(self, size: int, replica: int) -> tuple[int, int]:
        return (replica * size) // self.count, ((replica + 1) * size) // self.count

    def shard(self, structure: Any, size: int, *, axis: int = 0, width: int = 1) -> Any:
        """Per-replica contiguous slices of every tensor in ``structure`` along ``axis``."""
        if structure is None:
            return None

        def value_fn(ctx: tf.distribute.experimental.ValueContext) -> Any:
            lo, hi = self._bounds(size, ctx.replica_id_in_sync_group)
            index = (slice(None),) * axis + (slice(lo * width, hi * width),)
            return tf.nest.map_structure(lambda t: t[index], structure)

        return self.strategy.experimental_distribute_values_from_function(value_fn)

    def replicate(self, tensor: tf.Tensor) -> Any:
        """The same tensor on every replica's device (copied once per product)."""
        return self.strategy.experimental_distribute_values_from_function(lambda _ctx: tensor)

    def _accumulate(self, fn: Callable[..., tf.Tensor], arguments: Iterable[tuple[Any, ...]]) -> tf.Tensor:
        """Per-replica running sums of ``fn(*args)`` over batches, then one all-reduce."""
        total = None
        for args in arguments:
            if total is None:
                total = self.strategy.run(fn, args=args)
            else:
                total = self.strategy.run(lambda acc, *a: acc + fn(*a), args=(total, *args))
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, total, axis=None)

    def summed(
        self,
        fn: Callable[..., tf.Tensor],
        batches: Iterable[tuple[Any, Any, int]],
        rows: tf.Tensor,
        output_size: int | None = None,
    ) -> tf.Tensor:
        """Σ over batches and replicas of ``fn(x_shard, y_shard, rows)``; one all-reduce.

        ``output_size``: the length of ``fn``'s last output axis where it is
        not that of ``rows`` (the restricted products of `to_dense`).
        """
        rows_on_replicas = self.replicate(rows)
        arguments = ((self.shard(x, size), self.shard(y, size), rows_on_replicas) for x, y, size in batches)
        return self._accumulate(self._guard(fn, output_size), arguments)

    def stacked(self, fn: Callable[..., tf.Tensor], batches: Iterable[tuple[Any, Any, int]], rows: tf.Tensor) -> tf.Tensor:
        """Per-example outputs of ``fn`` gathered in example order (along the last axis)."""
        fn = self._guard(fn, 0)
        rows_on_replicas = self.replicate(rows)
        parts = []
        for x, y, size in batches:
            per_replica = self.strategy.run(fn, args=(self.shard(x, size), self.shard(y, size), rows_on_replicas))
            parts.append(self.strategy.gather(per_replica, axis=rows.shape.rank - 1))
        return tf.concat(parts, axis=-1)

    def sliced_sum(
        self, fn: Callable[..., tf.Tensor], batches: Iterable[tuple[Any, Any, int, tf.Tensor]], width: int, output_size: int
    ) -> tf.Tensor:
        """Σ of ``fn(x_shard, y_shard, piece_shard)``: each batch brings its own slice of rows."""
        arguments = (
            (self.shard(x, size), self.shard(y, size), self.shard(piece, size, axis=piece.shape.rank - 1, width=width))
            for x, y, size, piece in batches
        )
        return self._accumulate(self._guard(fn, output_size), arguments)
