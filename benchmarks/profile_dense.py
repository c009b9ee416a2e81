"""Where a block of ``to_dense``'s time goes: TensorFlow's profiler, op by op.

Model as in ``bench_dense.py`` (MLP 64-64-10 tanh, N = 512, float32,
P = 4,810). For each block width k and HVP mode, one vectorised block of k
unit columns, run through the engine's own compiled block product over all
variables (``to_dense`` calls the same product restricted to a part of the
variables, whose first part here, the first layer, differs only in leaving
out the second layer's tangent),
is timed (median of repeats) and then profiled with
``tf.profiler.experimental``; the ops' durations are summed by kind:

* matmul: ``MatMul`` and ``BatchMatMulV2`` (oneDNN's ``_Mkl`` variants too);
  their FLOPs are counted from the shapes of a graph traced with k fixed,
  which gives their rate inside the ops and the matmul work per column
  (what grows with k; the rest is the loss and gradient, computed once);
* elementwise and reductions: ``Mul``, ``AddN``, ``Tile``, ``Sum``, ...;
* copies: ``SplitV``, ``ConcatV2``, ``Reshape``, ``Transpose``, ...

Op time is summed over TensorFlow's executor threads (two here), so it can
exceed the block's wall time when ops run side by side.

    python benchmarks/profile_dense.py [--num-data 512] [--widths 64 128] [--modes reverse forward]
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import statistics
import tempfile
import time

import numpy as np
from _common import machine_info, table
from bench_dense import build

MATMULS = {
    "MatMul",
    "BatchMatMul",
    "BatchMatMulV2",
    "_MklMatMul",
    "_MklBatchMatMulV2",
    "_MklNativeMatMul",
    "_MklNativeBatchMatMulV2",
}
COPIES = {
    "SplitV",
    "Split",
    "ConcatV2",
    "Reshape",
    "Transpose",
    "_MklTranspose",
    "Identity",
    "Pack",
    "Unpack",
    "Slice",
    "StridedSlice",
    "GatherV2",
}


def matmul_flops(graph, library=None) -> int:
    """2·m·n·k summed over the (batch) matmuls of a graph with static shapes, into the functions it calls.

    Forward-mode products are partly traced as nested functions (called
    through ``PartitionedCall``), so those are counted at each call.
    """
    library = graph if library is None else library
    total = 0
    for op in graph.get_operations():
        if op.type in ("PartitionedCall", "StatefulPartitionedCall"):
            function = library._get_function(op.get_attr("f").name)
            total += matmul_flops(function.graph, library)
            continue
        if op.type not in MATMULS:
            continue
        a = op.inputs[0].shape
        transposed = op.get_attr("transpose_a") if op.type == "MatMul" else op.get_attr("adj_x")
        contracted = a[-2] if transposed else a[-1]
        total += 2 * int(np.prod(op.outputs[0].shape)) * int(contracted)
    return total


def op_seconds_by_kind(run, repeats: int) -> dict[str, float]:
    """Seconds of op time per call of ``run``, summed by kind, from a profiler trace of ``repeats`` calls."""
    import tensorflow as tf

    try:
        from tsl.profiler.protobuf import xplane_pb2
    except ImportError:
        from tensorflow.tsl.profiler.protobuf import xplane_pb2

    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        for _ in range(repeats):
            run()
        tf.profiler.experimental.stop()
        space = xplane_pb2.XSpace()
        with open(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)[0], "rb") as f:
            space.ParseFromString(f.read())
    seconds: dict[str, float] = collections.defaultdict(float)
    for plane in space.planes:
        for line in plane.lines:
            if line.name == "python":
                continue  # Python-side events, not ops
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                if "::" in name or ":" not in name:
                    continue  # executor bookkeeping, not an op "name:Type"
                op_type = name.rsplit(":", 1)[1]
                kind = "matmul" if op_type in MATMULS else "copies" if op_type in COPIES else "elementwise and reductions"
                seconds[kind] += event.duration_ps / 1e12 / repeats
    return dict(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-data", type=int, default=512)
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--modes", nargs="+", default=["reverse", "forward"])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    import tensorflow as tf

    import hessop
    from hessop.autodiff.pfor import pfor_rules
    from hessop.operators.hessian import HVP_PRODUCTS

    print(machine_info())
    model, loss_fn, x, y = build(args.num_data)
    rows = []
    for mode in args.modes:
        H = hessop.HessianOperator(model, loss_fn, (x, y), hvp_mode=mode)
        engine = H._engine
        P = engine.num_params
        product = HVP_PRODUCTS[mode]
        block_product = engine.function(product, "block")
        single = functools.partial(product, engine)
        xt, yt = tf.constant(x), tf.constant(y)

        def static_block(k: int):
            """The same block product traced with k fixed, for its matmul shapes."""

            def block(xb, yb, vectors):
                with pfor_rules():
                    return tf.vectorized_map(lambda v: single(xb, yb, v), vectors)  # noqa: B023 - called within this iteration

            spec = tf.TensorSpec([k, P], engine.dtype)  # noqa: B023 - called within this iteration
            return tf.function(block).get_concrete_function(xt, yt, spec).graph  # noqa: B023 - called within this iteration

        flops = {k: matmul_flops(static_block(k)) for k in args.widths}
        for k in args.widths:
            block = tf.constant(np.eye(P, dtype=engine.dtype.as_numpy_dtype)[:k])

            def run():
                return block_product(xt, yt, block).numpy()  # noqa: B023 - called within this iteration

            for _ in range(3):  # trace, then the slower first runs
                run()
            samples = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                run()
                samples.append(time.perf_counter() - start)
            wall = statistics.median(samples)
            kinds = op_seconds_by_kind(run, args.repeats)
            op_total = sum(kinds.values())
            matmul_s = kinds.get("matmul", 0.0)
            other = next((f for w, f in flops.items() if w != k), None)
            widths_apart = next((w for w in flops if w != k), None)
            per_column = (flops[k] - other) / (k - widths_apart) if other is not None else float("nan")
            rows.append(
                [
                    mode,
                    k,
                    round(wall * 1e3, 1),
                    round(wall * 1e3 / k, 3),
                    round(op_total * 1e3, 1),
                    f"{matmul_s / op_total:.0%}",
                    f"{kinds.get('elementwise and reductions', 0.0) / op_total:.0%}",
                    f"{kinds.get('copies', 0.0) / op_total:.0%}",
                    round(flops[k] / matmul_s / 1e9) if matmul_s else "-",
                    round(per_column / 1e6, 2),
                ]
            )
    print(f"model: MLP 64-64-10 tanh, N = {args.num_data}, float32, P = {P:,}; one block of k unit columns")
    headers = [
        "HVP mode",
        "k",
        "block ms (median)",
        "ms per column",
        "op time ms",
        "matmul",
        "elementwise and reductions",
        "copies",
        "matmul GFLOP/s in the ops",
        "matmul MFLOP per column",
    ]
    print(table(headers, rows))

    a, b = tf.random.normal((args.num_data, 64)), tf.random.normal((64, 64 * 64))
    product = tf.function(lambda: tf.matmul(a, b))
    product()
    best = min(_timed(lambda: product().numpy()) for _ in range(30))
    print(
        f"TF float32 matmul ({args.num_data} × 64)·(64 × 4096) here, best of 30: "
        f"{2 * args.num_data * 64 * 64 * 64 / best / 1e9:.0f} GFLOP/s"
    )


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
