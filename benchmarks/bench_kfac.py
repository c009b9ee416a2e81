"""KFAC and EKFAC: the cost of their data passes and inverse products, in gradients; curvlinops on identical weights.

Model: MLP 784-128-64-10 (tanh), softmax cross-entropy (C = 10 outputs),
N = 2048, batch 512, float32. Baseline, in the same run: the gradient of the
summed loss over all batches in one hand-written ``tf.function`` (a
``tf.while_loop`` over slices), the best a user writes. Each row times the
data pass alone, after the operator was built once (its tracing excluded):
KFAC's factor pass per ``fisher_type``, the eigendecompositions of the
factors (numpy) and EKFAC's refit pass. Targets: type2 ≤ 2 gradients, mc
and empirical ≤ 1.3, EKFAC's refit pass ≤ 2. On this model they are below
the passes' multiply-adds: the gradient costs 227 k per example, A's Gram
of the 785-wide input alone 616 k (2.7 gradients); type2 in all 4.7
gradients, mc and empirical 3.4, EKFAC's refit 5.1 (its rotation by U_A
costs what A's Gram does).

The inverse product: MLP 784-1024-1024-10 (P = 1.86 M), ``K.inverse(δ)``
applied to one vector, against that model's fused gradient (N = 2048).
Target ≤ 0.2 gradients. The inverse product's cost is fixed, Σ d_in d_out (d_in + d_out)
multiply-adds, while the gradient's grows with N (≈ 3 P N): the ratio is
shown against the gradient at N = 2048 and 4096, where the FLOP floor is
0.32 and 0.16. Factor memory is Σ(d_in² + d_out²) float64 numbers.

With torch and curvlinops installed (the ``bench`` extra), curvlinops'
``KFACLinearOperator`` (type2, expand, separate bias) on the same weights and
data: ``compute_kronecker_factors()`` against hessop's factor pass, and their
agreement in trace, Frobenius norm and damped log-determinant (all three
independent of the flat order, which differs: PyTorch blocks are G ⊗ A).

    python benchmarks/bench_kfac.py [--repeats 5]
"""

from __future__ import annotations

import argparse

import keras
import numpy as np
import tensorflow as tf
from _common import interleaved, machine_info, ms, table
from bench_hvp import data, mlp

import hessop

BATCH = 512


def wide_mlp() -> keras.Model:
    keras.utils.set_random_seed(1)
    return keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Dense(1024, activation="tanh"),
            keras.layers.Dense(1024, activation="tanh"),
            keras.layers.Dense(10),
        ]
    )


def fused_gradient(model: keras.Model, loss_fn, x: np.ndarray, y: np.ndarray):
    """The summed loss's gradient over all batches in one tf.function."""
    variables = [v.value for v in model.trainable_variables]
    xs, ys, n = tf.constant(x), tf.constant(y), len(x)
    num_batches = -(-n // BATCH)

    @tf.function
    def whole():
        def body(i, totals):
            first = i * BATCH
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(loss_fn(ys[first : first + BATCH], model(xs[first : first + BATCH], training=False)))
            return i + 1, [t + g for t, g in zip(totals, tape.gradient(loss, variables))]

        return tf.while_loop(lambda i, _: i < num_batches, body, (0, [tf.zeros_like(v) for v in variables]))[1]

    return whole


def torch_copy(model: keras.Model):
    """A torch copy of a Dense-tanh MLP (tanh between layers), or None without torch."""
    try:
        import torch
    except ImportError:
        return None
    layers = []
    dense_layers = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    for i, layer in enumerate(dense_layers):
        kernel, bias = (np.asarray(w) for w in layer.get_weights())
        linear = torch.nn.Linear(kernel.shape[0], kernel.shape[1])
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(kernel.T.copy()))
            linear.bias.copy_(torch.from_numpy(bias))
        layers.append(linear)
        if i < len(dense_layers) - 1:
            layers.append(torch.nn.Tanh())
    return torch.nn.Sequential(*layers)


def curvlinops_kfac(model: keras.Model, x: np.ndarray, y: np.ndarray):
    """curvlinops' KFAC (type2) on a torch copy of ``model``, or None without torch/curvlinops."""
    try:
        import curvlinops
        import torch
    except ImportError:
        return None
    net = torch_copy(model)
    batches = [(torch.from_numpy(x[i : i + BATCH]), torch.from_numpy(y[i : i + BATCH]).long()) for i in range(0, len(x), BATCH)]
    return curvlinops.KFACLinearOperator(
        net,
        torch.nn.CrossEntropyLoss(reduction="mean"),
        list(net.parameters()),
        batches,
        fisher_type="type-2",
        check_deterministic=False,
        separate_weight_and_bias=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(machine_info())
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    x, y = data(2048)
    model = mlp()
    options = {"batch_size": BATCH}
    operators = {
        "KFAC type2": hessop.KFACOperator(model, loss_fn, (x, y), **options),
        "KFAC mc (1 sample)": hessop.KFACOperator(model, loss_fn, (x, y), fisher_type="mc", seed=0, **options),
        "KFAC empirical": hessop.KFACOperator(model, loss_fn, (x, y), fisher_type="empirical", **options),
    }
    ekfac = hessop.EKFACOperator(model, loss_fn, (x, y), **options)
    gradient = fused_gradient(model, loss_fn, x, y)
    fns = {"gradient, fused by hand": gradient}
    fns.update({name: op._kfac_factors for name, op in operators.items()})
    bases = ekfac._eigenbases()
    fns["EKFAC eigendecompositions"] = ekfac._eigenbases
    fns["EKFAC refit pass"] = lambda: ekfac._refit(bases)
    reference = curvlinops_kfac(model, x, y)
    agreement = []
    if reference is not None:
        # Read before timing: each compute_kronecker_factors() call adds to curvlinops' factors.
        K = operators["KFAC type2"]
        agreement = [
            ("trace", K.trace(), float(reference.trace)),
            ("Frobenius norm", K.frobenius_norm(), float(reference.frobenius_norm)),
        ]
        fns["curvlinops KFAC type2 factors"] = reference.compute_kronecker_factors
    times = interleaved(fns, repeats=args.repeats)
    base = times["gradient, fused by hand"]["median"]
    P = operators["KFAC type2"].shape[0]
    print(f"model: MLP 784-128-64-10 tanh, softmax CE (C = 10), N = 2048, batch {BATCH}, float32, P = {P:,}")
    rows = [(name, ms(t["median"]), ms(t["min"]), round(t["median"] / base, 2)) for name, t in times.items()]
    print(table(["pass", "median ms", "min ms", "÷ fused gradient"], rows))
    if reference is not None:
        ratio = times["KFAC type2"]["median"] / times["curvlinops KFAC type2 factors"]["median"]
        print(f"hessop ÷ curvlinops, factor pass: {ratio:.2f}")
        rows = [(n, a, b, f"{abs(a - b) / abs(b):.1e}") for n, a, b in agreement]
        print(table(["quantity", "hessop", "curvlinops", "relative difference"], rows))

    # The inverse product at P = 1.86 M.
    wide = wide_mlp()
    K = hessop.KFACOperator(wide, loss_fn, (x, y), **options)
    inverses = {heuristic or "factor damping": K.inverse(1e-3, heuristic=heuristic) for heuristic in (None, "exact")}
    v = np.random.default_rng(0).normal(size=K.shape[0]).astype(np.float32)  # float32 products for a float32 model
    x_large, y_large = data(4096)
    fns = {
        "gradient, fused by hand": fused_gradient(wide, loss_fn, x, y),
        "gradient, fused by hand, N = 4096": fused_gradient(wide, loss_fn, x_large, y_large),
        "KFAC product": lambda: K @ v,
    }
    fns.update({f"inverse product ({name})": (lambda inv=inv: inv @ v) for name, inv in inverses.items()})
    times = interleaved(fns, repeats=args.repeats)
    base = times["gradient, fused by hand"]["median"]
    memory = sum(block.A.nbytes + block.G.nbytes for block in K.blocks if block.A.size > 1)
    formula = sum((d_in**2 + d_out**2) * 8 for d_in, d_out in ((784, 1024), (1024, 1024), (1024, 10)))
    print(
        f"\nmodel: MLP 784-1024-1024-10 tanh, N = 2048, P = {K.shape[0]:,}; kernel factors {memory / 2**20:.1f} MiB "
        f"(Σ(d_in² + d_out²) float64: {formula / 2**20:.1f} MiB)"
    )
    large = times["gradient, fused by hand, N = 4096"]["median"]
    rows = [
        (name, ms(t["median"]), ms(t["min"]), round(t["median"] / base, 3), round(t["median"] / large, 3))
        for name, t in times.items()
    ]
    print(table(["product", "median ms", "min ms", "÷ gradient, N = 2048", "÷ gradient, N = 4096"], rows))


if __name__ == "__main__":
    main()
