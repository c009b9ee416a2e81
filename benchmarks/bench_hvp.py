"""Matvec cost of every data-pass operator, in units of one full-data gradient.

Model: MLP 784-128-64-10 (tanh), softmax cross-entropy, N = 2048, batch 512,
float32 (P = 109,386). Baselines in the same run: the full-data gradient and
hand-written reverse-over-reverse and forward-over-reverse HVPs, each one
``tf.function`` over all batches (``bench_fused.py``), and the same called
once per batch from Python, for the cost of that dispatch. The Hessian rows
include XLA-compiled products (``jit_compile=True``; their first call
includes XLA compilation). Also: per-call Python overhead of the scipy path
(matvec through scipy vs the operator's fused pass called directly), one batch of per-example
gradients against ``tape.jacobian`` by hand, and matvec time vs N (should be
linear).

    python benchmarks/bench_hvp.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import keras
import numpy as np
import tensorflow as tf
from _common import hessop_pfor_rules, interleaved, machine_info, ms, table
from bench_fused import fused, products

import hessop
from hessop.autodiff import engine as _engine

# Back-to-back pairs for the per-call overhead: 25 pairs were too few to
# separate a few percent from noise.
OVERHEAD_PAIRS = 100


def mlp(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Dense(128, activation="tanh"),
            keras.layers.Dense(64, activation="tanh"),
            keras.layers.Dense(10),
        ]
    )


def data(num_data: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(num_data, 784)).astype("float32"), rng.integers(0, 10, size=num_data).astype("int32")


def reverse_over_reverse(model: keras.Model, loss_fn, variables: list, row_variables: list | None = None):
    """A hand-written reverse-over-reverse HVP of the summed loss on one batch (not compiled).

    ``row_variables``: return only their rows (default ``variables``); the
    tangent ``v`` is in ``variables``.
    """

    def hvp(xb, yb, v):
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                loss = tf.reduce_sum(loss_fn(yb, model(xb, training=False)))
            g = inner.gradient(loss, variables)
            dot = tf.add_n([tf.reduce_sum(a * b) for a, b in zip(g, v)])
        return outer.gradient(dot, variables if row_variables is None else row_variables)

    return hvp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=512)
    args = parser.parse_args()
    print(machine_info())

    model = mlp()
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    x, y = data(2048)
    bs = args.batch_size
    H = hessop.HessianOperator(model, loss_fn, (x, y), batch_size=bs)
    P = H.shape[0]
    print(f"model: MLP 784-128-64-10 tanh, N = {len(x)}, batch {bs}, float32, P = {P:,}")
    variables = [v.value for v in model.trainable_variables]
    batches = [(tf.constant(x[i : i + bs]), tf.constant(y[i : i + bs])) for i in range(0, len(x), bs)]

    @tf.function
    def gradient(xb, yb):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(loss_fn(yb, model(xb, training=False)))
        return tape.gradient(loss, variables)

    hvp_rr = tf.function(reverse_over_reverse(model, loss_fn, variables))

    @tf.function
    def hvp_fr(xb, yb, v):
        with tf.autodiff.ForwardAccumulator(variables, v) as acc:
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(loss_fn(yb, model(xb, training=False)))
            g = tape.gradient(loss, variables)
        return acc.jvp(g)

    tangents = [tf.ones_like(v) for v in variables]
    vector = np.random.default_rng(1).normal(size=P).astype("float32")

    def per_batch_gradient():
        return [gradient(xb, yb) for xb, yb in batches][-1][0].numpy()

    def per_batch(fn):
        return lambda: [fn(xb, yb, tangents) for xb, yb in batches][-1][0].numpy()

    # The baselines: one tf.function over all batches (see bench_fused.py).
    hand = products(model, loss_fn, variables)
    tensor_vector = tf.constant(vector)
    fused_gradient, fused_rr, fused_fr = (fused(x, y, bs, hand[key]) for key in ("gradient", "hvp_rr", "hvp_fr"))

    G = hessop.OPGOperator(model, loss_fn, (x, y), batch_size=bs)
    GGN = hessop.GGNOperator(model, loss_fn, (x, y), batch_size=bs)
    J = hessop.JacobianOperator(model, loss_fn, (x, y), batch_size=bs)
    H_fwd = hessop.HessianOperator(model, loss_fn, (x, y), batch_size=bs, hvp_mode="forward")
    H_rev = hessop.HessianOperator(model, loss_fn, (x, y), batch_size=bs, hvp_mode="reverse")
    H_fwd_xla = hessop.HessianOperator(model, loss_fn, (x, y), batch_size=bs, hvp_mode="forward", jit_compile=True)
    H_rev_xla = hessop.HessianOperator(model, loss_fn, (x, y), batch_size=bs, hvp_mode="reverse", jit_compile=True)
    row_vector = np.random.default_rng(2).normal(size=len(x)).astype("float32")
    auto_search = run_until_mode_search(H, vector)
    engine_single = None

    def engine_only():
        # The operator's fused pass alone, called on a tensor: the floor for H.matvec.
        nonlocal engine_single
        if engine_single is None:
            engine_single = H._per_batch("hvp", tensor_vector)
        return H._fused.summed(engine_single, tensor_vector, P).numpy()

    fns = {
        "TF gradient, fused (baseline)": lambda: fused_gradient(tensor_vector).numpy(),
        "TF gradient, one call per batch": per_batch_gradient,
        "hand-written HVP, reverse-over-reverse, fused": lambda: fused_rr(tensor_vector).numpy(),
        "hand-written HVP, forward-over-reverse, fused": lambda: fused_fr(tensor_vector).numpy(),
        "hand-written HVP, reverse-over-reverse, per batch": per_batch(hvp_rr),
        "hand-written HVP, forward-over-reverse, per batch": per_batch(hvp_fr),
        "HessianOperator.matvec (auto)": lambda: H @ vector,
        "HessianOperator.matvec (forward)": lambda: H_fwd @ vector,
        "HessianOperator.matvec (reverse)": lambda: H_rev @ vector,
        "HessianOperator.matvec (forward, XLA)": lambda: H_fwd_xla @ vector,
        "HessianOperator.matvec (reverse, XLA)": lambda: H_rev_xla @ vector,
        "the operator's fused pass only (no scipy)": engine_only,
        "OPGOperator.matvec": lambda: G @ vector,
        "GGNOperator.matvec": lambda: GGN @ vector,
        "JacobianOperator.matvec (JVP)": lambda: J @ vector,
        "JacobianOperator.rmatvec (VJP)": lambda: J.rmatvec(row_vector),
    }
    results = interleaved(fns, repeats=args.repeats)
    base = results["TF gradient, fused (baseline)"]["median"]
    rows = [[name, ms(r["median"]), ms(r["min"]), ms(r["first"]), round(r["median"] / base, 2)] for name, r in results.items()]
    print(f"\n{auto_search}")
    print(table(["operation (all N = 2048, batch 512)", "median ms", "min ms", "first call ms", "÷ fused gradient"], rows))
    overhead = (
        results["HessianOperator.matvec (auto)"]["median"] / results["the operator's fused pass only (no scipy)"]["median"] - 1
    )
    print(f"\nper-call overhead of the scipy path over the bare fused pass (ratio of the medians above): {overhead:+.1%}")
    # The same ratio from back-to-back pairs (order alternating), which drifts
    # of the machine's load between the two functions' samples do not reach.
    ratios = []
    for i in range(OVERHEAD_PAIRS):
        pair = [lambda: H @ vector, engine_only] if i % 2 == 0 else [engine_only, lambda: H @ vector]
        seconds = []
        for fn in pair:
            start = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - start)
        scipy_path, engine = seconds if i % 2 == 0 else seconds[::-1]
        ratios.append(scipy_path / engine)
    quartiles = statistics.quantiles(ratios, n=4)
    print(
        f"the same, median of {OVERHEAD_PAIRS} back-to-back pairs: {statistics.median(ratios) - 1:+.1%} "
        f"(quartiles {quartiles[0] - 1:+.1%}, {quartiles[2] - 1:+.1%})"
    )

    per_example_table(model, loss_fn, x[:bs], y[:bs], gradient, repeats=args.repeats)

    # Linear in N?
    rows = []
    for num_data in (512, 1024, 2048, 4096):
        xs, ys = data(num_data)
        Hn = hessop.HessianOperator(model, loss_fn, (xs, ys), batch_size=bs)
        r = interleaved({"H": lambda Hn=Hn: Hn @ vector}, repeats=max(3, args.repeats // 2))["H"]
        rows.append([num_data, ms(r["median"]), round(r["median"] / num_data * 1e6, 2)])
    print("\nHessian matvec vs N (batch 512):")
    print(table(["N", "median ms", "µs per example"], rows))


def run_until_mode_search(H: hessop.HessianOperator, vector: np.ndarray, max_calls: int = 5000) -> str:
    """Matvecs with hvp_mode="auto" until its mode search has run; a line that says when and what it chose.

    "auto" runs reverse-over-reverse until those products have taken
    ``_MODE_SEARCH_AFTER`` × the time of tracing it; the rows of the table
    below are after the search, the mode it keeps.
    """
    engine = H._engine
    began = time.perf_counter()
    calls, search_seconds = 0, 0.0
    while "single" not in engine.timings and calls < max_calls:
        before = time.perf_counter()
        H @ vector
        calls += 1
        if "single" in engine.timings:
            search_seconds = time.perf_counter() - before
    if "single" not in engine.timings:
        return f"auto: no mode search after {calls} matvecs ({time.perf_counter() - began:.1f} s)"
    timed = ", ".join(f"{mode} {seconds * 1e3:.1f} ms" for mode, seconds in engine.timings["single"].items())
    return (
        f"auto: reverse-over-reverse for {calls - 1} matvecs ({engine._provisional_seconds['single']:.2f} s, "
        f"≥ {_engine._MODE_SEARCH_AFTER:g} × its {engine._reverse_trace_seconds['single']:.2f} s trace), then a mode search "
        f"(in the next matvec, {search_seconds:.2f} s with it) timed one batch: {timed}; chose {engine._chosen_mode['single']}"
    )


def per_example_table(model: keras.Model, loss_fn, x: np.ndarray, y: np.ndarray, gradient, *, repeats: int) -> None:
    """One batch of per-example gradients (B × P, numpy out): hessop against ``tape.jacobian`` by hand.

    ``tape.jacobian`` runs pfor over the batch's B losses, each a backward
    pass through all B examples; hessop runs pfor over the examples, each a
    batch of one. The fourth row is hessop traced with its opt-in pfor rules
    (``HESSOP_PFOR_RULES=1``, ``hessop/autodiff/pfor.py``). The batch gradient
    is the unit (``bench_per_example.py`` compares the two routes over B).
    """
    variables = [v.value for v in model.trainable_variables]
    xb, yb = tf.constant(x), tf.constant(y)

    @tf.function
    def by_hand(xb, yb):
        with tf.GradientTape() as tape:
            losses = loss_fn(yb, model(xb, training=False))
        blocks = tape.jacobian(losses, variables, experimental_use_pfor=True)
        return tf.concat([tf.reshape(b, (tf.shape(losses)[0], -1)) for b in blocks], axis=1)

    default = hessop.OPGOperator(model, loss_fn, (x, y), batch_size=len(x))
    own_rules = hessop.OPGOperator(model, loss_fn, (x, y), batch_size=len(x))
    with hessop_pfor_rules():  # its per-example gradients are traced here
        next(iter(own_rules.per_example_gradients()))
    fns = {
        "batch gradient (unit)": lambda: gradient(xb, yb)[0].numpy(),
        "tape.jacobian by hand (TF's pfor rules)": lambda: by_hand(xb, yb).numpy(),
        "hessop per_example_gradients()": lambda: next(iter(default.per_example_gradients())),
        "hessop, its pfor rules (opt-in)": lambda: next(iter(own_rules.per_example_gradients())),
    }
    results = interleaved(fns, repeats=repeats)
    unit = results["batch gradient (unit)"]["median"]
    by_hand_median = results["tape.jacobian by hand (TF's pfor rules)"]["median"]
    rows = [
        [name, ms(r["median"]), ms(r["min"]), round(r["median"] / unit, 1), round(r["median"] / by_hand_median, 2)]
        for name, r in results.items()
    ]
    print(
        f"\nper-example gradients of one batch ({len(x)} × {sum(int(np.prod(v.shape)) for v in variables):,}, "
        "float32, numpy out):"
    )
    print(table(["operation", "median ms", "min ms", "÷ batch gradient", "÷ by hand"], rows))


if __name__ == "__main__":
    main()
