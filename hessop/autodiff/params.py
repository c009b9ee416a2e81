"""Parameters: resolving variables and the flat parameter vector.

The flat parameter vector is the concatenation of the variables in list order,
each flattened row-major (C order). Every operator in hessop uses this order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

try:  # Keras 3 ships with TensorFlow >= 2.16; plain-TF users may not need it.
    import keras
except ImportError:  # pragma: no cover - keras is a TensorFlow dependency
    keras = None

__all__ = ["flatten", "unflatten", "resolve_params", "num_params"]


def _is_keras_variable(variable: Any) -> bool:
    return keras is not None and isinstance(variable, keras.Variable)


def resolve_params(model: Any, params: Sequence[Any] | None) -> list[tf.Variable]:
    """Return the list of `tf.Variable` objects to differentiate with respect to.

    Keras 3 variables are unwrapped to the `tf.Variable` they hold, because
    `tf.autodiff.ForwardAccumulator` rejects Keras variables (their dtype is a
    string) while it accepts the underlying variable, and the model's reads of
    the Keras variable are reads of that same `tf.Variable`.
    """
    given = params is not None
    if params is None:
        params = getattr(model, "trainable_variables", None)
        if params is None:
            msg = (
                "params: the model has no `trainable_variables` attribute; pass "
                "params=[...] with the tf.Variables the model uses."
            )
            raise TypeError(msg)
    if isinstance(params, (tf.Variable,)) or _is_keras_variable(params):
        msg = "params: expected a list of variables, got a single variable; wrap it in a list."
        raise TypeError(msg)
    try:
        params = list(params)
    except TypeError:
        msg = f"params: expected a list of tf.Variable, got {type(params).__name__}."
        raise TypeError(msg) from None
    if not params:
        if given:
            msg = "params: expected at least one variable, got none."
        elif list(getattr(model, "variables", None) or []):
            msg = (
                "params: the model has no trainable variables (P = 0): all its variables are frozen "
                "(trainable=False); unfreeze the layers to study, or pass params=[...] explicitly."
            )
        else:
            msg = (
                "params: the model has no trainable variables (P = 0); build the model (give it a "
                "keras.Input, or call it once on data) or pass params=[...] explicitly."
            )
        raise ValueError(msg)
    resolved = []
    for i, variable in enumerate(params):
        if _is_keras_variable(variable):
            variable = variable.value
        if not isinstance(variable, tf.Variable):
            msg = f"params[{i}]: expected a tf.Variable or keras.Variable, got {type(variable).__name__}."
            raise TypeError(msg)
        if not variable.dtype.is_floating:
            msg = f"params[{i}] ({variable.name}): expected a floating dtype, got {variable.dtype.name}."
            raise TypeError(msg)
        resolved.append(variable)
    dtypes = {v.dtype for v in resolved}
    if len(dtypes) > 1:
        names = sorted(d.name for d in dtypes)
        msg = f"params: all variables must share one dtype, got {names}."
        raise TypeError(msg)
    seen = set()
    for i, variable in enumerate(resolved):
        key = id(variable)
        if key in seen:
            msg = f"params[{i}] ({variable.name}) appears more than once."
            raise ValueError(msg)
        seen.add(key)
    return resolved


def num_params(params: Sequence[Any]) -> int:
    """Total number of scalar parameters P in a list of variables or arrays."""
    return int(sum(int(np.prod(tuple(p.shape), dtype=np.int64)) for p in params))


def flatten(tensors: Sequence[Any]) -> np.ndarray:
    """Concatenate a list of tensors or arrays into one flat vector.

    Each tensor is flattened row-major (C order) and the results are joined in
    list order; this is hessop's flat parameter order.

    Parameters
    ----------
    tensors : sequence of array-like or tf.Variable
        For example ``model.trainable_variables`` or a list of gradients.

    Returns
    -------
    numpy.ndarray
        1-D array of length ``sum(t.size for t in tensors)``, in the common dtype.

    Raises
    ------
    TypeError
        If ``tensors`` is not a sequence.

    Examples
    --------
    >>> import numpy as np, hessop
    >>> hessop.flatten([np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([5.0])])
    array([1., 2., 3., 4., 5.])
    """
    if isinstance(tensors, (np.ndarray, tf.Tensor)) or not isinstance(tensors, Sequence):
        msg = f"tensors: expected a list of tensors, got {type(tensors).__name__}."
        raise TypeError(msg)
    if len(tensors) == 0:
        return np.zeros(0)
    arrays = [np.asarray(t.numpy() if hasattr(t, "numpy") else t) for t in tensors]
    return np.concatenate([a.reshape(-1) for a in arrays])


def unflatten(vector: Any, like: Sequence[Any]) -> list[np.ndarray]:
    """Split a flat vector into arrays shaped like ``like`` (the inverse of `flatten`).

    Parameters
    ----------
    vector : array-like, shape (P,)
        A flat vector in hessop's parameter order.
    like : sequence of tf.Variable or arrays
        Gives the shapes, e.g. ``model.trainable_variables``.

    Returns
    -------
    list of numpy.ndarray
        One array per entry of ``like``, with its shape.

    Raises
    ------
    ValueError
        If ``vector`` is not 1-D or its length is not the total size of ``like``.

    Examples
    --------
    >>> import numpy as np, hessop
    >>> parts = hessop.unflatten(np.arange(5.0), like=[np.zeros((2, 2)), np.zeros(1)])
    >>> [p.shape for p in parts]
    [(2, 2), (1,)]
    """
    vector = np.asarray(vector)
    shapes = [tuple(int(d) for d in p.shape) for p in like]
    total = int(sum(int(np.prod(s, dtype=np.int64)) for s in shapes))
    if vector.ndim != 1 or vector.shape[0] != total:
        msg = f"vector: expected shape ({total},) to match `like`, got {vector.shape}."
        raise ValueError(msg)
    parts, start = [], 0
    for shape in shapes:
        size = int(np.prod(shape, dtype=np.int64))
        parts.append(vector[start : start + size].reshape(shape))
        start += size
    return parts
