"""pfor rules without transposes or tiles, while hessop traces a block product.

``tf.vectorized_map`` (pfor) rewrites each op of the per-vector function into
an op over all k vectors at once. Its rule for ``MatMul`` turns a product with
one operand stacked over the k vectors into one wide matmul, which needs
the stacked operand moved to the middle axis and the result moved back:
two full copies of a (k, N, h) tensor whenever the stacked operand is ``b``,
or is ``a`` with ``transpose_a``. In a block HVP that is the second pass
through every dense layer, where the transposes cost a sizeable share of
the matmuls themselves (``bench_block.py``). A broadcasting batched matmul
(``BatchMatMulV2``) reads the stacked operand where it lies. And pfor's
rule for ``BatchMatMulV2`` runs row-times-column products (as in TF's
second derivative of softmax cross-entropy) as k·N tiny matmuls; they are
dot products, an elementwise product and a sum. Its rule for activation
gradients (``TanhGrad``, ``SigmoidGrad``, ``ReluGrad``) tiles the activation
k times because those ops do not broadcast; the same product written as a
broadcasting multiply reads it once.

:func:`pfor_rules` installs these rules for the duration of a ``with``
block and restores TensorFlow's afterwards. It relies on pfor's private
converter registry, so the engine uses it only when asked: with the
environment variable ``HESSOP_PFOR_RULES=1``
(:func:`hessop.autodiff.vectorize.engine_rules`, which imports this module
only then), and
then only inside the Python body of its block functions, which runs while
``tf.function`` traces them, so graphs built outside hessop are untouched
(another thread tracing a ``vectorized_map`` at that moment would get the
same values through the other rule). If the registry changes shape, the
context does nothing, and a rule that meets an input it does not understand
hands the op to TensorFlow's rule. ``benchmarks/bench_block.py`` measures
what the rules save.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import tensorflow as tf

__all__ = ["pfor_rules"]

try:
    from tensorflow.python.ops.parallel_for import pfor as _pfor

    _REGISTRY: dict[str, Callable[..., Any]] | None = _pfor._pfor_converter_registry
    _TF_MATMUL = _REGISTRY["MatMul"]
    _TF_BATCH_MATMUL = _REGISTRY["BatchMatMulV2"]
    _wrap = _pfor.wrap
except (ImportError, AttributeError, KeyError, TypeError):  # pragma: no cover - other TF versions
    _REGISTRY = None

_lock = threading.Lock()
_depth = 0


def _falling_back_to(tf_rule: Callable[[Any], Any]) -> Callable[[Callable[[Any], Any]], Callable[[Any], Any]]:
    """A rule that hands the op to TensorFlow's ``tf_rule`` if pfor's private API has moved."""

    def decorate(rule: Callable[[Any], Any]) -> Callable[[Any], Any]:
        @functools.wraps(rule)
        def convert(pfor_input: Any) -> Any:
            try:
                return rule(pfor_input)
            except (AttributeError, TypeError, ValueError):  # pragma: no cover - other TF versions
                return tf_rule(pfor_input)

        return convert

    return decorate


def _matmul_rule(pfor_input: Any) -> Any:
    """``MatMul``: TF's rule for a stacked untransposed ``a``, a broadcasting batched matmul otherwise."""
    a, a_stacked, _ = pfor_input.input(0)
    b, b_stacked, _ = pfor_input.input(1)
    transpose_a = pfor_input.get_attr("transpose_a")
    transpose_b = pfor_input.get_attr("transpose_b")
    if a_stacked and not b_stacked and not transpose_a:
        # (k, N, h) -> (k·N, h) is a reshape, and the product one wide
        # matmul: TF's rule moves nothing here.
        return _TF_MATMUL(pfor_input)
    # The stacked operand keeps its leading k axis; the other broadcasts.
    product = tf.linalg.matmul(a, b, transpose_a=transpose_a, transpose_b=transpose_b)
    return _wrap(product, True)


def _batch_matmul_rule(pfor_input: Any) -> Any:
    """``BatchMatMulV2``: (1×C)·(C×1) products as an elementwise dot product, TF's rule otherwise."""
    x_shape, y_shape = pfor_input.input(0)[0].shape, pfor_input.input(1)[0].shape
    adj_x = pfor_input.get_attr("adj_x")
    adj_y = pfor_input.get_attr("adj_y")
    if x_shape.rank is None or y_shape.rank is None:
        return _TF_BATCH_MATMUL(pfor_input)
    x_rows = x_shape[-1] if adj_x else x_shape[-2]
    y_cols = y_shape[-2] if adj_y else y_shape[-1]
    if x_rows != 1 or y_cols != 1:
        return _TF_BATCH_MATMUL(pfor_input)
    # Row times column, e.g. in the second derivative of softmax
    # cross-entropy (TF's gradient of its own gradient): a batched matmul of
    # k·N tiny products is slow; a product and a sum are two elementwise passes.
    pfor_input.expanddim_inputs_for_broadcast()
    x_vector = tf.squeeze(pfor_input.input(0)[0], -1 if adj_x else -2)
    y_vector = tf.squeeze(pfor_input.input(1)[0], -2 if adj_y else -1)
    if adj_x:
        x_vector = tf.math.conj(x_vector)
    if adj_y:
        y_vector = tf.math.conj(y_vector)
    dot = tf.reduce_sum(x_vector * y_vector, axis=-1)
    return _wrap(dot[..., tf.newaxis, tf.newaxis], True)


# Activation gradients with the incoming gradient stacked and the
# activation's own tensor not: the derivative factor, computed once, broadcast
# over the k vectors. Each formula is the op's own kernel (all three
# multiply; ReluGrad by its 0/1 mask, so a NaN gradient stays NaN where the
# unit is off, as in TF), so values and NaN propagation match.
_ACTIVATION_GRADIENTS: dict[str, tuple[int, Callable[[tf.Tensor, tf.Tensor], tf.Tensor]]] = {
    # op type: (index of the incoming gradient, gradient × derivative)
    "TanhGrad": (1, lambda y, dy: dy * (1 - y * y)),
    "SigmoidGrad": (1, lambda y, dy: dy * (y * (1 - y))),
    "ReluGrad": (0, lambda features, gradients: gradients * tf.cast(features > 0, gradients.dtype)),
}


def _activation_gradient_rule(op_type: str) -> Callable[[Any], Any]:
    """``TanhGrad``-like ops: broadcast the activation over the stacked gradient instead of tiling it k times."""
    gradient_index, formula = _ACTIVATION_GRADIENTS[op_type]
    tf_rule = _REGISTRY[op_type]  # type: ignore[index]

    def convert(pfor_input: Any) -> Any:
        gradient, gradient_stacked, _ = pfor_input.input(gradient_index)
        other, other_stacked, _ = pfor_input.input(1 - gradient_index)
        if not gradient_stacked or other_stacked:
            return tf_rule(pfor_input)
        # pfor's rule tiles the activation (N×h) to k×N×h because the ops do
        # not broadcast: a full copy per vector before the op reads it again.
        return _wrap(formula(other, gradient), True)

    return _falling_back_to(tf_rule)(convert)


if _REGISTRY is not None:
    _RULES = {
        "MatMul": _falling_back_to(_TF_MATMUL)(_matmul_rule),
        "BatchMatMulV2": _falling_back_to(_TF_BATCH_MATMUL)(_batch_matmul_rule),
        **{op_type: _activation_gradient_rule(op_type) for op_type in _ACTIVATION_GRADIENTS if op_type in _REGISTRY},
    }
    _TF_RULES = {op_type: _REGISTRY[op_type] for op_type in _RULES}


@contextlib.contextmanager
def pfor_rules() -> Iterator[None]:
    """Within this block, pfor vectorises matmuls and activation gradients with this module's rules.

    Re-entrant and thread-safe: TensorFlow's rules come back when the last
    holder leaves.

    Examples
    --------
    >>> import tensorflow as tf
    >>> from hessop.autodiff.pfor import pfor_rules
    >>> x = tf.ones((3, 2))
    >>> with pfor_rules():
    ...     rows = tf.vectorized_map(lambda w: tf.matmul(x, w), tf.ones((4, 2, 5)))
    >>> rows.shape
    TensorShape([4, 3, 5])
    """
    global _depth
    if _REGISTRY is None:  # pragma: no cover - other TF versions
        yield
        return
    with _lock:
        _depth += 1
        _REGISTRY.update(_RULES)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _REGISTRY.update(_TF_RULES)
