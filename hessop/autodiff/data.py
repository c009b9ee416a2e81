"""Data: one re-iterable view of arrays, tf.data.Datasets and iterables of batches."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from hessop.autodiff.losses import WeightedTargets

__all__ = ["Batches"]


def _leaves(structure: Any) -> list[Any]:
    return tf.nest.flatten(structure)


def _leading_dim(value: Any) -> int | None:
    shape = getattr(value, "shape", None)
    if shape is None:
        shape = np.shape(value)
    if len(shape) == 0:
        return None
    dim = shape[0]
    return None if dim is None else int(dim)


def _batch_size(x: Any, y: Any, where: str) -> int:
    """Common leading dimension of every leaf of x and y, or a clear error."""
    sizes_x = [_leading_dim(leaf) for leaf in _leaves(x)]
    if not sizes_x:
        msg = f"{where}: x is empty (no arrays)."
        raise ValueError(msg)
    if any(s is None for s in sizes_x):
        msg = f"{where}: every input array needs a leading example dimension; got a scalar in x."
        if isinstance(x, (list, tuple)):
            msg += f" (A {type(x).__name__} for x holds one array per model input; for one input pass np.asarray(x).)"
        raise ValueError(msg)
    if len(set(sizes_x)) > 1:
        msg = f"{where}: the arrays in x have different numbers of examples: {sizes_x}."
        raise ValueError(msg)
    size = sizes_x[0]
    if y is not None:
        sizes_y = [_leading_dim(leaf) for leaf in _leaves(y)]
        if any(s is None for s in sizes_y):
            msg = f"{where}: every target array needs a leading example dimension; got a scalar in y."
            raise ValueError(msg)
        if any(s != size for s in sizes_y):
            y_examples = f"{sizes_y[0]}" if len(sizes_y) == 1 else f"{sizes_y} (one count per array)"
            msg = f"{where}: x and y have different lengths: x has {size} examples, y has {y_examples}."
            raise ValueError(msg)
    return size


def _to_tensors(structure: Any) -> Any:
    return tf.nest.map_structure(tf.convert_to_tensor, structure)


def _shape(value: Any) -> tuple[int | None, ...]:
    # Tensors inside a graph (a fused pass over a Dataset) have no numpy shape.
    return tuple(value.shape) if hasattr(value, "shape") else np.shape(value)


def _weighted(y: Any, sample_weight: Any, where: str) -> WeightedTargets:
    """Targets with Keras-style sample weights, one per example."""
    if y is None:
        msg = f"{where}: sample weights weight the loss, which needs targets; got y=None."
        raise ValueError(msg)
    leaves = _leaves(sample_weight)
    shape = _shape(leaves[0]) if len(leaves) == 1 else ()
    if len(shape) not in (1, 2) or shape[1:] not in ((), (1,)):
        shapes = [_shape(leaf) for leaf in leaves]
        msg = f"{where}: sample_weight must be one array of shape (N,) or (N, 1), one weight per example; got {shapes}."
        raise ValueError(msg)
    return WeightedTargets(y, leaves[0])


def split_pair(element: Any, where: str) -> tuple[Any, Any]:
    if isinstance(element, Mapping):
        msg = (
            f"{where}: each batch must be a pair (x, y), got a dict with keys {sorted(map(str, element))}; "
            "map it to pairs first, e.g. dataset.map(lambda d: (d['features'], d['label']))."
        )
        raise TypeError(msg)
    if not isinstance(element, (tuple, list)):
        msg = f"{where}: each batch must be a pair (x, y), got {type(element).__name__}."
        raise TypeError(msg)
    if len(element) == 3:  # Keras's (x, y, sample_weight)
        return element[0], _weighted(element[1], element[2], where)
    if len(element) != 2:
        msg = (
            f"{where}: each batch must be a pair (x, y) or a triple (x, y, sample_weight), "
            f"got a {type(element).__name__} of {len(element)}."
        )
        raise TypeError(msg)
    return element[0], element[1]


def slice_examples(x: Any, y: Any, first: int, stop: int) -> tuple[Any, Any]:
    """Examples first..stop-1 of a batch of tensors (x and y may be structures; y may be None)."""
    return tf.nest.map_structure(lambda t: None if t is None else t[first:stop], (x, y))


def examples_in(x: Any) -> int:
    """The number of examples in a batch's x (tensors)."""
    return int(tf.shape(tf.nest.flatten(x)[0])[0])


class Batches:
    """A re-iterable sequence of ``(x, y)`` mini-batches with a known total count.

    Accepts ``(x, y)`` with array-likes (x may be a tuple/list or dict of arrays
    for multi-input models; y may be None where no targets are needed), a
    `tf.data.Dataset` of ``(x, y)`` batches, or any re-iterable of ``(x, y)``
    batches (e.g. a list). Each iteration yields tensor structures.
    """

    def __init__(self, data: Any, batch_size: int | None = None) -> None:
        if batch_size is not None:
            if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
                msg = f"batch_size: expected a positive int or None, got {batch_size!r}."
                raise TypeError(msg)
            if batch_size <= 0:
                msg = f"batch_size: expected a positive int, got {batch_size}."
                raise ValueError(msg)
        self.is_static = False
        # In-memory arrays (x, y) with their batch size, or a Dataset: the data
        # that fused passes (hessop.autodiff.passes) read inside one compiled function.
        self.arrays: tuple[Any, Any] | None = None
        self.batch_size: int | None = None
        self.dataset: tf.data.Dataset | None = None
        # A 2-tuple is always (x, y) arrays; batches come as a list, a Dataset or
        # another re-iterable, so ((x1, y1), (x2, y2)) must be a list to mean batches.
        if isinstance(data, tuple) and len(data) == 2:
            self._init_arrays(data[0], data[1], batch_size)
        elif isinstance(data, tuple) and len(data) == 3 and (isinstance(data[2], np.ndarray) or tf.is_tensor(data[2])):
            # (x, y, sample_weight) arrays, as keras.Model.fit takes them
            self._init_arrays(data[0], _weighted(data[1], data[2], "data"), batch_size)
        elif isinstance(data, tf.data.Dataset):
            if batch_size is not None:
                msg = "batch_size: a tf.data.Dataset is already batched; batch it with Dataset.batch instead."
                raise ValueError(msg)
            _check_dataset(data)
            self._source = data
            self.dataset = data
            self._count()
        elif isinstance(data, tuple) and data and all(isinstance(item, np.ndarray) or tf.is_tensor(item) for item in data):
            # Not batches: a tuple of arrays other than (x, y) or (x, y, sample_weight).
            msg = (
                f"data: expected (x, y) or (x, y, sample_weight) arrays, got a tuple of "
                f"{len(data)} array{'s' * (len(data) != 1)}."
            )
            if len(data) == 1:
                msg += " Where no targets are needed (model outputs), pass (x, None)."
            raise TypeError(msg)
        elif isinstance(data, Iterable) and not isinstance(data, (str, bytes, Mapping, np.ndarray)):
            if iter(data) is data:
                msg = (
                    "data: a one-shot iterator or generator cannot be read twice, but every "
                    "matvec is a full pass over the data; pass a list of batches, a "
                    "tf.data.Dataset, or (x, y) arrays."
                )
                raise TypeError(msg)
            if batch_size is not None:
                msg = "batch_size: data given as batches is already batched; leave batch_size=None."
                raise ValueError(msg)
            self._source = data
            self._count()
        else:
            msg = (
                "data: expected (x, y) arrays, a tf.data.Dataset of (x, y) batches, or a "
                f"re-iterable of (x, y) batches, got {type(data).__name__}."
            )
            raise TypeError(msg)

    # -- construction -------------------------------------------------------
    def _init_arrays(self, x: Any, y: Any, batch_size: int | None) -> None:
        x = tf.nest.map_structure(_as_array, x)
        y = None if y is None else tf.nest.map_structure(_as_array, y)
        num_data = _batch_size(x, y, "data")
        if num_data == 0:
            msg = "data: empty data (0 examples)."
            raise ValueError(msg)
        batch_size = num_data if batch_size is None else min(int(batch_size), num_data)
        self.arrays = (_to_tensors(x), None if y is None else _to_tensors(y))
        self.batch_size = batch_size
        # Slices along the first axis share the arrays' memory.
        self._batches = [slice_examples(*self.arrays, start, start + batch_size) for start in range(0, num_data, batch_size)]
        self.batch_sizes = [min(batch_size, num_data - s) for s in range(0, num_data, batch_size)]
        self.num_data = num_data
        self.is_static = True  # arrays cannot change between passes

    def _count(self) -> None:
        sizes = []
        for i, element in enumerate(self._source):
            x, y = split_pair(element, f"data (batch {i})")
            sizes.append(_batch_size(x, y, f"data (batch {i})"))
        if not sizes or sum(sizes) == 0:
            msg = "data: empty data (no batches or 0 examples)."
            raise ValueError(msg)
        self.batch_sizes = sizes
        self.num_data = int(sum(sizes))

    # -- iteration ----------------------------------------------------------
    @property
    def fusable(self) -> bool:
        """Whether a whole pass can run inside one compiled function (arrays and Datasets)."""
        return self.is_static or self.dataset is not None

    @property
    def num_batches(self) -> int:
        return len(self.batch_sizes)

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        if self.is_static:
            yield from self._batches
            return
        for i, element in enumerate(self._source):
            x, y = split_pair(element, f"data (batch {i})")
            yield _to_tensors(x), (None if y is None else _to_tensors(y))

    def fingerprint(self) -> list[tuple[int, float]]:
        """(size, checksum) per batch; two passes over deterministic data agree."""
        prints = []
        for x, y in self:
            leaves = _leaves(x) + ([] if y is None else _leaves(y))
            checksum = 0.0
            for k, leaf in enumerate(leaves):
                values = np.asarray(leaf).astype(np.float64, copy=False).reshape(-1)
                # A position-weighted sum also catches reordering inside a batch.
                checksum += float(values @ np.cos(np.arange(values.size) + k))
            prints.append((_leading_dim(leaves[0]) or 0, checksum))
        return prints


def _check_dataset(dataset: tf.data.Dataset) -> None:
    """A finite Dataset of batches: every product reads it to the end."""
    if dataset.cardinality() == tf.data.INFINITE_CARDINALITY:
        msg = (
            "data: the tf.data.Dataset is infinite (Dataset.repeat() without a count?), but every "
            "product is one full pass over the data; pass the finite dataset."
        )
        raise ValueError(msg)
    if dataset.cardinality() == tf.data.UNKNOWN_CARDINALITY:
        # A generator or filter TensorFlow cannot count may never end, and the
        # first pass would hang: the user states the count instead.
        msg = (
            "data: the tf.data.Dataset's number of batches is unknown (Dataset.from_generator, filter, ...), "
            "and every product reads it to the end, so a dataset that never ends would hang. State the "
            "count: dataset.apply(tf.data.experimental.assert_cardinality(num_batches))."
        )
        raise ValueError(msg)
    if any(spec.shape.rank == 0 for spec in _leaves(dataset.element_spec) if hasattr(spec, "shape")):
        msg = (
            "data: the tf.data.Dataset yields single examples (a scalar in its element_spec "
            f"{dataset.element_spec}); batch it: dataset.batch(batch_size)."
        )
        raise ValueError(msg)
    # Batches share their leading (example) axis, unknown after batch() or
    # equal with drop_remainder=True; known and different, it is not one.
    leading = [spec.shape[0] for spec in _leaves(dataset.element_spec) if hasattr(spec, "shape") and spec.shape.rank]
    if leading and None not in leading and len(set(leading)) > 1:
        msg = (
            f"data: the tf.data.Dataset's elements have leading axes of different lengths {leading} "
            f"(element_spec {dataset.element_spec}), so it yields single examples; batch it: dataset.batch(batch_size)."
        )
        raise ValueError(msg)


def _as_array(value: Any) -> Any:
    if isinstance(value, (tf.Tensor, np.ndarray)):
        return value
    return np.asarray(value)
