"""The TensorFlow engine shared by every hessop operator.

It owns the model call, the loss reduction, the flat parameter layout and the
compiled (``tf.function``) per-batch products: loss, gradient and
Hessian-vector products. Operators never touch autodiff themselves; they ask
the engine for per-batch *sums* over examples and do the weighting.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from hessop._params import resolve_params

try:
    import keras
except ImportError:  # pragma: no cover
    keras = None

__all__ = ["Engine", "HVP_MODES"]

HVP_MODES = ("auto", "forward", "reverse")
_ZERO = tf.UnconnectedGradients.ZERO


def _model_caller(model: Any) -> Callable[[Any], Any]:
    if keras is not None and isinstance(model, keras.layers.Layer):
        # Inference mode: dropout off, batch-norm uses its moving statistics.
        return lambda x: model(x, training=False)
    if not callable(model):
        msg = f"model: expected a Keras model or a callable x -> predictions, got {type(model).__name__}."
        raise TypeError(msg)
    return model


def _dense(gradients: Sequence[Any]) -> list[tf.Tensor]:
    """Embedding gradients arrive as IndexedSlices; products need dense tensors."""
    return [tf.convert_to_tensor(g) for g in gradients]


def _batch_size_of(x: Any) -> tf.Tensor:
    return tf.shape(tf.nest.flatten(x)[0])[0]


class Engine:
    """Compiled autodiff for one model, loss and parameter list.

    Parameters
    ----------
    model : keras.Model or callable
        ``model(x) -> predictions``. Keras layers are called with ``training=False``.
    loss_fn : callable or None
        ``loss_fn(y_true, y_pred)`` returning per-example losses (shape ``[B]`` or
        ``[B, 1]``) or their batch mean (a scalar). None for operators that only
        need model outputs.
    params : list of variables or None
        Default ``model.trainable_variables``.
    hvp_mode : {"auto", "forward", "reverse"}
        Forward-over-reverse or reverse-over-reverse Hessian-vector products;
        "auto" times both on the first batch and keeps the faster.
    """

    def __init__(
        self,
        model: Any,
        loss_fn: Callable[[Any, Any], Any] | None,
        params: Sequence[Any] | None = None,
        *,
        hvp_mode: str = "auto",
    ) -> None:
        if hvp_mode not in HVP_MODES:
            msg = f"hvp_mode: expected one of {HVP_MODES}, got {hvp_mode!r}."
            raise ValueError(msg)
        if loss_fn is not None and not callable(loss_fn):
            msg = f"loss_fn: expected a callable loss_fn(y_true, y_pred), got {type(loss_fn).__name__}."
            raise TypeError(msg)
        self.model = model
        self.loss_fn = loss_fn
        self._call_model = _model_caller(model)
        self.variables = resolve_params(model, params)
        self.shapes = [tuple(int(d) for d in v.shape) for v in self.variables]
        self.sizes = [int(np.prod(s, dtype=np.int64)) for s in self.shapes]
        self.num_params = int(sum(self.sizes))
        self.dtype = self.variables[0].dtype
        self.hvp_mode = hvp_mode
        self._chosen_mode: dict[str, str] = {}
        self.timings: dict[str, dict[str, float]] = {}
        self._warned_dtype = False
        compile_ = lambda f: tf.function(f, reduce_retracing=True)  # noqa: E731
        self.loss_sum = compile_(self._loss_sum)
        self.per_example_loss = compile_(self._per_example_loss)
        self.loss_and_gradient = compile_(self._loss_and_gradient)
        self._hvp = {
            ("forward", "single"): compile_(self._hvp_forward),
            ("reverse", "single"): compile_(self._hvp_reverse),
            ("forward", "block"): compile_(self._hvp_block_forward),
            ("reverse", "block"): compile_(self._hvp_block_reverse),
        }

    # -- flat layout (traced) -------------------------------------------------
    def split(self, vector: tf.Tensor) -> list[tf.Tensor]:
        """Flat (P,) tensor -> list of tensors shaped like the variables."""
        parts = tf.split(vector, self.sizes, axis=-1)
        return [tf.reshape(p, s) for p, s in zip(parts, self.shapes)]

    def split_block(self, block: tf.Tensor) -> list[tf.Tensor]:
        """(k, P) tensor -> list of (k, *shape) tensors."""
        parts = tf.split(block, self.sizes, axis=-1)
        return [tf.reshape(p, (-1, *s)) for p, s in zip(parts, self.shapes)]

    @staticmethod
    def concat(tensors: Sequence[tf.Tensor]) -> tf.Tensor:
        return tf.concat([tf.reshape(t, [-1]) for t in tensors], axis=0)

    @staticmethod
    def concat_block(tensors: Sequence[tf.Tensor]) -> tf.Tensor:
        k = tf.shape(tensors[0])[0]
        return tf.concat([tf.reshape(t, (k, -1)) for t in tensors], axis=1)

    # -- loss (traced) ----------------------------------------------------------
    def _per_example_loss(self, x: Any, y: Any) -> tf.Tensor:
        """Per-example losses, shape [B]; a scalar (batch mean) loss is returned as [1]*B times it."""
        if self.loss_fn is None:
            msg = "loss_fn: this operation needs a loss function, got None."
            raise ValueError(msg)
        loss = self.loss_fn(y, self._call_model(x))
        loss = tf.convert_to_tensor(loss)
        if not loss.dtype.is_floating:
            msg = f"loss_fn: expected a floating-point loss, got dtype {loss.dtype.name}."
            raise TypeError(msg)
        if loss.dtype != self.dtype and not self._warned_dtype:
            self._warned_dtype = True
            warnings.warn(
                f"loss_fn returned {loss.dtype.name} while the parameters are {self.dtype.name}; "
                "curvature is computed at the loss's precision. For Keras losses pass "
                f"dtype='{self.dtype.name}'.",
                stacklevel=2,
            )
        batch = _batch_size_of(x)
        rank = loss.shape.rank
        if rank == 0:
            # A scalar is read as the batch mean (as Keras loss objects return).
            return tf.fill([batch], tf.cast(loss, self.dtype))
        if rank == 2 and loss.shape[1] == 1:
            loss = loss[:, 0]
        elif rank != 1:
            msg = (
                "loss_fn: expected per-example losses of shape [B] or [B, 1], or a scalar "
                f"batch mean; got shape {loss.shape}. Use reduction=None or reduce over "
                "non-batch axes inside loss_fn."
            )
            raise ValueError(msg)
        static_b = tf.get_static_value(batch)
        if loss.shape[0] is not None and static_b is not None and int(loss.shape[0]) != int(static_b):
            msg = f"loss_fn: returned {loss.shape[0]} per-example losses for a batch of {static_b}."
            raise ValueError(msg)
        return tf.cast(loss, self.dtype)

    def _loss_sum(self, x: Any, y: Any) -> tf.Tensor:
        return tf.reduce_sum(self._per_example_loss(x, y))

    def _loss_and_gradient(self, x: Any, y: Any) -> tuple[tf.Tensor, tf.Tensor]:
        with tf.GradientTape() as tape:
            loss = self._loss_sum(x, y)
        grads = _dense(tape.gradient(loss, self.variables, unconnected_gradients=_ZERO))
        return loss, self.concat(grads)

    # -- Hessian-vector products (traced) ---------------------------------------
    def _hvp_forward_parts(self, x: Any, y: Any, tangents: list[tf.Tensor]) -> list[tf.Tensor]:
        with tf.autodiff.ForwardAccumulator(self.variables, tangents) as acc:
            with tf.GradientTape() as tape:
                loss = self._loss_sum(x, y)
            grads = _dense(tape.gradient(loss, self.variables, unconnected_gradients=_ZERO))
        return acc.jvp(grads, unconnected_gradients=_ZERO)

    def _hvp_reverse_parts(self, x: Any, y: Any, tangents: list[tf.Tensor]) -> list[tf.Tensor]:
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                loss = self._loss_sum(x, y)
            grads = _dense(inner.gradient(loss, self.variables, unconnected_gradients=_ZERO))
            dot = tf.add_n([tf.reduce_sum(g * tf.stop_gradient(t)) for g, t in zip(grads, tangents)])
        return _dense(outer.gradient(dot, self.variables, unconnected_gradients=_ZERO))

    def _hvp_forward(self, x: Any, y: Any, v: tf.Tensor) -> tf.Tensor:
        return self.concat(self._hvp_forward_parts(x, y, self.split(v)))

    def _hvp_reverse(self, x: Any, y: Any, v: tf.Tensor) -> tf.Tensor:
        return self.concat(self._hvp_reverse_parts(x, y, self.split(v)))

    def _hvp_block_forward(self, x: Any, y: Any, block: tf.Tensor) -> tf.Tensor:
        out = tf.vectorized_map(lambda t: self._hvp_forward_parts(x, y, t), self.split_block(block))
        return self.concat_block(out)

    def _hvp_block_reverse(self, x: Any, y: Any, block: tf.Tensor) -> tf.Tensor:
        out = tf.vectorized_map(lambda t: self._hvp_reverse_parts(x, y, t), self.split_block(block))
        return self.concat_block(out)

    def hvp_function(self, kind: str, x: Any, y: Any, probe: tf.Tensor) -> Callable[..., tf.Tensor]:
        """The compiled per-batch HVP for ``kind`` in {"single", "block"}.

        With ``hvp_mode="auto"`` the first call times both modes on the given
        batch (after tracing) and keeps the faster one for this kind.
        """
        mode = self.hvp_mode if self.hvp_mode != "auto" else self._chosen_mode.get(kind)
        if mode is None:
            mode = self._choose_mode(kind, x, y, probe)
        return self._hvp[(mode, kind)]

    def _choose_mode(self, kind: str, x: Any, y: Any, probe: tf.Tensor) -> str:
        times: dict[str, float] = {}
        for mode in ("reverse", "forward"):
            fn = self._hvp[(mode, kind)]
            try:
                fn(x, y, probe).numpy()  # trace and warm up
            except (NotImplementedError, LookupError, TypeError, ValueError) as err:
                if mode == "reverse":
                    raise
                # Some ops have no forward-mode rule; reverse-over-reverse always works.
                warnings.warn(f"forward-over-reverse HVP unavailable ({err}); using reverse-over-reverse.", stacklevel=3)
                continue
            samples = []
            for _ in range(3):
                start = time.perf_counter()
                fn(x, y, probe).numpy()
                samples.append(time.perf_counter() - start)
            times[mode] = min(samples)
        best = min(times, key=times.get)
        self._chosen_mode[kind] = best
        self.timings[kind] = times
        return best
