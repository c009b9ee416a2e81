"""The data-pass LinearOperator base shared by every curvature operator.

It walks the mini-batches once per product, weights their sums (1/N for a mean
loss), converts numpy <-> tensors once per call, validates vectors and refuses
non-finite results. Subclasses supply one per-batch function.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
from scipy.sparse.linalg import LinearOperator
from tqdm.auto import tqdm

from hessop._data import Batches
from hessop._engine import Engine

__all__ = ["DataPassOperator", "as_numpy_dtype", "check_finite_array"]

REDUCTIONS = ("mean", "sum")


def as_numpy_dtype(dtype: Any, default: Any) -> np.dtype:
    """Resolve a user dtype (None, str, numpy or tf dtype) to a floating numpy dtype."""
    if dtype is None:
        dtype = default
    if isinstance(dtype, tf.DType):
        dtype = dtype.as_numpy_dtype
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        msg = f"dtype: expected a floating dtype such as 'float32' or 'float64', got {dtype!r}."
        raise TypeError(msg) from None
    if resolved.kind != "f":
        msg = f"dtype: expected a floating dtype such as 'float32' or 'float64', got {resolved.name}."
        raise TypeError(msg)
    return resolved


def check_finite_array(array: np.ndarray, name: str) -> None:
    if not np.all(np.isfinite(array)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        msg = f"{name}: contains {bad} non-finite value(s) (NaN or inf)."
        raise ValueError(msg)


class DataPassOperator(LinearOperator):
    """A LinearOperator whose every product is one pass over mini-batches of data.

    Subclasses call ``super().__init__`` with the shape and implement
    ``_tf_matmat`` (tensor (n_in, k) -> tensor (n_out, k)), usually through
    ``self._accumulate``.
    """

    def __init__(
        self,
        model: Any,
        loss_fn: Callable[[Any, Any], Any] | None,
        data: Any,
        *,
        params: Sequence[Any] | None,
        batch_size: int | None,
        reduction: str,
        dtype: Any,
        progress: bool,
        check_deterministic: bool,
        hvp_mode: str = "auto",
        shape: tuple[int, int] | None = None,
    ) -> None:
        if reduction not in REDUCTIONS:
            msg = f"reduction: expected one of {REDUCTIONS}, got {reduction!r}."
            raise ValueError(msg)
        self._engine = Engine(model, loss_fn, params, hvp_mode=hvp_mode)
        self._batches = Batches(data, batch_size)
        self.num_data: int = self._batches.num_data
        self.num_params: int = self._engine.num_params
        self.reduction = reduction
        self.progress = bool(progress)
        self._first_batch: tuple[Any, Any] | None = None
        self._compute_dtype = self._engine.dtype
        dtype = as_numpy_dtype(dtype, self._compute_dtype.as_numpy_dtype)
        # Passing dtype explicitly keeps scipy from probing with a matvec (a data pass).
        super().__init__(dtype=dtype, shape=shape or (self.num_params, self.num_params))
        self.loss = self._validate_loss(check_deterministic)

    # -- public conveniences ----------------------------------------------------
    @property
    def params(self) -> list[tf.Variable]:
        """The variables, in flat-parameter order."""
        return list(self._engine.variables)

    @property
    def scale(self) -> float:
        """Weight of a per-example sum: 1/N for ``reduction="mean"``, 1 for ``"sum"``."""
        return 1.0 / self.num_data if self.reduction == "mean" else 1.0

    def __repr__(self) -> str:
        device = self._engine.variables[0].device or "default device"
        return (
            f"<{type(self).__name__} shape={self.shape} dtype={self.dtype} "
            f"num_data={self.num_data} batches={self._batches.num_batches} "
            f"reduction={self.reduction!r} device={device}>"
        )

    # -- data passes ------------------------------------------------------------
    def _probe_batch(self) -> tuple[Any, Any]:
        """The first batch, kept for timing HVP modes (one batch of memory)."""
        if self._first_batch is None:
            self._first_batch = next(iter(self._batches))
        return self._first_batch

    def _iter_batches(self, desc: str) -> Any:
        return tqdm(
            self._batches,
            total=self._batches.num_batches,
            desc=desc,
            disable=not self.progress,
            leave=False,
            unit="batch",
        )

    def _accumulate(self, batch_fn: Callable[..., tf.Tensor], *args: Any, desc: str = "") -> tf.Tensor:
        """Sum ``batch_fn(x, y, *args)`` over all batches, times `scale`."""
        total = None
        for x, y in self._iter_batches(desc or type(self).__name__):
            part = batch_fn(x, y, *args)
            total = part if total is None else total + part
        return total * tf.constant(self.scale, dtype=total.dtype)

    def _validate_loss(self, check_deterministic: bool) -> float | None:
        """One forward pass (two when checking determinism): catches bad losses early."""
        if self._engine.loss_fn is None:
            return None
        first = self._batch_losses()
        if check_deterministic:
            second = self._batch_losses()
            tol = float(np.sqrt(np.finfo(self._compute_dtype.as_numpy_dtype).eps))
            if len(first) != len(second) or not np.allclose(first, second, rtol=tol, atol=0.0):
                msg = (
                    "data: two passes over the data gave different per-batch losses, so the "
                    "data (shuffling, random augmentation) or the model (randomness at "
                    "inference) changes between passes and every product would see a "
                    "different function. Make the pipeline deterministic (no shuffle, fixed "
                    "seeds), or pass check_deterministic=False if you accept this."
                )
                raise ValueError(msg)
            if not self._batches.is_static and self._batches.fingerprint() != self._batches.fingerprint():
                msg = (
                    "data: two passes over the data yielded different batches (shuffling or "
                    "random augmentation); make it deterministic or pass check_deterministic=False."
                )
                raise ValueError(msg)
        return float(np.sum(first) * self.scale)

    def _batch_losses(self) -> np.ndarray:
        sums = []
        for i, (x, y) in enumerate(self._batches):
            value = float(self._engine.loss_sum(x, y))
            if not np.isfinite(value):
                msg = f"loss_fn: the loss is not finite ({value}) on batch {i}; check the data and the model."
                raise ValueError(msg)
            sums.append(value)
        return np.asarray(sums)

    # -- tensor interface -------------------------------------------------------
    def _tf_matmat(self, block: tf.Tensor) -> tf.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_tf_input(self, tensor: Any, ndim: int, name: str) -> tf.Tensor:
        tensor = tf.convert_to_tensor(tensor)
        if not tensor.dtype.is_floating:
            msg = f"{name}: expected a floating tensor, got dtype {tensor.dtype.name}."
            raise TypeError(msg)
        if tensor.shape.rank != ndim or tensor.shape[0] != self.shape[1]:
            expected = f"({self.shape[1]},)" if ndim == 1 else f"({self.shape[1]}, k)"
            msg = f"{name}: expected shape {expected}, got {tuple(tensor.shape)}."
            raise ValueError(msg)
        return tf.cast(tensor, self._compute_dtype)

    def tf_matmat(self, block: Any) -> tf.Tensor:
        """Product with a tensor block of shape (n, k), returned as a tensor on the device.

        No numpy round trip: for use inside TensorFlow code.
        """
        block = self._check_tf_input(block, 2, "block")
        out = self._tf_matmat(block)
        if not bool(tf.reduce_all(tf.math.is_finite(out))):
            msg = f"{type(self).__name__}: the product is not finite (NaN or inf); check the model, loss and vector."
            raise ValueError(msg)
        return out

    def tf_matvec(self, vector: Any) -> tf.Tensor:
        """Product with a tensor vector of shape (n,), returned as a tensor on the device."""
        vector = self._check_tf_input(vector, 1, "vector")
        return self.tf_matmat(vector[:, None])[:, 0]

    # -- scipy interface --------------------------------------------------------
    def _to_numpy_input(self, array: Any, name: str) -> np.ndarray:
        array = np.asarray(array)
        if np.iscomplexobj(array):
            msg = f"{name}: expected a real array, got dtype {array.dtype}."
            raise TypeError(msg)
        if array.dtype.kind not in "fiub":
            msg = f"{name}: expected a numeric array, got dtype {array.dtype}."
            raise TypeError(msg)
        check_finite_array(array, name)
        return array

    def matvec(self, x: Any) -> np.ndarray:
        x = self._to_numpy_input(x, "x")
        if x.shape not in ((self.shape[1],), (self.shape[1], 1)):
            msg = f"x: expected shape ({self.shape[1]},) or ({self.shape[1]}, 1), got {x.shape}."
            raise ValueError(msg)
        return super().matvec(x)

    def matmat(self, X: Any) -> np.ndarray:  # noqa: N803 - scipy's name
        X = self._to_numpy_input(X, "X")  # noqa: N806
        if X.ndim != 2 or X.shape[0] != self.shape[1]:
            msg = f"X: expected shape ({self.shape[1]}, k), got {X.shape}."
            raise ValueError(msg)
        return super().matmat(X)

    def _matmat(self, X: np.ndarray) -> np.ndarray:  # noqa: N803
        block = tf.convert_to_tensor(np.asarray(X, dtype=self._compute_dtype.as_numpy_dtype))
        return self.tf_matmat(block).numpy().astype(self.dtype, copy=False)

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        return self._matmat(np.reshape(x, (-1, 1))).reshape(-1)
