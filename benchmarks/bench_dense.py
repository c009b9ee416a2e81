"""Dense Hessian of a P ≈ 5,000 model: hessop's to_dense vs the usual TF routes.

Model (``--model``): MLP 64-64-10 (tanh, P = 4,810; the default) or
64-40-40-40-40-10 (``deep``, P = 7,930) on 8×8 digits-sized inputs, softmax
cross-entropy, N = 512, float32. Methods, each in its own subprocess so that
its peak memory (max RSS) is its own:

* ``hessop``: ``HessianOperator.to_dense`` with its defaults: the first
  layer's kernel block in closed form (``method="auto"``, see
  ``hessop/dense/kronecker.py``), every other column from batched HVPs (lower
  block triangle by parts of the variables), ``hvp_mode="auto"``
  (reverse-over-reverse until its products have taken 4 × as long as
  tracing it, then a search that traces and times both modes) and block
  widths from 16 columns up tried on the first columns, the fastest kept
  for the rest;
* ``hessop_hvp``: the same with ``method="hvp"``: every column from batched
  HVPs;
* ``hessop_reverse_128``: ``method="hvp"``, ``hvp_mode="reverse"`` and a
  fixed ``block_size=128``;
* ``jacobian``: ``GradientTape.jacobian`` of the full-data gradient (pfor over all P);
* ``per_column``: the seed paper's route, one HVP per column (P calls);
* ``tf_hessians``: ``tf.hessians``-style per-variable blocks only (incomplete, for scale).

Then, in fresh processes: ``to_dense()`` against ``method="hvp"`` (timed
widths), against that with ``block_size=128``, against it traced with
hessop's opt-in pfor rules instead of TensorFlow's (``HESSOP_PFOR_RULES=1``, ``hessop/autodiff/pfor.py``),
against it as one part (every column's tangent in all variables and all
rows computed), and against ``jacobian``, all in one
process and interleaved; the OPG's dense matrix by ``OPGOperator.to_dense``
(per-example gradients summed by GEMMs) and the GGN's (its first kernel's
block in closed form) against their columns from products, also in one
process;
and the work each route does (TF's op-level FLOP count: P times the
tangent-dependent part of an HVP for ``jacobian``, the same per part for
``to_dense``, P whole HVPs for the per-column map) turned into GFLOP/s,
next to the rate of a TF matmul of the first layer's shape. Where the time
of a block goes, op by op: ``benchmarks/profile_dense.py``.

    python benchmarks/bench_dense.py [--model mlp|deep] [--num-data 512] [--memory-limit-gb 16] [--methods ...]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from _common import hessop_pfor_rules, interleaved, machine_info, table, time_calls

# --model: hidden layer widths (tanh) between 64 inputs and 10 classes.
MODELS = {"mlp": (64,), "deep": (40, 40, 40, 40)}
MODEL = "mlp"  # set from --model, in the parent and in each child


def model_name() -> str:
    return "MLP " + "-".join(str(width) for width in (64, *MODELS[MODEL], 10)) + " tanh"


def build(num_data: int):
    import keras
    import numpy as np

    keras.utils.set_random_seed(0)
    hidden = [keras.layers.Dense(width, activation="tanh") for width in MODELS[MODEL]]
    model = keras.Sequential([keras.Input((64,)), *hidden, keras.layers.Dense(10)])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(num_data, 64)).astype("float32")
    y = rng.integers(0, 10, size=num_data).astype("int32")
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    return model, loss_fn, x, y


def record_block_widths(H) -> list[int]:
    """Wrap the block product ``to_dense`` calls so that each block's width is appended to the returned list."""
    widths: list[int] = []
    lower_block_rows = H._lower_block_rows
    H._lower_block_rows = lambda first, stop, **kwargs: widths.append(stop - first) or lower_block_rows(first, stop, **kwargs)
    return widths


def most_used(widths: list[int]) -> int:
    return max(set(widths), key=widths.count)


def jacobian_hessian(model, loss_fn, x, y):
    """``GradientTape.jacobian`` of the full-data gradient (pfor over all P columns), as a numpy-returning call."""
    import numpy as np
    import tensorflow as tf

    variables = [v.value for v in model.trainable_variables]
    P = sum(int(np.prod(v.shape)) for v in variables)

    @tf.function
    def hessian():
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                loss = tf.reduce_mean(loss_fn(y, model(x, training=False)))
            grad = tf.concat([tf.reshape(g, [-1]) for g in inner.gradient(loss, variables)], 0)
        blocks = outer.jacobian(grad, variables)
        return tf.concat([tf.reshape(b, (P, -1)) for b in blocks], axis=1)

    return lambda: hessian().numpy()


def run_method(method: str, num_data: int) -> dict:
    import numpy as np
    import tensorflow as tf

    import hessop

    model, loss_fn, x, y = build(num_data)
    variables = [v.value for v in model.trainable_variables]
    P = sum(int(np.prod(v.shape)) for v in variables)

    def mean_loss():
        return tf.reduce_mean(loss_fn(y, model(x, training=False)))

    H = None
    widths: list[int] = []
    if method.startswith("hessop"):
        H = hessop.HessianOperator(model, loss_fn, (x, y), hvp_mode="reverse" if method == "hessop_reverse_128" else "auto")
        block_size = 128 if method == "hessop_reverse_128" else None
        dense_method = "auto" if method == "hessop" else "hvp"
        widths = record_block_widths(H)

        def compute():
            return H.to_dense(block_size=block_size, method=dense_method)
    elif method == "jacobian":
        compute = jacobian_hessian(model, loss_fn, x, y)

    elif method == "per_column":

        @tf.function
        def hvp(v):
            with tf.GradientTape() as outer:
                with tf.GradientTape() as inner:
                    loss = mean_loss()
                grads = inner.gradient(loss, variables)
                flat = tf.concat([tf.reshape(g, [-1]) for g in grads], 0)
                dot = tf.reduce_sum(flat * v)
            return tf.concat([tf.reshape(g, [-1]) for g in outer.gradient(dot, variables)], 0)

        eye = np.eye(P, dtype=np.float32)

        def compute():
            return np.stack([hvp(tf.constant(eye[i])).numpy() for i in range(P)], axis=1)

    elif method == "tf_hessians":

        @tf.function
        def blocks():
            out = []
            for v in variables:
                with tf.GradientTape() as outer:
                    with tf.GradientTape() as inner:
                        loss = mean_loss()
                    g = inner.gradient(loss, v)
                out.append(outer.jacobian(g, v))
            return out

        def compute():
            return [b.numpy() for b in blocks()]

    else:
        raise ValueError(method)
    # First call (tracing included, what a one-off user pays), then a second
    # call on the traced functions (what repeated use pays).
    start = time.perf_counter()
    dense = compute()
    elapsed = time.perf_counter() - start
    start = time.perf_counter()
    compute()
    second = time.perf_counter() - start
    checksum = float(np.sum(dense[0] if isinstance(dense, list) else dense[:, :10]))
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    # The block-HVP mode hessop used (auto: reverse until its products paid
    # for a mode search), and the block width of most of its products
    # (default: chosen by timing).
    mode = "-"
    if H is not None:
        searched = H._engine.hvp_mode != "auto" or "block" in H._engine.timings
        mode = H._engine.hvp_mode_in_use("block") + ("" if searched else " (auto, no search)")
    width = most_used(widths) if widths else "-"
    return {
        "method": method,
        "seconds": elapsed,
        "second": second,
        "peak_gb": peak_gb,
        "P": P,
        "checksum": checksum,
        "mode": mode,
        "width": width,
    }


def compare_in_one_process(num_data: int, rounds: int = 5) -> dict:
    """In one process, interleaved: to_dense() against its variants and against ``jacobian``.

    Variants, all ``hvp_mode="reverse"``: the default (closed-form kernel
    block, timed widths); ``method="hvp"``, every column from HVPs; that with ``block_size=128``; that with the block products
    traced under hessop's opt-in pfor rules instead of TensorFlow's (see
    ``hessop/autodiff/pfor.py``); and that as one part, all rows of every column.
    """
    import numpy as np

    import hessop

    model, loss_fn, x, y = build(num_data)
    H = hessop.HessianOperator(model, loss_fn, (x, y), hvp_mode="reverse")
    widths = record_block_widths(H)
    H.to_dense(block_size=128, method="hvp")  # trace and warm up both widths and both methods
    H.to_dense(method="hvp")
    H.to_dense()
    H_own_rules = hessop.HessianOperator(model, loss_fn, (x, y), hvp_mode="reverse")
    with hessop_pfor_rules():  # the block product is traced here
        H_own_rules.to_dense(method="hvp")
    H_one_part = hessop.HessianOperator(model, loss_fn, (x, y), hvp_mode="reverse")
    all_variables = ((0, len(H_one_part._engine.sizes)),)
    H_one_part._engine.variable_parts = lambda: all_variables
    H_one_part.to_dense(method="hvp")
    calls = {
        "to_dense()": lambda: H.to_dense(),
        "to_dense(method='hvp') (timed widths)": lambda: H.to_dense(method="hvp"),
        "to_dense(method='hvp', block_size=128)": lambda: H.to_dense(block_size=128, method="hvp"),
        "to_dense(method='hvp'), hessop's pfor rules": lambda: H_own_rules.to_dense(method="hvp"),
        "to_dense(method='hvp'), one part": lambda: H_one_part.to_dense(method="hvp"),
    }
    # The deep model's jacobian peaks at 17.6 GiB alone, and beside the
    # operators above the process was killed on a 24 GiB machine: its
    # comparison with jacobian is the separate processes' second calls.
    if MODEL != "deep":
        jacobian = jacobian_hessian(model, loss_fn, x, y)
        jacobian()
        calls["jacobian"] = jacobian
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    chosen = []
    for _ in range(rounds):
        for name, call in calls.items():
            widths.clear()
            start = time.perf_counter()
            call()
            seconds[name].append(time.perf_counter() - start)
            if name.endswith("(timed widths)"):
                chosen.append(most_used(widths))
    return {"median": {k: float(np.median(v)) for k, v in seconds.items()}, "chosen": chosen}


def opg_ggn_in_one_process(num_data: int, rounds: int = 5) -> dict:
    """The OPG's and GGN's to_dense against their columns from products, interleaved in one process.

    OPG: per-example gradients summed by GEMMs; GGN: the first kernel's
    block in closed form (per-example GGN of its bias), the rest by products.
    """
    import numpy as np

    import hessop
    from hessop.dense.columns import dense_from_operator

    model, loss_fn, x, y = build(num_data)
    G = hessop.OPGOperator(model, loss_fn, (x, y))
    GGN = hessop.GGNOperator(model, loss_fn, (x, y))

    def by_products(op):
        return lambda: dense_from_operator(op, max_params=10_000, block_size=None, closed_form=False)

    pairs = {
        "OPG": ("to_dense() (per-example gradients)", G.to_dense, by_products(G)),
        "GGN": ("to_dense() (closed-form kernel block)", GGN.to_dense, by_products(GGN)),
    }
    calls = {}
    for name, (label, closed, products) in pairs.items():
        calls[f"{name} {label}"] = closed
        calls[f"{name} from products"] = products
    timings = interleaved(calls, repeats=rounds, warmup=1)
    difference = {}
    for name, (_, closed, products) in pairs.items():
        reference = products()
        difference[name] = float(np.max(np.abs(closed() - reference)) / np.max(np.abs(reference)))
    return {
        "first": {k: t["first"] for k, t in timings.items()},
        "median": {k: t["median"] for k, t in timings.items()},
        "difference": difference,
    }


def hvp_flops_and_matmul_rates(num_data: int) -> dict:
    """Floating-point work of a dense Hessian by HVPs (TF's own op-level count) and TF matmul rates here.

    The counts are what ``tf.compat.v1.profiler`` registers for the ops
    (matmuls and elementwise ops) of one reverse-over-reverse HVP graph and
    of one loss-and-gradient graph. Their difference is the work that
    depends on the tangent: a vectorised block of HVPs (``to_dense``,
    ``jacobian``) computes the loss and gradient once and only that part per
    column, while separate HVPs (the per-column map) each do all of it. The
    matmul rates give the scale: one float32 matmul of the first layer's
    shape with 64 tangents side by side (N × 64 times 64 × 64·64), and a
    large square one, each the best of its repeats.

    ``to_dense`` works by parts of the variables (``Engine.variable_parts``):
    a part's columns carry their tangent in its variables only and return
    the rows from its first variable on. Its work per column of part p is
    the same difference for that restricted product: a reverse-over-reverse
    HVP with the tangent in the part's variables and the gradient of the
    rows', less the loss and the gradient of the part's variables.
    """
    import numpy as np
    import tensorflow as tf
    from bench_hvp import reverse_over_reverse

    import hessop

    model, loss_fn, x, y = build(num_data)
    variables = model.trainable_variables

    def flops(graph) -> int:
        options = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
        options["output"] = "none"
        return int(tf.compat.v1.profiler.profile(graph, options=options).total_float_ops)

    def hvp_and_gradient_flops(tangent_variables, row_variables) -> tuple[int, int]:
        """Op counts of an HVP with the tangent in ``tangent_variables`` and the rows of ``row_variables``,
        and of the loss and gradient of ``tangent_variables``."""
        hvp = tf.function(reverse_over_reverse(model, loss_fn, tangent_variables, row_variables))

        @tf.function
        def loss_and_gradient(xb, yb):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(loss_fn(yb, model(xb, training=False)))
            return loss, tape.gradient(loss, tangent_variables)

        specs = [tf.TensorSpec(v.shape, v.dtype) for v in tangent_variables]
        return flops(hvp.get_concrete_function(x, y, specs).graph), flops(loss_and_gradient.get_concrete_function(x, y).graph)

    hvp_flops, gradient_flops = hvp_and_gradient_flops(variables, variables)

    parts = hessop.HessianOperator(model, loss_fn, (x, y), batch_size=num_data)._engine.variable_parts()
    sizes = [int(np.prod(v.shape)) for v in variables]
    to_dense_flops = 0
    for first, stop in parts:
        part_hvp, part_gradient = hvp_and_gradient_flops(variables[first:stop], variables[first:])
        to_dense_flops += sum(sizes[first:stop]) * (part_hvp - part_gradient)

    def matmul_rate(a_shape, b_shape, repeats=30):  # best of the repeats: what this shape can reach
        a, b = tf.random.normal(a_shape), tf.random.normal(b_shape)
        product = tf.function(lambda: tf.matmul(a, b))
        best = time_calls(lambda: product().numpy(), repeats=repeats, warmup=1)["min"]
        return 2 * a_shape[0] * a_shape[1] * b_shape[1] / best

    return {
        "flops_per_hvp": hvp_flops,
        "flops_per_gradient": gradient_flops,
        "to_dense_flops": to_dense_flops,
        "parts": [[first, stop] for first, stop in parts],
        "P": sum(int(np.prod(v.shape)) for v in variables),
        "matmul_layer_shape": matmul_rate((num_data, 64), (64, MODELS[MODEL][0] * 64)),
        "matmul_2048": matmul_rate((2048, 2048), (2048, 2048), repeats=5),
    }


def run_child(name: str, num_data: int, memory_limit_gb: float) -> dict:
    """Run one helper in a fresh process and return the JSON it prints."""
    proc = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            name,
            "--num-data",
            str(num_data),
            "--memory-limit-gb",
            str(memory_limit_gb),
            "--model",
            MODEL,
        ],
        capture_output=True,
        text=True,
        timeout=1800,
        check=True,
    )
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-data", type=int, default=512)
    parser.add_argument(
        "--memory-limit-gb",
        type=float,
        default=16.0,
        help="address-space limit of each child process (0: none); the deep model's jacobian needs more than 16",
    )
    parser.add_argument(
        "--methods", nargs="+", default=["hessop", "hessop_hvp", "hessop_reverse_128", "jacobian", "per_column", "tf_hessians"]
    )
    parser.add_argument(
        "--model", choices=sorted(MODELS), default="mlp", help="mlp: 64-64-10 (P = 4,810); deep: 64-40-40-40-40-10 (P = 7,930)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    global MODEL
    MODEL = args.model
    if args.child:
        if args.memory_limit_gb > 0:  # 0: no limit
            limit = int(args.memory_limit_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        helpers = {
            "compare_in_one_process": compare_in_one_process,
            "throughput": hvp_flops_and_matmul_rates,
            "opg_ggn": opg_ggn_in_one_process,
        }
        result = helpers.get(args.child, lambda n: run_method(args.child, n))(args.num_data)
        print(json.dumps(result))
        return
    print(machine_info())
    rows = []
    results = {}
    for method in args.methods:
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                method,
                "--num-data",
                str(args.num_data),
                "--memory-limit-gb",
                str(args.memory_limit_gb),
                "--model",
                MODEL,
            ],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            reason = "out of memory" if "memory" in proc.stderr.lower() or proc.returncode < 0 else f"failed ({proc.returncode})"
            rows.append(
                [
                    method,
                    "-",
                    "-",
                    reason,
                    "-",
                    "-",
                    "-",
                    f"> {args.memory_limit_gb:g}" if reason == "out of memory" else "-",
                    "-",
                ]
            )
            continue
        results[method] = json.loads(lines[-1])
    base = results.get("hessop", {}).get("seconds")
    base_second = results.get("hessop", {}).get("second")
    P = next(iter(results.values()))["P"] if results else "?"
    print(f"model: {model_name()}, N = {args.num_data}, float32, P = {P:,}" if results else "")
    reference = results.get("hessop") or results.get("hessop_hvp")
    for method, r in results.items():
        if method == "tf_hessians" or reference is None:
            agree = "-"
        else:
            agree = "yes" if abs(r["checksum"] - reference["checksum"]) < 1e-3 * max(1.0, abs(reference["checksum"])) else "NO"
        rows.append(
            [
                method,
                r["mode"],
                r["width"],
                round(r["seconds"], 2),
                round(r["seconds"] / base, 2) if base else "-",
                round(r["second"], 2),
                round(r["second"] / base_second, 2) if base_second else "-",
                round(r["peak_gb"], 2),
                agree,
            ]
        )
    headers = [
        "method",
        "block HVP mode",
        "block width",
        "first call s (incl. tracing)",
        "÷ hessop",
        "second call s",
        "÷ hessop",
        "peak RSS GiB",
        "agrees with hessop",
    ]
    print(table(headers, rows))
    print("(tf_hessians computes only the per-variable diagonal blocks: it is not the full Hessian.)")
    # Block widths, pfor rules and jacobian side by side in one process
    # (process-to-process noise on a shared machine is as large as the
    # differences).
    same = run_child("compare_in_one_process", args.num_data, args.memory_limit_gb)
    print("\nhvp_mode='reverse', one process, 5 interleaved rounds after warm-up:")
    medians = same["median"]
    default = medians["to_dense()"]
    print(
        table(
            ["dense Hessian", "median s", "÷ to_dense()"],
            [[name, round(sec, 2), round(sec / default, 2)] for name, sec in medians.items()],
        )
    )
    print(f"widths chosen in the five rounds: {same['chosen']}")
    # The OPG's and the GGN's dense matrices, each by its two routes.
    other = run_child("opg_ggn", args.num_data, args.memory_limit_gb)
    print("\nOPG (G = JᵀJ/N) and GGN, one process, first calls (tracing included), then medians of 5 interleaved rounds:")
    names = list(other["median"])
    rows_ = []
    for i in range(0, len(names), 2):
        base_ = other["median"][names[i]]
        rows_ += [
            [n, round(other["first"][n], 2), round(other["median"][n], 2), round(other["median"][n] / base_, 2)]
            for n in names[i : i + 2]
        ]
    print(table(["dense matrix", "first call s", "median s", "÷ its to_dense()"], rows_))
    print("max relative difference between the two routes: " + ", ".join(f"{k} {v:.1e}" for k, v in other["difference"].items()))
    # Work and throughput: what each route computes, and how fast.
    work = run_child("throughput", args.num_data, args.memory_limit_gb)
    per_tangent = work["flops_per_hvp"] - work["flops_per_gradient"]
    blocked, separate = work["P"] * per_tangent, work["P"] * work["flops_per_hvp"]
    print(
        f"\nwork (TF's op count): one full-data HVP {work['flops_per_hvp'] / 1e6:.1f} MFLOP, of which the loss and gradient "
        f"{work['flops_per_gradient'] / 1e6:.1f} and the part that depends on the tangent {per_tangent / 1e6:.1f}.\n"
        f"A vectorised block computes the loss and gradient once, so a dense Hessian by blocks of all variables (jacobian) "
        f"does P × {per_tangent / 1e6:.1f} = {blocked / 1e9:.0f} GFLOP; by separate HVPs (per_column) P × "
        f"{work['flops_per_hvp'] / 1e6:.1f} = {separate / 1e9:.0f} GFLOP.\n"
        f"to_dense computes the lower block triangle by parts of the variables {work['parts']}: "
        f"{work['to_dense_flops'] / 1e9:.0f} GFLOP (the same count for each part's restricted product)."
    )
    print(
        f"TF float32 matmul here (best of 30): {work['matmul_layer_shape'] / 1e9:.0f} GFLOP/s "
        f"at ({args.num_data} × 64)·(64 × {MODELS[MODEL][0] * 64}), "
        f"{work['matmul_2048'] / 1e9:.0f} GFLOP/s at 2048³"
    )
    kernel_gemm = 2 * args.num_data * 64**2 * MODELS[MODEL][0] ** 2
    print(
        f"to_dense() replaces the first kernel's {64 * MODELS[MODEL][0]:,} columns by one GEMM of 2·N·d_in²·d_out² = "
        f"{kernel_gemm / 1e9:.0f} GFLOP (hessop/dense/kronecker.py); it took {default:.2f} s, "
        f"{medians['jacobian'] / default:.1f} × less than jacobian."
        if "jacobian" in medians
        else ""
    )
    timings = {
        "hessop to_dense(method='hvp'), one process (median above)": (
            medians["to_dense(method='hvp') (timed widths)"],
            work["to_dense_flops"],
        ),
        **({"jacobian, one process (median above)": (medians["jacobian"], blocked)} if "jacobian" in medians else {}),
    }
    timings.update({f"{m}, second call": (r["second"], separate) for m, r in results.items() if m == "per_column"})
    print(
        table(
            ["dense Hessian", "s", "GFLOP", "GFLOP/s", "÷ layer-shape matmul rate"],
            [
                [
                    name,
                    round(sec, 2),
                    round(flop / 1e9),
                    round(flop / sec / 1e9),
                    round(flop / sec / work["matmul_layer_shape"], 2),
                ]
                for name, (sec, flop) in timings.items()
            ],
        )
    )


if __name__ == "__main__":
    main()
