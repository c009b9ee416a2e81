"""The TensorFlow engine shared by every hessop operator.

It owns the model call, the loss reduction, the flat parameter layout and the
compiled (``tf.function``) per-batch products. Operators never touch autodiff
themselves: they ask the engine for per-batch *sums* over examples and do the
weighting.

Each product is written once, for a single flat vector ``v``; its block
version (k vectors, one pass over the batch) is the same function under
``tf.vectorized_map``, which batches the tangents instead of looping (with
broadcasting ops in place of pfor's transposes and tiles, see
:mod:`hessop.autodiff.pfor`). Where TensorFlow cannot do that (pfor has no rule for
an op's derivative, as through a Keras RNN's while loop), the block loops
over its vectors with ``tf.map_fn``; where forward mode cannot pass the
model, Jacobian-vector products come from two reverse passes. Both warn once.

The per-batch products themselves live with their operators
(`hessop.operators.hessian`, ``ggn``, ``opg``, ``jacobian``), each a function
``product(engine, x, y, v[, part])`` of one batch and one flat vector, written
with the traced building blocks here: `Engine.summed_loss`,
`Engine.per_example_loss`, `Engine.outputs`, `Engine.gradients` and
`Engine.linearize`. `Engine.function` compiles one for a vector or a block.

The symmetric products (H, the OPG, the GGN) also take a *part*, a range
``(first, stop)`` of consecutive variables: the tangent lives in
``variables[first:stop]`` and the output holds only the rows of
``variables[first:]``. `to_dense` builds the lower block triangle of a
symmetric matrix from these and mirrors the rest: the tangent then enters
the graph only where those variables are used, and the backward pass stops
at the first of them, so a column of a late layer skips the early layers.
"""

from __future__ import annotations

import functools
import inspect
import re
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from hessop._validation import warn
from hessop.autodiff.losses import WeightedTargets, as_per_example
from hessop.autodiff.moments import exact_moments
from hessop.autodiff.params import resolve_params
from hessop.autodiff.vectorize import engine_rules, quiet_conversion_errors

try:
    import keras
except ImportError:  # pragma: no cover
    keras = None

__all__ = [
    "HVP_MODES",
    "TRACE_ERRORS",
    "Engine",
    "Product",
    "TracedOnce",
    "column_gradients",
    "model_caller",
    "output_matrix",
    "traced_error",
    "unstack_columns",
]

HVP_MODES = ("auto", "forward", "reverse")
_ZERO = tf.UnconnectedGradients.ZERO
# hvp_mode="auto" times the two modes in at least 5 and at most 15 rounds,
# stopping after 5 once the timing has taken 0.25 s: two modes 5-15 % apart
# on a cheap probe need more samples than one noisy round each (5 rounds
# picked the slower block mode in 1 of 15 fresh operators).
_MODE_TIMING_ROUNDS = (5, 15)
_MODE_TIMING_SECONDS = 0.25
# ...but only once reverse-over-reverse products of that kind (vector or
# block) have taken this many times as long as tracing the reverse product
# did. Tracing the forward product costs more than that, so a short
# computation (a one-off to_dense, an eigsh of a few dozen matvecs) does not
# pay for a graph it may not keep, and a long one loses at most the modes'
# difference over this much work.
_MODE_SEARCH_AFTER = 4.0
# `variable_parts`: a new part begins at a variable of at least this many
# entries once the current part has as many, where the count is the larger
# of _MIN_PART_SIZE and P / _MAX_PARTS. Each part is a graph of its own to
# trace (a vectorised block traces slowly), so tiny variables
# (biases, norms) join their neighbours instead of starting parts.
_MIN_PART_SIZE = 64
_MAX_PARTS = 16
# What TensorFlow raises while tracing when forward mode has no rule for an
# op, or pfor cannot convert one (e.g. second derivatives through the
# while loop of a Keras RNN layer).
TRACE_ERRORS = (NotImplementedError, LookupError, TypeError, ValueError)
# A per-batch product: ``product(engine, x, y, v)`` (symmetric ones also take
# ``part=``), traced only, for one flat vector ``v``.
Product = Callable[..., tf.Tensor]


def unknown_axes(value: Any, axes: Sequence[int]) -> tf.TensorSpec | None:
    """The TensorSpec of ``value`` with ``axes`` unknown (None stays None: no labels)."""
    if value is None:
        return None
    tensor = tf.convert_to_tensor(value)
    shape = list(tensor.shape)
    for axis in axes:
        shape[axis] = None
    return tf.TensorSpec(shape, tensor.dtype)


def compiled(fn: Callable[..., Any], *, jit_compile: bool = False) -> Any:
    """``tf.function(fn, reduce_retracing=True)`` whose traces TensorFlow counts on their own.

    TensorFlow warns when five of the last ten calls of a Python function
    traced, counting every ``tf.function`` made from the same code together.
    Each operator has its own engine and so its own compiled functions: the
    third operator built in a loop (a fold, a bootstrap sample) set off that
    warning, whose advice (define the function outside the loop) a user
    cannot follow. Keyed by the function object itself (the key TensorFlow
    uses is a private attribute; without it nothing changes), the warning
    still fires for a function of one engine that keeps retracing.
    """
    # reduce_retracing: a short last batch relaxes the batch dimension once
    # instead of tracing a new graph per batch shape. (XLA still compiles
    # once per concrete input shape.)
    # exact_moments: second derivatives through tf.nn.moments (normalisation layers) are exact.
    function = tf.function(exact_moments(fn), reduce_retracing=True, jit_compile=jit_compile)
    if hasattr(function, "_key_for_call_stats"):
        function._key_for_call_stats = function
    return function


# Not converted by autograph: called while tracing, a converted warnings.warn
# is reported at a line of autograph's generated code and shows that code.
@tf.autograph.experimental.do_not_convert
def _warn_while_tracing(message: str) -> None:
    """A UserWarning from traced code, attributed to the user's line that set off the trace."""
    warn(message)


def output_matrix(outputs: Any, batch_size: Any) -> tf.Tensor:
    """Model outputs as a (B, C) matrix: row n holds example n's outputs.

    Each output tensor's trailing axes are flattened; several outputs (a dict
    or list of heads) sit side by side in ``tf.nest.flatten`` order, a dict's
    by sorted key.
    """
    leaves = [tf.convert_to_tensor(leaf) for leaf in tf.nest.flatten(outputs)]
    return tf.concat([tf.reshape(leaf, (batch_size, -1)) for leaf in leaves], axis=1)


def traced_error(error_type: type[Exception], message: str) -> Exception:
    """An error in the model or loss found while tracing, for the caller as it is.

    tf.function's autograph rewrites an error raised in traced code into
    "in user code:", the stack of converted frames, then the message; its
    ``ag_pass_through`` marker lets the error through unchanged, so the
    message that names the argument comes first. (Without the marker, as in
    another TF version, the message is still there, at the end.)
    """
    error = error_type(message)
    error.ag_pass_through = True  # type: ignore[attr-defined]
    return error


def _warn_loss_dtype(loss_dtype: tf.DType, param_dtype: tf.DType) -> None:
    _warn_while_tracing(
        f"loss_fn returned {loss_dtype.name} while the parameters are {param_dtype.name}; "
        "curvature is computed at the loss's precision. For Keras losses pass "
        f"dtype='{param_dtype.name}'."
    )


def _error_summary(error: BaseException) -> str:
    """The line of a TF/Keras tracing error that says what went wrong (they end in call context)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(error).splitlines()]
    lines = [line for line in lines if line and "in user code" not in line]
    errors = [line for line in lines if "rror" in line]
    summary = (errors or lines or ["no message"])[-1]
    summary = summary.removeprefix(f"{type(error).__name__}: ")
    return f"{type(error).__name__}: {summary[:200]}"


def _shapes(structure: Any) -> str:
    shapes = [tuple(getattr(leaf, "shape", np.shape(leaf))) for leaf in tf.nest.flatten(structure) if leaf is not None]
    return "None" if not shapes else str(shapes[0]) if len(shapes) == 1 else str(shapes)


_ERROR_LINE = re.compile(r"^[A-Za-z_.]*(Error|Exception): ")
# Lines of TF's and Keras's reports around the message: stack frames, their code, context.
_REPORT_LINES = ("File ", "raise ", "in user code", "Detected at node", "Graph execution error", "Exception encountered", "[[")


def _error_message(error: BaseException) -> str:
    """The message of an error from the model or loss, without the stack and context TF and Keras add.

    Autograph reports "in user code:", the converted frames, then the
    original error's line; Keras adds "Exception encountered when calling
    ..." before and "Arguments received by ..." after its message; graph
    execution adds the frames where the op was defined and the node's name.
    """
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines()]
    starts = [i for i, line in enumerate(lines) if _ERROR_LINE.match(line)]
    if starts:  # the original error's own line, after autograph's stack
        lines = [_ERROR_LINE.sub("", lines[starts[-1]]), *lines[starts[-1] + 1 :]]
    kept = []
    for line in lines:
        if line.startswith("Arguments received by"):
            break
        if line and not line.startswith(_REPORT_LINES):
            kept.append(line)
    message = " ".join(kept) or "no message"
    return message if len(message) <= 300 else message[:297] + "..."


def first_call_on_batch(call: Callable[[], Any], index: int, x: Any, y: Any = None) -> Any:
    """``call()``, the first run of the model (and loss) on data batch ``index``; their errors restated.

    A batch the model cannot take (inputs of the wrong width, a label out of
    range) fails inside the compiled function: Keras's message then comes last,
    after autograph's "in user code:" stack, or as a TensorFlow
    ``InvalidArgumentError`` from graph execution. The error raised here names
    the batch and its shapes and gives that message in one line; the original
    is its ``__cause__``. hessop's own checks (marked by `traced_error`) pass
    through unchanged.
    """
    try:
        return call()
    except (TypeError, ValueError, NotImplementedError, tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as error:
        if getattr(error, "ag_pass_through", False):
            raise
        error_type = TypeError if isinstance(error, (TypeError, tf.errors.UnimplementedError)) else ValueError
        if isinstance(error, NotImplementedError) and "numpy" in str(error):
            msg = (
                f"loss_fn or the model calls numpy on a tensor (batch {index}): hessop traces them with "
                "tf.function, where tensors are symbolic and have no numpy values. Write them with TensorFlow "
                f"or keras.ops operations instead of numpy. ({_error_message(error)})"
            )
            raise TypeError(msg) from error
        strings = any(leaf is not None and leaf.dtype == tf.string for leaf in tf.nest.flatten((x, y)))
        hint = (
            " (The batch holds strings, which hessop passes to the model as they are: the model must map them to "
            "numbers itself, with a StringLookup or TextVectorization layer, or be given the numbers.)"
            if strings
            else ""
        )
        msg = (
            f"data (batch {index}): the model or loss_fn failed on this batch "
            f"(x {_shapes(x)}, y {_shapes(y)}): {type(error).__name__}: {_error_message(error)}{hint}"
        )
        raise error_type(msg) from error


class TracedOnce:
    """A compiled per-batch function ``f(x, y[, vector])`` traced once for all shapes.

    ``tf.function`` traces for the shapes of its first call and traces again,
    with those axes relaxed, when a second shape arrives: a short last batch,
    or a block of another width (the HVP mode search times a narrow one).
    Tracing a vectorized HVP takes about a second, so the first eager call
    here traces straight away with the batch axis of the data, the width of a
    block and the length of a per-example vector unknown.
    """

    def __init__(self, function: Callable[..., Any], *, block: bool = False, per_example_vector: bool = False) -> None:
        self._function = function
        self._vector_axes = ([0] if block else []) + ([-1] if per_example_vector else [])
        self._concrete: Any = None
        self._signature: list[tuple[Any, tuple[int | None, ...]] | None] = []

    @property
    def tracing_count(self) -> int:
        return int(self._function.experimental_get_tracing_count())

    def __call__(self, x: Any, y: Any, *vector: tf.Tensor) -> Any:
        # Inside another graph (tf.distribute's replica functions) the call is
        # traced inline; only eager calls pre-trace.
        if not tf.executing_eagerly():
            return self._function(x, y, *vector)
        if self._concrete is None:
            specs = [tf.nest.map_structure(lambda t: unknown_axes(t, [0]), part) for part in (x, y)]
            specs += [unknown_axes(v, self._vector_axes) for v in vector]
            self._concrete = self._function.get_concrete_function(*specs)
            self._signature = [None if spec is None else (spec.dtype, tuple(spec.shape)) for spec in tf.nest.flatten(specs)]
        # Calling the concrete function skips tf.function's signature matching
        # on every call. It does not check shapes itself (a tensor
        # of another shape runs through the graph traced for the first), so
        # inputs outside the first trace (a padded sequence batch of another
        # length, say) go to tf.function, which traces again for them.
        if self._matches((x, y, *vector)):
            return self._concrete(x, y, *vector)
        return self._function(x, y, *vector)

    def _matches(self, inputs: tuple[Any, ...]) -> bool:
        leaves = tf.nest.flatten(inputs)
        if len(leaves) != len(self._signature):
            return False
        for leaf, expected in zip(leaves, self._signature):
            if expected is None or leaf is None:
                if expected is not leaf:
                    return False
                continue
            dtype, shape = expected
            if not isinstance(leaf, tf.Tensor) or leaf.dtype != dtype:
                return False
            actual = leaf.shape
            if len(actual) != len(shape) or any(e is not None and e != a for e, a in zip(shape, actual)):
                return False
        return True


def model_caller(model: Any) -> Callable[[Any], Any]:
    """``x -> predictions``: Keras layers in inference mode, any other callable as it is."""
    if keras is not None and isinstance(model, keras.layers.Layer):
        # Inference mode: dropout off, batch-norm uses its moving statistics.
        return lambda x: model(x, training=False)
    if not callable(model):
        msg = f"model: expected a Keras model or a callable x -> predictions, got {type(model).__name__}."
        raise TypeError(msg)
    return model


def _refuse_mixed_precision(model: Any) -> None:
    """float16/bfloat16 compute would make second derivatives meaningless: refuse clearly."""
    if keras is None or not isinstance(model, keras.layers.Layer):
        return
    policies = [model.dtype_policy] + [layer.dtype_policy for layer in getattr(model, "layers", [])]
    low = sorted({p.compute_dtype for p in policies if p.compute_dtype in ("float16", "bfloat16")})
    if low:
        msg = (
            f"model: mixed-precision compute ({', '.join(low)}) is not supported: curvature products "
            "in half precision lose most of their digits. Rebuild the model (or a copy with the same "
            "weights) with a float32 or float64 dtype policy."
        )
        raise ValueError(msg)


_HALF_PRECISION = (tf.float16, tf.bfloat16)


def _handles(variable: Any) -> list[Any]:
    """The resource handles a graph captures for ``variable`` (each replica's, for a distributed one)."""
    if keras is not None and isinstance(variable, keras.Variable):
        variable = variable.value
    try:
        return [variable.handle]
    except ValueError:  # a distributed variable outside a replica context
        return [component.handle for component in getattr(variable, "values", ())]
    except AttributeError:
        return []


def parameter_paths(graph: Any, variables: Sequence[Any]) -> tuple[list[str], list[str]]:
    """The StopGradient ops, and the ops computing in half precision, on a path from ``variables`` in ``graph``.

    A path ends at a StopGradient. Only ``graph``'s own ops are searched,
    not the bodies of the functions or loops it calls.
    """
    handles = {id(handle) for v in variables for handle in _handles(v)}
    frontier = [internal.op for external, internal in graph.captures if id(external) in handles]
    seen = {id(op) for op in frontier}
    stopped, half = [], []
    while frontier:
        op = frontier.pop()
        if op.type == "StopGradient":
            stopped.append(op.name)
            continue  # what it feeds is cut off from the variables
        if any(output.dtype in _HALF_PRECISION for output in op.outputs):
            half.append(op.name)
        for output in op.outputs:
            for consumer in output.consumers():
                if id(consumer) not in seen:
                    seen.add(id(consumer))
                    frontier.append(consumer)
    return sorted(stopped), sorted(half)


def check_parameter_paths(graph: Any, variables: Sequence[Any]) -> list[str]:
    """The StopGradient ops on the parameters' paths in ``graph``; raises where any op there computes in half precision.

    Half precision can hide below the model's own dtype policy (a nested
    layer's mixed-precision policy, a cast), where `_refuse_mixed_precision`
    does not look.
    """
    stopped, half = parameter_paths(graph, variables)
    if half:
        shown = ", ".join(repr(name) for name in half[:3]) + (", ..." if len(half) > 3 else "")
        msg = (
            f"model: {len(half)} op(s) on the path from the parameters compute in half precision ({shown}): "
            "curvature products in float16/bfloat16 lose most of their digits. Use a float32 or float64 dtype "
            "policy for every layer (mixed precision set on a nested layer counts too)."
        )
        raise ValueError(msg)
    return stopped


def _dense(gradients: Sequence[Any]) -> list[tf.Tensor]:
    """Embedding gradients arrive as IndexedSlices; products need dense tensors."""
    return [tf.convert_to_tensor(g) for g in gradients]


_UNROLLED = 32  # output columns differentiated one backward pass each; tape.jacobian beyond


def unstack_columns(target: tf.Tensor) -> Any:
    """``target`` (R,) as R scalars sliced on the tape when R is static and at most 32, otherwise itself.

    Call it inside the tape, then pass the result to `column_gradients`.
    """
    if target.shape[0] is not None and target.shape[0] <= _UNROLLED:
        return tf.unstack(target)
    return target


def column_gradients(tape: tf.GradientTape, target: Any, sources: Sequence[Any]) -> list[tf.Tensor]:
    """The gradients of each entry of ``target`` with respect to ``sources``, stacked and dense: (R, *shape) per source.

    ``target`` comes from `unstack_columns`: up to 32 scalars get one backward
    pass each in the same graph (the tape must be persistent), 6x faster than
    ``tape.jacobian``'s vectorisation at R = 10 on an MLP, and an Embedding's
    IndexedSlices gradient is densified without pfor's warning on every trace.
    A 1-D tensor goes through ``tape.jacobian``.
    """
    if not isinstance(target, list):
        return tape.jacobian(target, list(sources), unconnected_gradients=_ZERO)
    per_column = [_dense(tape.gradient(entry, list(sources), unconnected_gradients=_ZERO)) for entry in target]
    return [tf.stack(column) for column in zip(*per_column)]


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
        Forward-over-reverse or reverse-over-reverse Hessian-vector products.
        "auto" starts with reverse-over-reverse and, once its products have
        taken ``_MODE_SEARCH_AFTER`` times as long as tracing it did, times
        both on the first batch and keeps the faster (see `hvp_function`).
    jit_compile : bool
        Compile every per-batch function with XLA (``tf.function(jit_compile=True)``).
    """

    def __init__(
        self,
        model: Any,
        loss_fn: Callable[[Any, Any], Any] | None,
        params: Sequence[Any] | None = None,
        *,
        hvp_mode: str = "auto",
        jit_compile: bool = False,
    ) -> None:
        if hvp_mode not in HVP_MODES:
            msg = f"hvp_mode: expected one of {HVP_MODES}, got {hvp_mode!r}."
            raise ValueError(msg)
        if not isinstance(jit_compile, bool):
            msg = f"jit_compile: expected True or False, got {jit_compile!r}."
            raise TypeError(msg)
        self.jit_compile = jit_compile
        if loss_fn is not None:
            loss_fn = as_per_example(loss_fn)
        _refuse_mixed_precision(model)
        self.model = model
        self.loss_fn = loss_fn
        # ``call_model(x)``: the model's predictions (traced), Keras layers in inference mode.
        self.call_model = model_caller(model)
        self.variables = resolve_params(model, params)
        self.shapes = [tuple(int(d) for d in v.shape) for v in self.variables]
        self.sizes = [int(np.prod(s, dtype=np.int64)) for s in self.shapes]
        self.num_params = int(sum(self.sizes))
        self.dtype = self.variables[0].dtype
        self.hvp_mode = hvp_mode
        self._chosen_mode: dict[str, str] = {}
        self.timings: dict[str, dict[str, float]] = {}
        # hvp_mode="auto" before its search, per kind: seconds spent tracing the
        # reverse product, and seconds of reverse products since.
        self._reverse_trace_seconds: dict[str, float] = {}
        self._provisional_seconds: dict[str, float] = {}
        self._warned_dtype = False
        self._warned_unconnected = False
        self.loss_values = self._compile(self._loss_values)
        self.strict_loss_sum = self._compile(lambda x, y: tf.reduce_sum(self.per_example_loss(x, y, strict=True)))
        # The two loss sums keep the shapes of each batch: they run first, on
        # construction, and check the loss's length against the batch's.
        self.loss_and_gradient = self.per_batch(self._loss_and_gradient)
        self.per_example_gradients = self.per_batch(self._per_example_gradients)
        self.output_jacobian_rows = self.per_batch(self._output_jacobian_rows)
        self.flat_outputs = self._compile(self._flat_outputs)
        self._compiled: dict[tuple[Product, str, tuple[int, ...] | None], Callable[..., tf.Tensor]] = {}
        # The maps (block products, per-example rows) pfor could not vectorise,
        # set on the first trace that needed a loop, so later traces skip the attempt.
        self._looped_maps: set[str] = set()
        self._forward_mode_unavailable = False
        self._forward_mode_reason = ""

    def _compile(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        return compiled(fn, jit_compile=self.jit_compile)

    def per_batch(self, fn: Callable[[Any, Any], Any]) -> TracedOnce:
        """``fn(x, y)`` (traced) compiled once for batches of every size, as the products are."""
        return TracedOnce(self._compile(fn))

    # -- compiled products --------------------------------------------------------
    def function(
        self, product: Product, kind: str, part: tuple[int, ...] | None = None, *, per_example_input: bool = False
    ) -> Callable[..., tf.Tensor]:
        """``product`` compiled for one batch, cached: ``f(x, y, vector)`` or ``f(x, y, block)``.

        ``kind``: "single" for a vector (n,), "block" for k vectors as rows
        (k, n), vectorised over the rows (one data pass per block). ``part``:
        a variable range from `variable_parts`, for the restricted form of a
        symmetric product (its input has the part's entries, its output
        those of ``variables[part[0]:]``). ``per_example_input``: the vector
        has one entry per example (or output) of the batch, as for Jᵀu.
        """
        key = (product, kind, part)
        if key not in self._compiled:
            name = getattr(product, "__name__", "product")
            single = functools.partial(product, self)
            if part is not None:
                if "part" not in inspect.signature(product).parameters:
                    msg = f"part: {name} has no restricted form; only the symmetric products (H, OPG, GGN) take one."
                    raise ValueError(msg)
                single = functools.partial(single, part=part)
            if kind == "single":
                # Traced with exactly (x, y, vector): a concrete function whose
                # signature also holds an unfilled default (part=None) is
                # slower to call.
                def fn(x: Any, y: Any, vector: tf.Tensor) -> tf.Tensor:
                    return single(x, y, vector)

            else:

                def fn(x: Any, y: Any, block: tf.Tensor) -> tf.Tensor:
                    # This body runs only while tf.function traces it; still one data pass per block.
                    return self._vectorized_map(
                        f"block products ({name})", lambda v: single(x, y, v), block, "the vectors of a block", "single products"
                    )

            self._compiled[key] = TracedOnce(self._compile(fn), block=kind == "block", per_example_vector=per_example_input)
        return self._compiled[key]

    def traced_products(self) -> set[tuple[str, str, tuple[int, ...] | None]]:
        """``(product name, kind, part)`` of each per-batch product compiled so far."""
        return {(getattr(product, "__name__", "product"), kind, part) for product, kind, part in self._compiled}

    def _vectorized_map(self, what: str, fn: Callable[[Any], tf.Tensor], elems: Any, items: str, costs: str) -> tf.Tensor:
        """``fn`` over the leading axis of ``elems`` (traced only): vectorised by pfor where it converts every op.

        Where pfor cannot convert an op, the items are looped over in the graph
        instead, with one warning per ``what`` and engine; later traces loop
        straight away. An error of the model or loss itself is raised again by
        the loop.
        """
        if what not in self._looped_maps:
            try:
                with engine_rules(), quiet_conversion_errors():
                    return tf.vectorized_map(fn, elems)
            except TRACE_ERRORS as error:
                reason = error
        looped = tf.map_fn(fn, elems, fn_output_signature=self.dtype)
        if what not in self._looped_maps:
            self._looped_maps.add(what)
            _warn_while_tracing(
                f"{what} of this model cannot be vectorised by tf.vectorized_map ({_error_summary(reason)}); "
                f"hessop loops over {items} instead, so they cost about as much as that many {costs}."
            )
        return looped

    def hvp_function(
        self,
        products: Mapping[str, Product],
        kind: str,
        x: Any,
        y: Any,
        probe: tf.Tensor,
        part: tuple[int, ...] | None = None,
    ) -> Callable[..., tf.Tensor]:
        """The compiled per-batch HVP for ``kind`` in {"single", "block"} (restricted to ``part``, if given).

        ``products`` maps the modes "forward" and "reverse" to their products.

        With ``hvp_mode="auto"`` it is reverse-over-reverse (the mode that
        always works and traces fastest) until those products, as reported by
        `record_hvp_seconds`, have taken ``_MODE_SEARCH_AFTER`` times as long
        as tracing the first one did; the next call then times both modes on
        the given batch (after tracing) and keeps the faster for this kind,
        parts included (the search times the ``part`` it is called with).
        """
        if self.hvp_mode == "auto" and kind not in self._chosen_mode:
            if kind not in self._reverse_trace_seconds:
                began = time.perf_counter()
                self.function(products["reverse"], kind, part)(x, y, probe).numpy()  # trace
                self._reverse_trace_seconds[kind] = time.perf_counter() - began
                self._provisional_seconds[kind] = 0.0
            if self._forward_mode_unavailable:
                self._chosen_mode[kind] = "reverse"  # found (and reported) while tracing
            elif self._provisional_seconds[kind] >= _MODE_SEARCH_AFTER * self._reverse_trace_seconds[kind]:
                self._choose_mode(products, kind, x, y, probe, part)
        return self.function(products[self.hvp_mode_in_use(kind)], kind, part)

    def hvp_mode_in_use(self, kind: str) -> str:
        """The mode of the HVPs of ``kind`` now: "forward" or "reverse" (also while "auto" has not searched)."""
        if self.hvp_mode != "auto":
            return self.hvp_mode
        return self._chosen_mode.get(kind, "reverse")

    def record_hvp_seconds(self, kind: str, seconds: float) -> None:
        """Count ``seconds`` of HVP products of ``kind`` towards the "auto" mode search."""
        if kind in self._provisional_seconds and kind not in self._chosen_mode:
            self._provisional_seconds[kind] += seconds

    def _choose_mode(
        self, products: Mapping[str, Product], kind: str, x: Any, y: Any, probe: tf.Tensor, part: tuple[int, ...] | None = None
    ) -> str:
        candidates: dict[str, Callable[..., tf.Tensor]] = {}
        for mode in ("reverse", "forward"):
            if mode == "forward" and self._forward_mode_unavailable:
                continue  # found (and reported) while tracing the other kind
            fn = self.function(products[mode], kind, part)
            try:
                fn(x, y, probe).numpy()  # trace
            except TRACE_ERRORS as err:
                if mode == "reverse":
                    raise
                # Some ops have no forward-mode rule; reverse-over-reverse always works.
                self._forward_mode_unavailable = True
                reason = self._forward_mode_reason or _error_summary(err)
                warn(f"forward-over-reverse HVP unavailable ({reason}); using reverse-over-reverse.")
                continue
            fn(x, y, probe).numpy()  # the first runs of a new graph are slower
            candidates[mode] = fn
        # Interleaved rounds, so that a change in the machine's load hits both
        # modes alike (timing one mode's samples after the other's picked the
        # slower mode on a busy machine), in alternating order so that neither
        # mode always runs first.
        samples: dict[str, list[float]] = {mode: [] for mode in candidates}
        min_rounds, max_rounds = _MODE_TIMING_ROUNDS
        order = list(candidates)
        began = time.perf_counter()
        for round_ in range(max_rounds):
            for mode in order if round_ % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                candidates[mode](x, y, probe).numpy()
                samples[mode].append(time.perf_counter() - start)
            if round_ + 1 >= min_rounds and time.perf_counter() - began >= _MODE_TIMING_SECONDS:
                break
        times = {mode: statistics.median(values) for mode, values in samples.items()}
        best = min(times, key=times.get)
        self._chosen_mode[kind] = best
        self.timings[kind] = times
        return best

    # -- flat layout (traced) -------------------------------------------------
    def variable_parts(self) -> tuple[tuple[int, int], ...]:
        """Consecutive variable ranges ``(first, stop)`` covering all variables, for `to_dense`.

        A part ends before a variable of at least ``max(_MIN_PART_SIZE, P /
        _MAX_PARTS)`` entries once it holds that many itself; smaller
        variables stay with the part before them.
        """
        min_size = max(_MIN_PART_SIZE, self.num_params // _MAX_PARTS)
        parts, first, size_so_far = [], 0, 0
        for index, size in enumerate(self.sizes):
            if index > first and size_so_far >= min_size and size >= min_size:
                parts.append((first, index))
                first, size_so_far = index, 0
            size_so_far += size
        parts.append((first, len(self.sizes)))
        return tuple(parts)

    def part_variables(self, part: tuple[int, ...] | None) -> tuple[list[tf.Variable], list[tf.Variable]]:
        """The variables a restricted product takes its tangent in, and those it returns rows for.

        ``part`` is ``(first, stop)``: tangent in ``variables[first:stop]``,
        rows of ``variables[first:]``; or ``(first, stop, extra)``: the same
        with the rows of ``variables[extra]`` (an earlier variable) first.
        """
        if part is None:
            return self.variables, self.variables
        first, stop, *extra = part
        return self.variables[first:stop], [self.variables[i] for i in extra] + self.variables[first:]

    def split(self, vector: tf.Tensor, part: tuple[int, ...] | None = None) -> list[tf.Tensor]:
        """Flat (P,) tensor -> list of tensors shaped like the variables (those of ``part`` only, if given)."""
        first, stop = (0, len(self.sizes)) if part is None else part[:2]
        pieces = tf.split(vector, self.sizes[first:stop], axis=-1)
        return [tf.reshape(p, s) for p, s in zip(pieces, self.shapes[first:stop])]

    @staticmethod
    def concat(tensors: Sequence[tf.Tensor]) -> tf.Tensor:
        return tf.concat([tf.reshape(t, [-1]) for t in tensors], axis=0)

    # -- model and loss (traced) ---------------------------------------------------
    def outputs(self, x: Any) -> tf.Tensor:
        """Model outputs as a (B, C) tensor (`output_matrix`)."""
        out = self.call_model(x)
        if not tf.nest.flatten(out):
            msg = f"model: expected output tensors, got {type(out).__name__} with none."
            raise traced_error(TypeError, msg)
        return output_matrix(out, _batch_size_of(x))

    def _loss_values(self, x: Any, y: Any, predictions: Any = None) -> tf.Tensor:
        """The loss's values as ``loss_fn`` returns them, as [B] (or a scalar batch mean), weighted.

        Targets given with sample weights (`WeightedTargets`) pass only the
        targets to ``loss_fn`` and multiply its per-example values by the weights.
        """
        if self.loss_fn is None:
            msg = "loss_fn: this operation needs a loss function, got None."
            raise traced_error(ValueError, msg)
        weights = None
        if isinstance(y, WeightedTargets):
            y, weights = y
        if predictions is None:
            predictions = self.call_model(x)
        loss = tf.convert_to_tensor(self.loss_fn(y, predictions))
        if not loss.dtype.is_floating:
            msg = f"loss_fn: expected a floating-point loss, got dtype {loss.dtype.name}."
            raise traced_error(TypeError, msg)
        if loss.dtype != self.dtype and not self._warned_dtype:
            self._warned_dtype = True
            _warn_loss_dtype(loss.dtype, self.dtype)
        rank = loss.shape.rank
        if rank == 2 and loss.shape[1] == 1:
            loss = loss[:, 0]
        elif rank not in (0, 1):
            msg = (
                "loss_fn: expected per-example losses of shape [B] or [B, 1], or a scalar "
                f"batch mean; got shape {loss.shape}. Use reduction=None or reduce over "
                "non-batch axes inside loss_fn."
            )
            raise traced_error(ValueError, msg)
        static_b = tf.get_static_value(_batch_size_of(x))
        if rank and loss.shape[0] is not None and static_b is not None and int(loss.shape[0]) != int(static_b):
            msg = f"loss_fn: returned {loss.shape[0]} per-example losses for a batch of {static_b} examples."
            raise traced_error(ValueError, msg)
        loss = tf.cast(loss, self.dtype)
        if weights is not None:
            if rank == 0:
                msg = (
                    "loss_fn: sample weights need per-example losses (shape [B]), but the loss is a scalar "
                    "batch mean; for Keras losses pass the loss object itself, or reduction=None."
                )
                raise traced_error(ValueError, msg)
            loss = loss * tf.reshape(tf.cast(weights, self.dtype), [-1])
        return loss

    def _flat_outputs(self, x: Any) -> tf.Tensor:
        return tf.reshape(self.outputs(x), [-1])

    def per_example_loss(self, x: Any, y: Any, predictions: Any = None, *, strict: bool = False) -> tf.Tensor:
        """Per-example losses, shape [B].

        A scalar loss is read as the batch mean (as Keras loss functions with a
        reduction return) and spread evenly, which is exact for sums and
        Hessians of the sum but not for per-example gradients: ``strict=True``
        refuses it there.
        """
        loss = self._loss_values(x, y, predictions)
        if loss.shape.rank == 0:
            if strict:
                msg = (
                    "loss_fn: per-example quantities (J, the OPG, per-example gradients) need per-example "
                    "losses (shape [B]), but loss_fn returns a scalar batch mean. Pass a keras.losses.Loss "
                    "object (hessop reads its per-example values whatever its reduction) or a loss_fn that "
                    "returns one value per example."
                )
                raise traced_error(ValueError, msg)
            return tf.fill([_batch_size_of(x)], loss)
        return loss

    def summed_loss(self, x: Any, y: Any) -> tf.Tensor:
        """The batch's loss summed over its examples (traced)."""
        return tf.reduce_sum(self.per_example_loss(x, y))

    def _loss_and_gradient(self, x: Any, y: Any) -> tuple[tf.Tensor, tf.Tensor]:
        with tf.GradientTape() as tape:
            loss = self.summed_loss(x, y)
        return loss, self.concat(self.gradients(tape, loss))

    def gradients(
        self,
        tape: tf.GradientTape,
        target: tf.Tensor,
        output_gradients: Any = None,
        variables: Sequence[Any] | None = None,
        *,
        second_order: bool = False,
    ) -> list[tf.Tensor]:
        """Gradients of ``target`` with respect to ``variables`` (default all), zeros where unconnected.

        A first derivative (of the loss or outputs) that is unconnected means
        the loss does not depend on the variable as TensorFlow sees it, which
        `_warn_unconnected` reports. A ``second_order`` one may be unconnected
        for good reason (the loss is linear in a variable): not checked.
        """
        sources = self.variables if variables is None else variables
        if second_order:
            return _dense(tape.gradient(target, sources, output_gradients=output_gradients, unconnected_gradients=_ZERO))
        gradients = tape.gradient(target, sources, output_gradients=output_gradients)
        unconnected = [v for v, g in zip(sources, gradients) if g is None]
        if unconnected:
            self._warn_unconnected(unconnected)
        return _dense([tf.zeros_like(v) if g is None else g for v, g in zip(sources, gradients)])

    def _warn_unconnected(self, unconnected: Sequence[Any]) -> None:
        if self._warned_unconnected:
            return
        self._warned_unconnected = True
        names = ", ".join(repr(v.name) for v in unconnected[:5]) + (", ..." if len(unconnected) > 5 else "")
        size = sum(int(np.prod(v.shape, dtype=np.int64)) for v in unconnected)
        _warn_while_tracing(
            f"params: the loss (or model output) does not depend on {len(unconnected)} of the {len(self.variables)} "
            f"variables ({names}; {size} of the P = {self.num_params} parameters) as TensorFlow differentiates it: "
            "their gradients are unconnected, so their rows and columns are zero. A non-differentiable op "
            "(tf.numpy_function, a cast to an integer) cuts the gradient; variables unused on purpose can be "
            "left out with params=[...]."
        )

    def linearize(self, compute: Callable[[], Any], v: tf.Tensor, part: tuple[int, ...] | None = None) -> tuple[Any, Any]:
        """``compute()`` and its Jacobian-vector product along the flat ``v``.

        Forward mode (``ForwardAccumulator``) where TensorFlow has forward
        rules for every op; otherwise, e.g. through the while loop of a Keras
        RNN layer, the same product from two reverse passes: J v is the
        gradient of ⟨Jᵀu, v⟩ with respect to u (about twice the cost).
        Tapes outside this call record ``compute()`` either way. ``part``:
        ``v`` is a tangent in that part's variables only.
        """
        tangents = self.split(v, part)
        variables = self.part_variables(part)[0]
        if not self._forward_mode_unavailable:
            try:
                with tf.autodiff.ForwardAccumulator(variables, tangents) as acc:
                    value = compute()
                return value, acc.jvp(value, unconnected_gradients=_ZERO)
            except TRACE_ERRORS as error:
                self._forward_mode_reason = _error_summary(error)
        with tf.GradientTape() as dual:
            with tf.GradientTape() as primal:
                value = compute()
            cotangent = tf.nest.map_structure(tf.zeros_like, value)
            dual.watch(cotangent)
            vjp = self.gradients(primal, value, cotangent, variables)
            dot = tf.add_n([tf.reduce_sum(g * t) for g, t in zip(vjp, tangents)])
        jvp = dual.gradient(dot, cotangent, unconnected_gradients=_ZERO)
        if not self._forward_mode_unavailable:
            self._forward_mode_unavailable = True
            _warn_while_tracing(
                f"forward-mode Jacobian-vector products are unavailable for this model ({self._forward_mode_reason}); "
                "hessop computes them with two reverse passes instead."
            )
        return value, jvp

    def forward_mode_failed(self, error: BaseException) -> str:
        """Record that forward mode cannot pass the model (``error``, from tracing) and return the reason."""
        self._forward_mode_reason = _error_summary(error)
        return self._forward_mode_reason

    # -- per-example rows (traced) ---------------------------------------------------
    # One derivative per example, vectorised over the batch's examples, each
    # run as a batch of one. Not tape.jacobian of the whole batch's losses:
    # pfor runs that as B backward passes through all B examples, O(B²) time
    # and memory (benchmarks/bench_per_example.py).
    # Examples are independent, as everywhere in hessop: the same curvature
    # comes from any batch size.
    def per_example(self, what: str, single: Callable[[Any, Any], tf.Tensor], x: Any, y: Any) -> tf.Tensor:
        """``single(x_n, y_n)`` on each example n as a batch of one, stacked along a new first axis."""

        def one(example: tuple[Any, ...]) -> tf.Tensor:
            batch_of_one = tf.nest.map_structure(lambda t: t[None], example)
            return single(batch_of_one[0], None if y is None else batch_of_one[1])

        elems = (x,) if y is None else (x, y)
        return self._vectorized_map(what, one, elems, "the examples of a batch", "gradients")

    def _per_example_gradients(self, x: Any, y: Any) -> tf.Tensor:
        """(B, P) per-example gradients of the loss."""

        def gradient(xn: Any, yn: Any) -> tf.Tensor:
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(self.per_example_loss(xn, yn, strict=True))
            return self.concat(self.gradients(tape, loss))

        return self.per_example("per-example gradients", gradient, x, y)

    def _output_jacobian_rows(self, x: Any, y: Any = None) -> tf.Tensor:
        """(B·C, P) rows of the output Jacobian, example-major (J's row order); y is not used."""

        def jacobian(xn: Any, _: Any) -> tf.Tensor:
            with tf.GradientTape() as tape:
                outputs = self.outputs(xn)[0]
            parts = tape.jacobian(outputs, self.variables, unconnected_gradients=_ZERO, experimental_use_pfor=True)
            return tf.concat([tf.reshape(part, (tf.shape(outputs)[0], -1)) for part in parts], axis=1)

        rows = self.per_example("output Jacobians", jacobian, x, None)  # outputs need no targets: y is not sliced
        return tf.reshape(rows, (-1, self.num_params))
