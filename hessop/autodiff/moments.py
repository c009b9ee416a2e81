"""Exact second derivatives through ``tf.nn.moments`` in hessop's graphs.

``tf.nn.moments``, which Keras's LayerNormalization, GroupNormalization and
``keras.ops.moments`` call, computes the variance around
``stop_gradient(mean)``. The gradient stays exact (the dropped term is zero
at first order), but every second derivative through it loses a term: a
LayerNormalization MLP's Hessian was 35 % off a finite difference of its
gradient. Inside graphs that hessop traces, and only there, the moments are
computed without the ``stop_gradient``: the same values, exact derivatives of
every order.

The switch is per graph, not per thread or process: `tf.nn.moments` is
replaced (and put back at every trace, should something have restored
TensorFlow's) by a function that checks whether the graph being built (or a
graph it is nested in) is one of hessop's, and otherwise calls TensorFlow's
own function unchanged. Graphs, unlike thread-local flags, also reach the
replica threads of a ``MirroredStrategy``, which trace into the caller's
graph. A user's own model, training step or ``tf.function`` sees TensorFlow's
function; a ``stop_gradient`` the user wrote stays one (`stopped_gradients`
names those on the loss's path).
"""

from __future__ import annotations

import functools
import inspect
import threading
import weakref
from collections.abc import Callable
from typing import Any

import tensorflow as tf

__all__ = ["exact_moments"]

_hessop_graphs: weakref.WeakSet[Any] = weakref.WeakSet()
_install_lock = threading.Lock()
_tensorflow_moments: Callable[..., Any] | None = None
_switch: Callable[..., Any] | None = None


def _in_hessop_graph() -> bool:
    if tf.executing_eagerly():
        return False
    graph = tf.compat.v1.get_default_graph()
    while graph is not None:
        if graph in _hessop_graphs:
            return True
        graph = getattr(graph, "outer_graph", None)
    return False


def _moments(x: Any, axes: Any, shift: Any = None, keepdims: bool = False, name: str | None = None) -> tuple[Any, Any]:
    """`tf.nn.moments`: TensorFlow's own, or without its stop_gradient inside hessop's graphs."""
    if not _in_hessop_graph():
        return _tensorflow_moments(x, axes, shift=shift, keepdims=keepdims, name=name)
    with tf.name_scope(name or "moments"):
        x = tf.convert_to_tensor(x)
        # As TensorFlow's: half precision accumulates in float32.
        y = tf.cast(x, tf.float32) if x.dtype == tf.float16 else x
        mean = tf.reduce_mean(y, axes, keepdims=True, name="mean")
        variance = tf.reduce_mean(tf.math.squared_difference(y, mean), axes, keepdims=True, name="variance")
        if not keepdims:
            mean = tf.squeeze(mean, axes)
            variance = tf.squeeze(variance, axes)
        if x.dtype == tf.float16:
            return tf.cast(mean, tf.float16), tf.cast(variance, tf.float16)
        return mean, variance


def _install() -> None:
    """Put the switch in ``tf.nn.moments``, and back again if something has since restored TensorFlow's.

    Called at every trace, not once: in a process that runs many scripts
    (mkdocs-gallery building the tutorials) TensorFlow's function was back in
    ``tf.nn.moments`` by the time a later script traced, and its Hessians
    silently lost the moments' second-order term.
    """
    global _tensorflow_moments, _switch
    with _install_lock:
        if _switch is not None and tf.nn.moments is _switch:
            return
        if _tensorflow_moments is None:
            _tensorflow_moments = tf.nn.moments
            _switch = functools.wraps(_tensorflow_moments)(_moments)
        tf.nn.moments = _switch


def exact_moments(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` that, each time it is traced, marks the graph it builds as hessop's (exact moments)."""
    _install()

    def traced(*args: Any, **kwargs: Any) -> Any:
        if not tf.executing_eagerly():
            _install()
            _hessop_graphs.add(tf.compat.v1.get_default_graph())
        return fn(*args, **kwargs)

    # fn's name and signature for tf.function, but no ``__wrapped__``: autograph
    # would unwrap a bound method through it and call it with ``self`` twice.
    traced.__name__ = getattr(fn, "__name__", "traced")
    traced.__signature__ = inspect.signature(fn)  # type: ignore[attr-defined]
    return traced
