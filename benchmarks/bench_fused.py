"""Each data-pass operator's matvec against the best hand-written TensorFlow product.

The baselines are what a TensorFlow user would write by hand: one
``tf.function`` over all batches (a ``tf.while_loop`` slicing the in-memory
arrays), so that per-batch dispatch is not hidden in both sides of a ratio.
For each operator: the same product by hand, fused (H: reverse-over-reverse
and forward-over-reverse HVPs, the faster taken; GGN: Jᵀ ∇²ℓ J v; OPG:
Jᵀ(J v) of the per-example losses; J and Jᵀ), and the full-data gradient as
the unit. hessop's products go through scipy (``op @ v``: numpy in, numpy
out); the baselines return a tensor converted to numpy too.

Models: the MLP 784-128-64-10 tanh of ``bench_hvp.py`` (N = 2048, batch 512),
a small CNN (Conv-BatchNorm-Conv-Dense, 16×16×3 inputs) and a transformer
encoder block (Embedding + MultiHeadAttention + LayerNormalization), all
float32 with softmax cross-entropy.

    python benchmarks/bench_fused.py [--repeats 9] [--models mlp,cnn,transformer]
"""

from __future__ import annotations

import argparse

import keras
import numpy as np
import tensorflow as tf
from _common import interleaved, machine_info, ms, table

import hessop


def mlp() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Dense(128, activation="tanh"),
            keras.layers.Dense(64, activation="tanh"),
            keras.layers.Dense(10),
        ]
    )


def cnn() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.Conv2D(16, 3, strides=2, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10),
        ]
    )


def transformer(length: int = 16, vocab: int = 100, width: int = 32) -> keras.Model:
    tokens = keras.Input((length,), dtype="int32")
    h = keras.layers.Embedding(vocab, width)(tokens)
    attended = keras.layers.MultiHeadAttention(num_heads=2, key_dim=width // 2)(h, h)
    h = keras.layers.LayerNormalization()(h + attended)
    h = keras.layers.LayerNormalization()(h + keras.layers.Dense(width)(keras.layers.Dense(64, activation="gelu")(h)))
    return keras.Model(tokens, keras.layers.Dense(10)(keras.layers.GlobalAveragePooling1D()(h)))


def model_and_data(name: str, rng: np.random.Generator) -> tuple[keras.Model, np.ndarray, np.ndarray, int, str]:
    keras.utils.set_random_seed(0)
    if name == "mlp":
        n, batch = 2048, 512
        x = rng.normal(size=(n, 784)).astype("float32")
        return mlp(), x, rng.integers(0, 10, n).astype("int32"), batch, f"MLP 784-128-64-10 tanh, N = {n}, batch {batch}"
    if name == "cnn":
        n, batch = 512, 128
        x = rng.normal(size=(n, 16, 16, 3)).astype("float32")
        label = f"CNN conv16-BN-conv16/2-GAP-dense10 on 16x16x3, N = {n}, batch {batch}"
        return cnn(), x, rng.integers(0, 10, n).astype("int32"), batch, label
    if name == "transformer":
        n, batch = 512, 128
        x = rng.integers(0, 100, size=(n, 16)).astype("int32")
        label = f"transformer block (embed 32, 2 heads, LayerNorm), length 16, N = {n}, batch {batch}"
        return transformer(), x, rng.integers(0, 10, n).astype("int32"), batch, label
    msg = f"unknown model {name!r}"
    raise ValueError(msg)


def fused(x: np.ndarray, y: np.ndarray, batch: int, per_batch):
    """``v -> Σ_batches per_batch(xb, yb, v)`` as one tf.function over all batches (the hand-written baseline)."""
    xs, ys, n = tf.constant(x), tf.constant(y), len(x)
    num_batches = -(-n // batch)

    @tf.function(reduce_retracing=True)
    def whole(v):
        def body(i, total):
            first = i * batch
            xb, yb = xs[first : first + batch], ys[first : first + batch]
            return i + 1, total + per_batch(xb, yb, v)

        return tf.while_loop(lambda i, _: i < num_batches, body, (0, tf.zeros_like(v)))[1]

    return whole


def stacked(x: np.ndarray, y: np.ndarray, batch: int, per_batch):
    """``v -> concat_batches per_batch(xb, yb, v)`` in one tf.function (J v by hand)."""
    xs, ys, n = tf.constant(x), tf.constant(y), len(x)
    num_batches = -(-n // batch)

    @tf.function
    def whole(v):
        pieces = tf.TensorArray(tf.float32, size=num_batches, infer_shape=False)

        def body(i, pieces):
            first = i * batch
            return i + 1, pieces.write(i, per_batch(xs[first : first + batch], ys[first : first + batch], v))

        return tf.while_loop(lambda i, _: i < num_batches, body, (0, pieces))[1].concat()

    return whole


def sliced(x: np.ndarray, y: np.ndarray, batch: int, per_batch, size: int):
    """``u -> Σ_batches per_batch(xb, yb, u[batch])`` in one tf.function (Jᵀ u by hand)."""
    xs, ys, n = tf.constant(x), tf.constant(y), len(x)
    num_batches = -(-n // batch)

    @tf.function
    def whole(u):
        def body(i, total):
            first = i * batch
            part = per_batch(xs[first : first + batch], ys[first : first + batch], u[first : first + batch])
            return i + 1, total + part

        return tf.while_loop(lambda i, _: i < num_batches, body, (0, tf.zeros(size)))[1]

    return whole


def products(model: keras.Model, loss_fn, variables: list):
    """Per-batch hand-written products on flat vectors (the way a user would write them)."""
    shapes = [v.shape for v in variables]
    sizes = [int(np.prod(s)) for s in shapes]

    def split(v):
        return [tf.reshape(p, s) for p, s in zip(tf.split(v, sizes), shapes)]

    def flat(parts):
        # (An Embedding's gradient comes as IndexedSlices.)
        return tf.concat([tf.reshape(tf.convert_to_tensor(p), [-1]) for p in parts], 0)

    def losses(xb, yb):
        return loss_fn(yb, model(xb, training=False))

    def gradient(xb, yb, v):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(losses(xb, yb))
        return flat(tape.gradient(loss, variables))

    def hvp_rr(xb, yb, v):
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                loss = tf.reduce_sum(losses(xb, yb))
            dot = tf.reduce_sum(flat(inner.gradient(loss, variables)) * v)
        return flat(outer.gradient(dot, variables))

    def hvp_fr(xb, yb, v):
        with tf.autodiff.ForwardAccumulator(variables, split(v)) as acc:
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(losses(xb, yb))
            g = [tf.convert_to_tensor(part) for part in tape.gradient(loss, variables)]
        return flat(acc.jvp(g))

    def ggn(xb, yb, v):
        with tf.GradientTape() as tape:
            with tf.autodiff.ForwardAccumulator(variables, split(v)) as acc:
                out = model(xb, training=False)
            jv = acc.jvp(out)
        fixed = tf.stop_gradient(out)
        with tf.GradientTape() as outer:
            outer.watch(fixed)
            with tf.GradientTape() as inner:
                inner.watch(fixed)
                loss = tf.reduce_sum(loss_fn(yb, fixed))
            dot = tf.reduce_sum(inner.gradient(loss, fixed) * jv)
        return flat(tape.gradient(out, variables, output_gradients=tf.stop_gradient(outer.gradient(dot, fixed))))

    def opg(xb, yb, v):
        with tf.GradientTape() as tape:
            with tf.autodiff.ForwardAccumulator(variables, split(v)) as acc:
                per_example = losses(xb, yb)
            jv = acc.jvp(per_example)
        return flat(tape.gradient(per_example, variables, output_gradients=tf.stop_gradient(jv)))

    def jvp(xb, yb, v):
        with tf.autodiff.ForwardAccumulator(variables, split(v)) as acc:
            per_example = losses(xb, yb)
        return acc.jvp(per_example)

    def vjp(xb, yb, u):
        with tf.GradientTape() as tape:
            per_example = losses(xb, yb)
        return flat(tape.gradient(per_example, variables, output_gradients=u))

    return {"gradient": gradient, "hvp_rr": hvp_rr, "hvp_fr": hvp_fr, "ggn": ggn, "opg": opg, "jvp": jvp, "vjp": vjp}


def run(name: str, repeats: int, rng: np.random.Generator) -> list[list]:
    model, x, y, batch, label = model_and_data(name, rng)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    variables = [variable.value for variable in model.trainable_variables]
    hand = products(model, loss_fn, variables)
    data = (x, y)
    H = hessop.HessianOperator(model, loss_fn, data, batch_size=batch, reduction="sum")
    GGN = hessop.GGNOperator(model, loss_fn, data, batch_size=batch, reduction="sum")
    OPG = hessop.OPGOperator(model, loss_fn, data, batch_size=batch, reduction="sum")
    J = hessop.JacobianOperator(model, loss_fn, data, batch_size=batch)
    P, N = H.shape[0], len(x)
    print(f"\nmodel: {label}, float32, P = {P:,}")
    v = rng.normal(size=P).astype("float32")
    u = rng.normal(size=N).astype("float32")
    tv, tu = tf.constant(v), tf.constant(u)
    baseline = {key: fused(x, y, batch, hand[key]) for key in ("gradient", "hvp_rr", "hvp_fr", "ggn", "opg")}
    jvp, vjp = stacked(x, y, batch, hand["jvp"]), sliced(x, y, batch, hand["vjp"], P)
    # Run the operators' "auto" HVP mode search before timing.
    for _ in range(30):
        H @ v
    fns = {
        "gradient": lambda: baseline["gradient"](tv).numpy(),
        "hvp_rr": lambda: baseline["hvp_rr"](tv).numpy(),
        "hvp_fr": lambda: baseline["hvp_fr"](tv).numpy(),
        "ggn": lambda: baseline["ggn"](tv).numpy(),
        "opg": lambda: baseline["opg"](tv).numpy(),
        "jvp": lambda: jvp(tv).numpy(),
        "vjp": lambda: vjp(tu).numpy(),
        "H": lambda: H @ v,
        "GGN": lambda: GGN @ v,
        "OPG": lambda: OPG @ v,
        "J": lambda: J @ v,
        "JT": lambda: J.T @ u,
    }
    # The products agree with their baselines (a timing of a wrong product
    # means nothing), except the transformer's H: TensorFlow's own second
    # derivative through LayerNormalization drops a term (its tf.nn.moments
    # holds the mean fixed), so the hand-written HVP is a timing baseline only.
    checked = (("H", "hvp_rr"),) if name != "transformer" else ()
    for ours, theirs in (*checked, ("GGN", "ggn"), ("OPG", "opg"), ("J", "jvp"), ("JT", "vjp")):
        a, b = fns[ours](), fns[theirs]()
        assert np.allclose(a, b, rtol=1e-3, atol=1e-4 * np.abs(b).max()), (name, ours)
    t = {key: value["median"] for key, value in interleaved(fns, repeats=repeats).items()}
    hvp_best = min(t["hvp_rr"], t["hvp_fr"])
    rows = [
        [name, "H", ms(t["H"]), ms(hvp_best), t["H"] / hvp_best, t["H"] / t["gradient"]],
        [name, "GGN", ms(t["GGN"]), ms(t["ggn"]), t["GGN"] / t["ggn"], t["GGN"] / t["gradient"]],
        [name, "OPG", ms(t["OPG"]), ms(t["opg"]), t["OPG"] / t["opg"], t["OPG"] / t["gradient"]],
        [name, "J", ms(t["J"]), ms(t["jvp"]), t["J"] / t["jvp"], t["J"] / t["gradient"]],
        [name, "Jᵀ", ms(t["JT"]), ms(t["vjp"]), t["JT"] / t["vjp"], t["JT"] / t["gradient"]],
    ]
    print(f"fused gradient {ms(t['gradient'])} ms; hand-written HVP rr {ms(t['hvp_rr'])} ms, fr {ms(t['hvp_fr'])} ms")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--models", default="mlp,cnn,transformer")
    args = parser.parse_args()
    print(machine_info())
    rng = np.random.default_rng(0)
    rows = []
    for name in args.models.split(","):
        rows += run(name, args.repeats, rng)
    print()
    headers = ["model", "operator", "hessop matvec ms", "fused hand-written ms", "÷ hand-written", "÷ fused gradient"]
    print(table(headers, rows))
    print(f"\nmedians of {args.repeats} interleaved repeats; target: ÷ hand-written ≤ 1.1, H ÷ fused gradient ≤ 1.9 (MLP)")


if __name__ == "__main__":
    main()
