"""The data-pass LinearOperator base shared by every curvature operator.

It walks the mini-batches once per product, weights their sums (1/N for a mean
loss), converts numpy <-> tensors once per call, validates vectors and refuses
non-finite results. Subclasses supply one per-batch function.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypedDict, Unpack

import numpy as np
import tensorflow as tf
from scipy.sparse.linalg import LinearOperator
from threadpoolctl import ThreadpoolController
from tqdm.auto import tqdm

from hessop._validation import check_finite_array, non_finite_rows, warn
from hessop.autodiff.data import Batches, examples_in, slice_examples
from hessop.autodiff.distribute import Replicas, resolve_strategy
from hessop.autodiff.engine import TRACE_ERRORS, Engine, Product, check_parameter_paths, first_call_on_batch
from hessop.autodiff.losses import resolve_loss
from hessop.autodiff.passes import FusedPasses
from hessop.dense.columns import DEFAULT_MAX_DENSE, DenseHooks, MemoryProbe, dense_from_operator
from hessop.dense.kronecker import factors_function, find_dense_kernel, kernel_block
from hessop.operators.blocks import BlockPlan

__all__ = [
    "CurvatureOptions",
    "DataPassOperator",
    "PassOptions",
    "SymmetricDataPassOperator",
    "as_numpy_dtype",
    "with_options",
]

REDUCTIONS = ("mean", "sum")
# Seed of the two random tangents that check a closed-form kernel block.
_CHECK_SEED = 0
# `to_dense` of an operator this small builds its columns from single products.
_SINGLE_PRODUCT_COLUMNS = 8


class PassOptions(TypedDict, total=False):
    """The keyword options every data-pass operator takes; `HessianOperator` documents them."""

    params: Sequence[Any] | None
    batch_size: int | None
    dtype: Any
    progress: bool
    check_deterministic: bool
    strategy: Any
    jit_compile: bool


class CurvatureOptions(PassOptions, total=False):
    """`PassOptions` and the reduction of the square operators (H, the OPG, the GGN)."""

    reduction: str


def with_options(options: type) -> Callable[[type], type]:
    """Class decorator: the constructor's ``**options`` shown as the keywords of ``options`` with their defaults.

    The defaults live once, in `DataPassOperator.__init__`; this gives
    ``help()`` and ``inspect.signature`` the full signature, and names an
    unknown keyword in the error.
    """

    def decorate(cls: type) -> type:
        init = cls.__init__
        own = inspect.signature(init).parameters
        defaults = inspect.signature(DataPassOperator.__init__).parameters
        annotations = {name: getattr(a, "__forward_arg__", a) for name, a in options.__annotations__.items()}
        names = tuple(annotations)
        parameters = [p for p in own.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        parameters += [defaults[name].replace(annotation=annotations[name]) for name in names]
        signature = inspect.Signature(parameters, return_annotation=None)

        @functools.wraps(init)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            unknown = sorted(set(kwargs) - set(own) - set(names))
            if unknown:
                msg = f"{cls.__name__}() got unexpected keyword argument(s) {unknown}; expected some of {sorted(names)}."
                raise TypeError(msg)
            init(self, *args, **kwargs)

        __init__.__signature__ = signature  # type: ignore[attr-defined]
        cls.__init__ = __init__  # type: ignore[misc]
        return cls

    return decorate


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
    if resolved.itemsize < 4:
        msg = (
            f"dtype: {resolved.name} is too narrow for curvature (its largest value is "
            f"{float(np.finfo(resolved).max):.0f}, and products of a data pass overflow to inf); use 'float32' or 'float64'."
        )
        raise ValueError(msg)
    return resolved


def _kind_of(rows: tf.Tensor) -> str:
    """The product kind: "single" for one vector (n,), "block" for k vectors as rows (k, n)."""
    return "single" if rows.shape.rank == 1 else "block"


def _rows_tensor(rows: np.ndarray) -> tf.Tensor:
    """A numpy vector or block of rows (k, n) as a tensor.

    Blocks come from scipy as (n, k) arrays in C order, so their rows are a
    strided (Fortran-order) view, which TensorFlow converts element by
    element; converting the (n, k) array as it lies and transposing it with
    a TF op is faster.
    """
    if rows.ndim == 2 and not rows.flags.c_contiguous and rows.T.flags.c_contiguous:
        return tf.transpose(tf.convert_to_tensor(rows.T))
    return tf.convert_to_tensor(rows)


def _sum_over_batches(fn: Callable[..., tf.Tensor], arguments: Any) -> tf.Tensor:
    """Σ of ``fn(*args)`` over per-batch argument tuples, on the default device."""
    total = None
    for args in arguments:
        part = fn(*args)
        total = part if total is None else total + part
    return total


def _planned(apply: Callable[[tf.Tensor], tf.Tensor], plan: BlockPlan, rows: tf.Tensor) -> tf.Tensor:
    """``apply(rows)`` for a vector, or a block as rows in the chunks `BlockPlan` chooses (one pass each)."""
    if rows.shape.rank == 1:
        return plan.run(1, lambda: apply(rows))
    k = int(rows.shape[0])
    pieces = []
    for start, width in plan.chunks(k):
        chunk = rows if width == k else rows[start : start + width]
        if width == 1:
            pieces.append(plan.run(1, lambda chunk=chunk: apply(chunk[0]))[None])
        else:
            pieces.append(plan.run(width, lambda chunk=chunk: apply(chunk)))
    return pieces[0] if len(pieces) == 1 else tf.concat(pieces, axis=0)


@functools.cache
def _blas_controller() -> ThreadpoolController:
    # Created on first use, after numpy/scipy have loaded their BLAS libraries.
    return ThreadpoolController()


def _check_finite_batch(index: int, x: Any, y: Any) -> None:
    """Refuse batch ``index`` if its inputs or targets hold NaN or inf, naming the rows (a finite loss may hide inf)."""
    for name, part in (("x", x), ("y", y)):
        for leaf in tf.nest.flatten(part):
            if leaf is None or not tf.as_dtype(leaf.dtype).is_floating:
                continue
            rows = non_finite_rows(leaf)
            if rows.size:
                shown = ", ".join(map(str, rows[:5])) + (", ..." if rows.size > 5 else "")
                msg = (
                    f"data (batch {index}): {name} has non-finite values (NaN or inf) in {rows.size} of its "
                    f"{leaf.shape[0]} examples (rows {shown} of the batch)."
                )
                raise ValueError(msg)


class DataPassOperator(LinearOperator):
    """A LinearOperator whose every product is one pass over mini-batches of data.

    Subclasses implement ``_apply`` (and ``_apply_adjoint`` unless symmetric)
    on a vector (n,) or a block of vectors as rows (k, n), usually with one of
    the pass helpers ``_summed``, ``_stacked`` or ``_sliced_sum``.
    """

    # Whether products differentiate the model twice, so that a stop_gradient
    # on the loss's path changes them (the Hessian; not J, the OPG or the GGN).
    _differentiates_model_twice = False

    def __init__(
        self,
        model: Any,
        loss_fn: Callable[[Any, Any], Any] | None,
        data: Any,
        *,
        params: Sequence[Any] | None = None,
        batch_size: int | None = None,
        reduction: str = "mean",
        dtype: Any = None,
        progress: bool = False,
        check_deterministic: bool = True,
        strategy: Any = None,
        jit_compile: bool = False,
        hvp_mode: str = "auto",
        per_example_loss: bool = False,
    ) -> None:
        if reduction not in REDUCTIONS:
            msg = f"reduction: expected one of {REDUCTIONS}, got {reduction!r}."
            raise ValueError(msg)
        self._engine = Engine(model, loss_fn, params, hvp_mode=hvp_mode, jit_compile=jit_compile)
        self.strategy = resolve_strategy(strategy, self._engine.variables)
        replicas = Replicas(self.strategy)
        self._replicas = replicas if replicas.count > 1 else None
        if self._replicas is not None and hvp_mode == "auto":
            # Timing modes would run outside the replicas; reverse mode always works there.
            self._engine.hvp_mode = "reverse"
        self._batches = Batches(data, batch_size)
        # Whole passes in one compiled function where the data allows (arrays,
        # Datasets) and no strategy splits the batches over replicas.
        self._fused = FusedPasses(self._batches) if self._batches.fusable and self._replicas is None else None
        self.num_data: int = self._batches.num_data
        self.num_params: int = self._engine.num_params
        self.reduction = reduction
        self.progress = bool(progress)
        self._first_batch: tuple[Any, Any] | None = None
        self.num_products = 0
        self.num_passes = 0
        # Callables told of each product's vector count (hessop._progress's bars).
        self._product_listeners: list[Callable[[int], Any]] = []
        self._needs_per_example_loss = per_example_loss
        self._compute_dtype = self._engine.dtype
        dtype = as_numpy_dtype(dtype, self._compute_dtype.as_numpy_dtype)
        self.loss = self._validate_loss(check_deterministic)
        # How wide the passes of a block are, for A and for Aᴴ (`hessop.operators.blocks`).
        memory = MemoryProbe(self._memory_on_host)
        self._forward_plan, self._adjoint_plan = BlockPlan(memory), BlockPlan(memory)
        # Passing dtype explicitly keeps scipy from probing with a matvec (a data pass).
        super().__init__(dtype=dtype, shape=self._shape())

    def _shape(self) -> tuple[int, int]:
        """The operator's shape, once the engine and the batches exist: P × P unless overridden."""
        return self.num_params, self.num_params

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
        if self._replicas is not None:
            where = f"strategy={self._replicas}"
        else:
            where = f"device={self._engine.variables[0].device or 'default device'}"
        return (
            f"<{type(self).__name__} shape={self.shape} dtype={self.dtype} "
            f"num_data={self.num_data} batches={self._batches.num_batches} "
            f"reduction={self.reduction!r} {where}>"
        )

    def loss_and_gradient(self) -> tuple[float, np.ndarray]:
        """Loss and its gradient (flat, numpy) at the parameters' *current* values.

        One pass over the data, weighted like the operator (mean or sum). The
        operators read the variables at every product, so after updating them
        (e.g. a Newton step) the same operator gives the new curvature.

        Examples
        --------
        >>> import numpy as np, tensorflow as tf, hessop
        >>> w = tf.Variable([1.0, 2.0], dtype=tf.float64)
        >>> x, y = np.eye(2), np.zeros(2)
        >>> def squared_error(y, f):
        ...     return 0.5 * (f - y) ** 2
        >>> H = hessop.HessianOperator(
        ...     lambda x: tf.linalg.matvec(x, w), squared_error, (x, y), params=[w]
        ... )
        >>> loss, grad = H.loss_and_gradient()
        >>> float(loss), grad
        (1.25, array([0.5, 1. ]))
        """
        total_loss, total_grad = 0.0, None
        self._count_pass()
        for x, y in self._iter_batches("gradient"):
            loss, grad = self._engine.loss_and_gradient(x, y)
            total_loss += float(loss)
            total_grad = grad if total_grad is None else total_grad + grad
        grad = total_grad.numpy().astype(np.float64) * self.scale
        value = total_loss * self.scale
        if not np.isfinite(value) or not np.all(np.isfinite(grad)):
            msg = f"loss_fn: the loss or its gradient is not finite (loss {value})."
            raise ValueError(msg)
        return value, grad

    # -- data passes ------------------------------------------------------------
    def _probe_batch(self) -> tuple[Any, Any]:
        """The first batch, kept for timing HVP modes (one batch of memory)."""
        if self._first_batch is None:
            self._first_batch = next(iter(self._batches))
        return self._first_batch

    def _iter_batches(self, desc: str) -> Any:
        if not self.progress:
            return self._batches  # no tqdm object per product: it costs per-call time
        # delay: a bar appears only for passes that last longer than a second.
        return tqdm(self._batches, total=self._batches.num_batches, desc=desc, leave=False, unit="batch", delay=1.0)

    def _per_example_rows(
        self, rows_of_batch: Callable[[Any, Any], tf.Tensor], what: str, max_examples: int | None = None
    ) -> Iterator[np.ndarray]:
        """``rows_of_batch(x, y)`` (the engine's per-example gradients or output Jacobian rows) batch by batch, checked.

        ``max_examples``: split larger batches into pieces of that many examples.
        """
        self._count_pass()
        for x, y in self._iter_batches(what):
            size = examples_in(x)
            step = size if max_examples is None else max(1, max_examples)
            for first in range(0, size, step):
                piece = (x, y) if step >= size else slice_examples(x, y, first, first + step)
                rows = rows_of_batch(*piece).numpy().astype(self.dtype, copy=False)
                if not np.all(np.isfinite(rows)):
                    msg = f"{what}: a row is not finite (NaN or inf); check the model, loss and data."
                    raise ValueError(msg)
                yield rows

    def _count_pass(self, rows: tf.Tensor | None = None) -> None:
        """Count one data pass, and the products of ``rows`` (a vector or a block of rows) if given."""
        self.num_passes += 1
        if rows is None:
            return
        products = 1 if rows.shape.rank == 1 else int(rows.shape[0])
        self.num_products += products
        for listener in self._product_listeners:
            listener(products)

    def _per_batch(self, product: Product, rows: tf.Tensor, part: tuple[int, ...] | None = None) -> Callable[..., tf.Tensor]:
        """``product`` compiled for one batch and for ``rows``'s kind (`Engine.function`)."""
        return self._engine.function(product, _kind_of(rows), part)

    def _pass_took(self, kind: str, seconds: float) -> None:
        """Told the wall time of each summed pass (the Hessian's "auto" mode search counts them)."""

    # The pass helpers take ``rows``: one vector (n,) or a block of k vectors as
    # rows (k, n), the layout vectorized_map maps over, and return the same
    # layout. A single vector uses the plain (not vectorized) product.
    def _sized_batches(self) -> Any:
        return ((x, y, size) for (x, y), size in zip(self._iter_batches(type(self).__name__), self._batches.batch_sizes))

    def _summed(self, product: Product, rows: tf.Tensor, part: tuple[int, ...] | None = None) -> tf.Tensor:
        """Σ over batches of ``product`` (one data pass whatever k), times `scale`.

        ``part``: a variable range (`Engine.variable_parts`) for the restricted
        form of a symmetric product.
        """
        fn = self._per_batch(product, rows, part)
        self._count_pass(rows)
        output_size = self.shape[0] if part is None else self._part_rows(part)
        began = time.perf_counter()
        if self._replicas is not None:
            total = self._replicas.summed(fn, self._sized_batches(), rows, None if part is None else output_size)
        elif self._fuses:
            total = self._fused.summed(fn, rows, output_size)
        else:
            total = _sum_over_batches(fn, ((x, y, rows) for x, y in self._iter_batches(type(self).__name__)))
        self._pass_took(_kind_of(rows), time.perf_counter() - began)
        return total if self.scale == 1.0 else total * tf.constant(self.scale, dtype=total.dtype)

    @property
    def _fuses(self) -> bool:
        """Whether products run as fused passes (not with ``progress=True``, whose bars count batches)."""
        return self._fused is not None and not self.progress

    def _stacked(self, product: Product, rows: tf.Tensor) -> tf.Tensor:
        """Per-batch products concatenated in example order (along the last axis)."""
        fn = self._per_batch(product, rows)
        self._count_pass(rows)
        if self._replicas is not None:
            return self._replicas.stacked(fn, self._sized_batches(), rows)
        if self._fuses:
            return self._fused.stacked(fn, rows)
        return tf.concat([fn(x, y, rows) for x, y in self._iter_batches(type(self).__name__)], axis=-1)

    def _sliced_sum(self, product: Product, rows: tf.Tensor, rows_per_example: int) -> tf.Tensor:
        """Σ over batches of ``product`` applied to each batch's slice of ``rows`` (``rows_per_example`` entries per example)."""
        fn = self._engine.function(product, _kind_of(rows), per_example_input=True)
        self._count_pass(rows)
        if self._fuses:
            return self._fused.sliced_sum(fn, rows, rows_per_example, self.shape[1])
        pieces = tf.split(rows, [size * rows_per_example for size in self._batches.batch_sizes], axis=-1)
        if self._replicas is not None:
            batches = ((x, y, size, piece) for (x, y, size), piece in zip(self._sized_batches(), pieces))
            return self._replicas.sliced_sum(fn, batches, rows_per_example, self.shape[1])
        batches = ((x, y, piece) for (x, y), piece in zip(self._iter_batches(type(self).__name__), pieces))
        return _sum_over_batches(fn, batches)

    def _validate_loss(self, check_deterministic: bool) -> float | None:
        """One forward pass (two when checking determinism): catches bad losses early."""
        if self._engine.loss_fn is None:
            for i, (x, y) in enumerate(self._batches):  # the first pass of the loss checks them otherwise
                _check_finite_batch(i, x, y)
            return None
        first = self._batch_losses()
        self._check_loss_graph()
        if check_deterministic:
            second = self._batch_losses(check_data=False)  # the first pass checked the data
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

    def _check_loss_graph(self) -> None:
        """Refuse half-precision compute in the traced loss; warn of StopGradient ops on the parameters' paths.

        TensorFlow's own StopGradient in `tf.nn.moments` is gone from hessop's
        graphs (`hessop.autodiff.moments`); those left are the user's or another
        library's, and second derivatives (the Hessian's) hold their values fixed.
        """
        x, y = self._probe_batch()
        graph = self._engine.loss_values.get_concrete_function(x, y).graph
        names = check_parameter_paths(graph, self._engine.variables)
        if names and self._differentiates_model_twice:
            shown = ", ".join(repr(name) for name in names[:5]) + (", ..." if len(names) > 5 else "")
            warn(
                f"loss_fn: the loss holds {len(names)} stop_gradient op(s) on a path from the parameters ({shown}); "
                f"{type(self).__name__} is the curvature of the function with those values held fixed, "
                "which differs from the loss's true second derivatives wherever they depend on the parameters."
            )

    def _batch_losses(self, *, check_data: bool = True) -> np.ndarray:
        """The loss summed over each batch; the loss's length checked against the batch's, eagerly.

        Inside the compiled function a batch axis traced as unknown hides a
        wrong count (B - 1 values, or a (1,) mean), which would weight the
        examples wrongly: the first pass compares the counts here.
        """
        sums = []
        for i, (x, y) in enumerate(self._batches):
            if check_data:
                _check_finite_batch(i, x, y)
            values = first_call_on_batch(functools.partial(self._engine.loss_values, x, y), i, x, y).numpy()
            size = examples_in(x)
            if values.ndim == 0:
                if self._needs_per_example_loss:  # raises the engine's message for a scalar loss
                    first_call_on_batch(functools.partial(self._engine.strict_loss_sum, x, y), i, x, y)
                value = float(values) * size
            elif values.shape[0] != size:
                msg = (
                    f"loss_fn: returned {values.shape[0]} values for batch {i} of {size} examples; expected one "
                    f"per example (shape [{size}]) or a scalar batch mean."
                )
                raise ValueError(msg)
            else:
                value = float(np.sum(values))
            if not np.isfinite(value):
                msg = f"loss_fn: the loss is not finite ({value}) on batch {i}; check the data and the model."
                raise ValueError(msg)
            sums.append(value)
        return np.asarray(sums)

    # -- tensor interface -------------------------------------------------------
    def _apply(self, rows: tf.Tensor) -> tf.Tensor:  # pragma: no cover - abstract
        """The product on ``rows``: a vector (n,) or a block of k vectors as rows (k, n)."""
        raise NotImplementedError

    def _apply_adjoint(self, rows: tf.Tensor) -> tf.Tensor:
        # Symmetric operators (H, G, GGN) are their own adjoint.
        return self._apply(rows)

    def _forward_rows(self, rows: tf.Tensor) -> tf.Tensor:
        """A ``rows`` (a vector, or a block as rows) in passes as wide as the plan allows."""
        return _planned(self._apply, self._forward_plan, rows)

    def _adjoint_rows(self, rows: tf.Tensor) -> tf.Tensor:
        """Aᴴ ``rows`` in passes as wide as the plan allows."""
        return _planned(self._apply_adjoint, self._adjoint_plan, rows)

    def _check_tf_input(self, tensor: Any, ndim: int, length: int, name: str) -> tf.Tensor:
        tensor = tf.convert_to_tensor(tensor)
        if not tensor.dtype.is_floating:
            msg = f"{name}: expected a floating tensor, got dtype {tensor.dtype.name}."
            raise TypeError(msg)
        if tensor.shape.rank != ndim or tensor.shape[0] != length:
            expected = f"({length},)" if ndim == 1 else f"({length}, k)"
            msg = f"{name}: expected shape {expected}, got {tuple(tensor.shape)}."
            raise ValueError(msg)
        return tf.cast(tensor, self._compute_dtype)

    def _not_finite(self) -> ValueError:
        msg = f"{type(self).__name__}: the product is not finite (NaN or inf); check the model, loss and vector."
        return ValueError(msg)

    def _tf_checked(self, out: tf.Tensor) -> tf.Tensor:
        if not bool(tf.reduce_all(tf.math.is_finite(out))):
            raise self._not_finite()
        return out

    def tf_matvec(self, vector: Any) -> tf.Tensor:
        """Product with a tensor vector of shape (n,), returned as a tensor on the device.

        No numpy round trip: for use inside TensorFlow code.
        """
        return self._tf_checked(self._forward_rows(self._check_tf_input(vector, 1, self.shape[1], "vector")))

    def tf_matmat(self, block: Any) -> tf.Tensor:
        """Product with a tensor block of shape (n, k), returned as a (m, k) tensor on the device."""
        return self._tf_block_product(self._forward_rows, self._check_tf_input(block, 2, self.shape[1], "block"), self.shape[0])

    def tf_rmatvec(self, vector: Any) -> tf.Tensor:
        """Adjoint product with a tensor vector of shape (m,), as a tensor on the device."""
        return self._tf_checked(self._adjoint_rows(self._check_tf_input(vector, 1, self.shape[0], "vector")))

    def tf_rmatmat(self, block: Any) -> tf.Tensor:
        """Adjoint product with a tensor block of shape (m, k), as a (n, k) tensor on the device."""
        return self._tf_block_product(self._adjoint_rows, self._check_tf_input(block, 2, self.shape[0], "block"), self.shape[1])

    def _tf_block_product(self, apply: Callable[[tf.Tensor], tf.Tensor], block: tf.Tensor, num_rows: int) -> tf.Tensor:
        if block.shape[1] == 0:  # TF's vectorised products fail on k = 0
            return tf.zeros((num_rows, 0), dtype=self._compute_dtype)
        return self._tf_checked(tf.transpose(apply(tf.transpose(block))))

    # -- scipy interface --------------------------------------------------------
    # scipy's matvec/matmat check the shapes; _matvec and friends check the values.
    def _checked(self, array: np.ndarray, name: str) -> np.ndarray:
        array = np.asarray(array)
        if np.iscomplexobj(array):
            msg = f"{name}: expected a real array, got dtype {array.dtype}."
            raise TypeError(msg)
        if array.dtype.kind not in "fiub":
            msg = f"{name}: expected a numeric array, got dtype {array.dtype}."
            raise TypeError(msg)
        check_finite_array(array, name)
        return array

    def _run(self, apply: Callable[[tf.Tensor], tf.Tensor], rows: np.ndarray) -> np.ndarray:
        """numpy rows -> tensor -> product -> numpy, converting once each way.

        BLAS is held to one thread meanwhile: inside a solver (eigsh, cg) its
        worker threads keep spinning after the solver's vector operations and
        compete with TensorFlow's threads (benchmarks/bench_eigsh.py compares a
        matvec inside eigsh with one alone).
        """
        return self._run_rows(apply, _rows_tensor(np.asarray(rows, dtype=self._compute_dtype.as_numpy_dtype)))

    def _run_rows(self, apply: Callable[[tf.Tensor], tf.Tensor], rows: tf.Tensor) -> np.ndarray:
        """``apply(rows)`` for a tensor of rows, as a checked numpy array of the operator's dtype."""
        with _blas_controller().limit(limits=1, user_api="blas"):
            out = apply(rows).numpy()
        if not np.all(np.isfinite(out)):
            raise self._not_finite()
        return out.astype(self.dtype, copy=False)

    @property
    def _memory_on_host(self) -> bool:
        """Whether a product's memory shows in this process's resident size (not on a GPU): for `to_dense`'s trials."""
        return not tf.config.list_logical_devices("GPU")

    def dense_hooks(self) -> DenseHooks:
        """What `to_dense` may use besides products: `hessop.dense.columns.DenseHooks`.

        Examples
        --------
        >>> import numpy as np, tensorflow as tf, hessop
        >>> w = tf.Variable([1.0, 2.0], dtype=tf.float64)
        >>> model = lambda x: tf.linalg.matvec(x, w)
        >>> data = (np.eye(2), None)
        >>> J = hessop.JacobianOperator(model, None, data, target="outputs", params=[w])
        >>> J.dense_hooks().parts is None  # not symmetric: every column's rows are computed
        True
        """
        return DenseHooks(lower_block_rows=self._lower_block_rows, memory_on_host=self._memory_on_host)

    def _lower_block_rows(self, first: int, stop: int) -> np.ndarray:
        """(A @ I[:, first:stop])ᵀ, shape (stop - first, m): columns of A, all rows, for `dense_from_operator`.

        (Symmetric operators return only the rows of their lower block
        triangle.) The unit vectors are made on the device (``tf.one_hot``)
        instead of converted from numpy: the rows layout of a numpy (n, k)
        block is a strided view, slow to convert.
        """
        rows = tf.one_hot(tf.range(first, stop), self.shape[1], dtype=self._compute_dtype)
        return self._run_rows(self._forward_rows, rows)

    def _part_columns(self, part: tuple[int, ...]) -> tuple[int, int]:
        """The columns ``(start, stop)`` of a variable range ``part``."""
        offsets = self._column_offsets
        return int(offsets[part[0]]), int(offsets[part[1]])

    def _part_rows(self, part: tuple[int, ...]) -> int:
        """How many rows a product restricted to ``part`` returns (`Engine.part_variables`)."""
        _, _, *extra = part
        return self.shape[0] - self._part_columns(part)[0] + sum(self._engine.sizes[i] for i in extra)

    @property
    def _column_offsets(self) -> np.ndarray:
        """Each variable's first column, and P: (number of variables + 1,)."""
        return np.concatenate([[0], np.cumsum(self._engine.sizes)])

    # Blocks travel as rows (k, n): the transposes here are numpy views, and
    # _rows_tensor hands a C-order block's transpose to a TF op.
    def _matvec(self, x: np.ndarray) -> np.ndarray:
        return self._run(self._forward_rows, np.reshape(self._checked(x, "x"), -1))

    def _matmat(self, X: np.ndarray) -> np.ndarray:
        return self._block_product(self._forward_rows, self._checked(X, "X"), self.shape[0])

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:
        return self._run(self._adjoint_rows, np.reshape(self._checked(x, "x"), -1))

    def _rmatmat(self, X: np.ndarray) -> np.ndarray:
        return self._block_product(self._adjoint_rows, self._checked(X, "X"), self.shape[1])

    def _block_product(self, apply: Callable[[tf.Tensor], tf.Tensor], X: np.ndarray, num_rows: int) -> np.ndarray:
        if X.shape[1] == 0:  # as scipy's own operators do; TF's vectorised products fail on k = 0
            return np.zeros((num_rows, 0), dtype=self.dtype)
        if X.shape[1] == 1:  # the single-vector product, without vectorisation overhead
            return self._run(apply, X[:, 0])[:, None]
        return self._run(apply, X.T).T


class SymmetricDataPassOperator(DataPassOperator):
    """A P×P data-pass operator equal to its adjoint (H, G, GGN): ``A.H is A``.

    Subclasses name their per-batch engine product in ``_product`` and set
    ``_per_example_loss`` when the product needs per-example losses.
    """

    _symmetric = True  # `check_symmetric` trusts it without a product

    # The per-batch product: ``product(engine, x, y, v, part=None)``, Σ over the batch's examples.
    _product: Product
    _per_example_loss = False

    def __init__(self, model: Any, loss_fn: Callable[[Any, Any], Any], data: Any, **options: Unpack[CurvatureOptions]) -> None:
        self._setup(model, loss_fn, data, **options)

    # The curvature of a Dense layer's bias ("hessian" or "ggn") whose per-example
    # values give the kernel's block of `to_dense` in closed form (hessop/dense/kronecker.py);
    # None: every column from products.
    _kernel_curvature: str | None = None

    def _setup(self, model: Any, loss_fn: Any, data: Any, **options: Any) -> None:
        loss_fn = resolve_loss(loss_fn, model, type(self).__name__)
        DataPassOperator.__init__(self, model, loss_fn, data, per_example_loss=self._per_example_loss, **options)
        self._adjoint_plan = self._forward_plan  # A = Aᴴ: one plan for both

    def _apply(self, rows: tf.Tensor) -> tf.Tensor:
        return self._summed(self._product, rows)

    def _adjoint(self) -> SymmetricDataPassOperator:
        return self

    @property
    def _dense_parts(self) -> tuple[tuple[int, int], ...]:
        """Column ranges of `Engine.variable_parts`: `to_dense` builds A[start:, start:stop] for each and mirrors the rest."""
        return tuple(self._part_columns(part) for part in self._engine.variable_parts())

    def dense_hooks(self) -> DenseHooks:
        """What `to_dense` may use besides products: column parts, and a Dense kernel's block in closed form.

        Examples
        --------
        >>> import numpy as np, tensorflow as tf, hessop
        >>> w = tf.Variable([1.0, 2.0], dtype=tf.float64)
        >>> def squared_error(y, f):
        ...     return 0.5 * (f - y) ** 2
        >>> data = (np.eye(2), np.zeros(2))
        >>> H = hessop.HessianOperator(
        ...     lambda x: tf.linalg.matvec(x, w), squared_error, data, params=[w]
        ... )
        >>> H.dense_hooks().parts
        ((0, 2),)
        """
        return DenseHooks(
            parts=self._dense_parts,
            lower_block_rows=self._lower_block_rows,
            known_block=self._known_dense_block,
            check_block=self._check_dense,
            memory_on_host=self._memory_on_host,
        )

    def _lower_block_rows(self, first: int, stop: int, known_rows: tuple[int, int] | None = None) -> np.ndarray:
        """(A[start:, first:stop])ᵀ for the `_dense_parts` range (start, end) that holds columns first..stop-1.

        The restricted product of that part's variables: its tangent enters
        the graph where they are used, and no rows of earlier variables are
        computed (their entries are the transposed rows of earlier columns).
        ``known_rows``: the columns of one earlier variable, whose rows then
        come first, (A[known_rows + start:, first:stop])ᵀ.
        """
        parts = self._engine.variable_parts()
        columns = [self._part_columns(part) for part in parts]
        index = next((i for i, (start, end) in enumerate(columns) if start <= first < stop <= end), None)
        if index is None:
            msg = f"columns {first}:{stop} are not within one of the parts {columns}."
            raise ValueError(msg)
        part = parts[index]
        if known_rows is not None:
            part = (*part, self._variable_at(*known_rows))
        start, end = columns[index]
        rows = tf.one_hot(tf.range(first - start, stop - start), end - start, dtype=self._compute_dtype)
        return self._restricted_rows(part, rows)

    def _restricted_rows(self, part: tuple[int, ...], rows: tf.Tensor) -> np.ndarray:
        """The product restricted to ``part`` (`Engine.part_variables`) of tangent rows in its variables."""
        if rows.shape.rank == 2 and self.shape[1] <= _SINGLE_PRODUCT_COLUMNS:
            # A few single products trace faster than one vectorised block (P = 3: 0.15 against 0.38 s).
            return np.stack([self._restricted_rows(part, rows[i]) for i in range(int(rows.shape[0]))])
        return self._run_rows(lambda r: self._summed(self._product, r, part), rows)

    def _variable_at(self, start: int, stop: int) -> int:
        """The index of the variable whose columns are ``start:stop``."""
        offsets = self._column_offsets
        index = int(np.searchsorted(offsets, start))
        if index >= len(self._engine.sizes) or offsets[index] != start or offsets[index + 1] != stop:
            msg = f"columns {start}:{stop} are not those of one variable."
            raise ValueError(msg)
        return index

    def _transpose(self) -> SymmetricDataPassOperator:
        return self

    def _known_dense_block(self) -> tuple[int, int, np.ndarray] | None:
        """``(start, stop, A[start:stop, start:stop])`` for a Dense layer's kernel (`hessop.dense.kronecker`), or None."""
        if self._kernel_curvature is None or self._replicas is not None:
            return None  # (under replicas the closed form would run on one device)
        if not hasattr(self, "_dense_kernel"):  # found once: the model's layers and the variables stay
            self._dense_kernel = find_dense_kernel(self._engine)
            self._kernel_factors = (
                None if self._dense_kernel is None else factors_function(self._engine, self._dense_kernel, self._kernel_curvature)
            )
        dense_kernel = self._dense_kernel
        if dense_kernel is None:
            return None
        try:
            self._count_pass()
            block = kernel_block(self._iter_batches("kernel block"), self._kernel_factors, dense_kernel, self.scale)
        except TRACE_ERRORS:
            self._dense_kernel = None  # e.g. per-example curvatures pfor cannot build: the products still can
            return None
        if not np.all(np.isfinite(block)):
            return None  # the products raise their own error
        start, stop = self._part_columns((dense_kernel.kernel, dense_kernel.kernel + 1))
        return start, stop, block.astype(self.dtype, copy=False)

    def _check_dense(self, dense: np.ndarray, start: int, stop: int) -> bool:
        """Whether two products with random tangents in the kernel match ``dense``'s columns start:stop."""
        kernel = self._variable_at(start, stop)
        part = next(p for p in self._engine.variable_parts() if p[0] <= kernel < p[1])
        part_start, part_stop = self._part_columns(part)
        tangents = np.random.default_rng(_CHECK_SEED).standard_normal((2, stop - start))
        rows = np.zeros((2, part_stop - part_start), dtype=self._compute_dtype.as_numpy_dtype)
        rows[:, start - part_start : stop - part_start] = tangents
        products = self._restricted_rows(part, tf.constant(rows)).astype(np.float64)
        expected = (rows[:, start - part_start : stop - part_start] @ dense[part_start:, start:stop].T).astype(np.float64)
        difference, size = np.linalg.norm(products - expected), np.linalg.norm(expected)
        tolerance = float(np.sqrt(np.finfo(self._compute_dtype.as_numpy_dtype).eps))
        relative = difference / size if size > 0 else difference
        if relative <= tolerance:
            return True
        name = self._dense_kernel.name
        self._dense_kernel = None  # the model's structure decides it: later calls use products straight away
        warn(
            f"to_dense: Dense layer {name!r}: the closed form of its kernel's block differs from the "
            f"{type(self).__name__}'s own products by {relative:.1e} (relative; tolerance {tolerance:.1e}), so the "
            "model does not use the layer as a Dense layer alone would (a custom layer reusing its kernel "
            "or bias, or a loss that couples examples); every column is built from products instead.",
            RuntimeWarning,
        )
        return False

    def to_dense(self, *, max_params: int = DEFAULT_MAX_DENSE, block_size: int | None = None) -> np.ndarray:
        """The full P×P matrix, off-diagonal blocks between variables included.

        Built from products with blocks of unit vectors, one data pass per
        block (unlike ``tf.hessians``, which returns only the per-variable
        diagonal blocks of a Hessian). The matrix being symmetric, only its
        lower block triangle is computed: the variables fall into parts of
        consecutive variables (small ones such as biases join the part
        before), a block of a part's columns carries its tangent only in
        that part's variables and returns only the rows from the part's
        first variable on, and the rows above are the transposed rows of
        earlier columns. For variables in the order the model uses them, a
        column of a late layer then skips the early layers' work (one extra
        graph trace per part).

        Where a closed form is known, it replaces products: the GGN's block
        of the largest ``keras.layers.Dense`` kernel (as for
        `HessianOperator.to_dense`, with the per-example GGN of the bias,
        checked the same way), and the whole of the OPG, summed from
        per-example gradients.

        Parameters
        ----------
        max_params : int
            Refuse when P exceeds this (the dense matrix needs P² numbers); raise
            it deliberately for larger models.
        block_size : int or None
            Columns per data pass; memory grows with it. None (default): the
            first columns are built with blocks of 16, 32, 64, ... up to 512
            columns (an untimed block and two timed ones each) and the rest with
            the width that cost least per column. The width stops growing
            once one is 10 % slower than the best, or (on Linux, on the CPU)
            once the next one's peak memory, scaled from the last one's,
            would exceed half the memory available; where that cannot be
            measured (other systems, a GPU) at 128.

        Returns
        -------
        numpy.ndarray
            Array of shape (P, P) and the operator's dtype.

        Raises
        ------
        ValueError
            If P > max_params, or block_size < 1.

        Examples
        --------
        >>> import numpy as np, tensorflow as tf, hessop
        >>> beta = tf.Variable([0.5, -0.25], dtype=tf.float64)
        >>> x = np.array([[1.0, 2.0], [0.5, -1.0], [2.0, 0.0]]); y = np.array([1.0, 0.0, 3.0])
        >>> poisson = lambda y, eta: tf.exp(eta) - y * eta
        >>> def model(x):
        ...     return tf.linalg.matvec(x, beta)
        >>> H = hessop.HessianOperator(model, poisson, (x, y), params=[beta])
        >>> bool(np.allclose(H.to_dense(), x.T @ np.diag(np.exp(x @ beta.numpy())) @ x / 3))
        True
        """
        return dense_from_operator(self, max_params=max_params, block_size=block_size)
