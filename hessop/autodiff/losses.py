"""Losses as hessop reads them: per-example values, whatever a Keras loss's reduction.

A ``keras.losses.Loss`` object reduces its values as its ``reduction`` says
and, inside a ``tf.distribute`` replica context, divides a mean by the number
of replicas (what distributed training wants). Neither belongs to a curvature
operator, whose own ``reduction`` ("mean" over the data set, or "sum") alone
defines the objective: hessop calls the object's ``call``, which returns the
values before any reduction, after the same dtype conversion ``__call__``
makes. A loss given by name, or the loss a model was compiled with, goes the
same way.

Batches of ``(x, y, sample_weight)`` carry their weights to the loss in
`WeightedTargets`, in place of y: the weights multiply the per-example losses
and "mean" still divides by the number of examples, as Keras does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import tensorflow as tf

try:
    import keras
except ImportError:  # pragma: no cover
    keras = None

__all__ = ["WeightedTargets", "as_per_example", "resolve_loss"]


class WeightedTargets(NamedTuple):
    """A batch's targets with their sample weights (one per example)."""

    targets: Any
    sample_weight: Any


class KerasLossValues:
    """``loss.call(y_true, y_pred)``: a Keras loss object's values before reduction, one per example.

    Values with axes beyond the batch's (a loss per time step or pixel) are
    averaged over them, so that a mean over the data set is Keras's
    "sum_over_batch_size" of the same values.
    """

    def __init__(self, loss: Any) -> None:
        self.loss = loss
        self.name = getattr(loss, "name", type(loss).__name__)

    def __call__(self, y_true: Any, y_pred: Any) -> tf.Tensor:
        dtype = self.loss.dtype
        y_pred = keras.tree.map_structure(lambda t: keras.ops.convert_to_tensor(t, dtype=dtype), y_pred)
        y_true = keras.tree.map_structure(lambda t: keras.ops.convert_to_tensor(t, dtype=dtype), y_true)
        values = tf.convert_to_tensor(self.loss.call(y_true, y_pred))
        if values.shape.rank is not None and values.shape.rank > 1:
            values = tf.reduce_mean(values, axis=list(range(1, values.shape.rank)))
        return values

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.loss!r})"


def as_per_example(loss_fn: Any) -> Callable[[Any, Any], Any]:
    """``loss_fn`` as a callable ``(y_true, y_pred)``: Keras loss objects and names by their per-example values."""
    if isinstance(loss_fn, KerasLossValues):
        return loss_fn
    if isinstance(loss_fn, str):
        if keras is None:  # pragma: no cover
            msg = f"loss_fn: a loss given by name ({loss_fn!r}) needs Keras; pass a callable."
            raise TypeError(msg)
        try:
            loss_fn = keras.losses.get(loss_fn)
        except ValueError:
            msg = f"loss_fn: {loss_fn!r} is not the name of a Keras loss (as keras.losses.get reads it)."
            raise ValueError(msg) from None
    if keras is not None and isinstance(loss_fn, keras.losses.Loss):
        return KerasLossValues(loss_fn)
    if not callable(loss_fn):
        msg = (
            "loss_fn: expected a callable loss_fn(y_true, y_pred), a keras.losses.Loss or a Keras loss name, "
            f"got {type(loss_fn).__name__}."
        )
        raise TypeError(msg)
    return loss_fn


def resolve_loss(loss_fn: Any, model: Any, who: str) -> Callable[[Any, Any], Any]:
    """``loss_fn`` for an operator that needs one; None means the loss ``model`` was compiled with."""
    if loss_fn is not None:
        return as_per_example(loss_fn)
    compiled = getattr(model, "loss", None) if keras is not None and isinstance(model, keras.Model) else None
    if compiled is None:
        msg = (
            f"loss_fn: {who} needs a loss function, got None, and the model was not compiled with a loss; "
            "pass loss_fn (a callable, a keras.losses.Loss or a name such as 'sparse_categorical_crossentropy')."
        )
        raise ValueError(msg)
    if isinstance(compiled, (dict, list, tuple)):
        msg = (
            f"loss_fn: the model was compiled with one loss per output ({type(compiled).__name__}); hessop needs "
            "one loss of all outputs: pass loss_fn(y_true, y_pred) that combines them."
        )
        raise ValueError(msg)
    return as_per_example(compiled)
