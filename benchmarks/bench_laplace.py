"""Laplace with a Kronecker posterior at P = 1.86 M, and influence by EK-FAC: costs in fused gradients and forwards.

Model: MLP 784-1024-1024-10 (tanh, P = 1,863,690), softmax cross-entropy,
N = 4096 training examples, batch 512, float32. Baselines, in the same run:
the summed loss's gradient over all N in one hand-written ``tf.function``
(the best a user writes), and a forward pass over the 1,000 predictive
inputs in one ``tf.function``.

* fit: ``hessop.Laplace(..., likelihood="classification", structure="kron")``:
  the loss pass, KFAC's factor pass and the factors' eigendecompositions.
  Target ≤ 4 gradients.
* evidence: ``log_marginal_likelihood()`` at a new τ (numpy, from the
  eigenvalues). predictive: probit probabilities of 1,000 inputs through
  the per-layer output covariance. Target ≤ 3 forwards per input batch.
* With torch and laplace-torch installed (the ``bench`` extra): its
  ``Laplace(..., "classification", hessian_structure="kron")`` on the same
  weights: fit, evidence and predictive times, and the agreement. (Its
  dependencies may replace a CPU torch by a CUDA one with torchvision and
  triton; on a CPU machine reinstall the CPU torch and remove torchvision.)
* influence: 4,096 training examples on 10 test queries with EK-FAC,
  against the CG route (the exact GGN, solved by block CG to rtol 1e-3).

    python benchmarks/bench_laplace.py [--repeats 3] [--skip-cg]
"""

from __future__ import annotations

import argparse
import time

import keras
import numpy as np
import tensorflow as tf
from _common import interleaved, machine_info, ms, table
from bench_hvp import data
from bench_kfac import BATCH, fused_gradient, torch_copy, wide_mlp

import hessop

NUM_DATA, NUM_PREDICT, NUM_QUERIES = 4096, 1000, 10


def fused_forward(model: keras.Model, x: np.ndarray, batch: int = 256):
    xs, n = tf.constant(x), len(x)

    @tf.function
    def whole():
        outputs = tf.TensorArray(tf.float32, size=-(-n // batch))
        for i in tf.range(-(-n // batch)):
            outputs = outputs.write(i, tf.reduce_sum(model(xs[i * batch : (i + 1) * batch], training=False)))
        return outputs.stack()

    return whole


def laplace_torch(model: keras.Model, x: np.ndarray, y: np.ndarray, x_new: np.ndarray, tau: float):
    """laplace-torch's Kronecker Laplace on a torch copy: (fit, evidence, predictive) callables, or None."""
    try:
        import torch
        from laplace import Laplace
    except ImportError:
        return None
    net = torch_copy(model)
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y).long())
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH)
    x_new = torch.from_numpy(x_new)
    state = {}

    def fit():
        state["la"] = Laplace(net, "classification", subset_of_weights="all", hessian_structure="kron", prior_precision=tau)
        state["la"].fit(loader)

    def evidence():
        return float(state["la"].log_marginal_likelihood(torch.tensor(tau)))

    def predictive():
        # Its GLM predictive forms the Jacobians of all inputs at once (1,000 × 10 × P floats,
        # 75 GB here): in chunks of 10 inputs, as a user must call it at this size, and on the
        # first 100 inputs only (minutes each); its time is scaled by 10.
        chunks = [state["la"](x_new[i : i + 10], pred_type="glm", link_approx="probit") for i in range(0, 100, 10)]
        return torch.cat(chunks).detach().numpy()

    return fit, evidence, predictive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-cg", action="store_true", help="skip the CG influence route (minutes)")
    args = parser.parse_args()
    print(machine_info())
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    x, y = data(NUM_DATA)
    x_new = data(NUM_PREDICT, seed=1)[0]
    model = wide_mlp()
    tau = 1.0
    options = {"likelihood": "classification", "structure": "kron", "prior_precision": tau, "batch_size": BATCH}
    state = {}

    def fit():
        state["la"] = hessop.Laplace(model, None, (x, y), check_deterministic=False, **options)

    fns = {
        "gradient, fused by hand": fused_gradient(model, loss_fn, x, y),
        "forward of 1,000 inputs, fused by hand": fused_forward(model, x_new),
        "hessop fit (kron)": fit,
        "hessop evidence": lambda: state["la"].log_marginal_likelihood(2.0),
        "hessop predictive (probit, 1,000 inputs)": lambda: state["la"].predictive(x_new, batch_size=250),
    }
    times = interleaved(fns, repeats=args.repeats, warmup=1)
    gradient = times["gradient, fused by hand"]["median"]
    forward = times["forward of 1,000 inputs, fused by hand"]["median"]
    P = state["la"].num_params
    print(f"model: MLP 784-1024-1024-10 tanh, softmax CE, N = {NUM_DATA}, batch {BATCH}, float32, P = {P:,}")
    rows = [
        (name, ms(t["median"]), ms(t["min"]), round(t["median"] / gradient, 3), round(t["median"] / forward, 2))
        for name, t in times.items()
    ]
    print(table(["step", "median ms", "min ms", "÷ gradient (N = 4096)", "÷ forward (1,000 inputs)"], rows), flush=True)

    reference = laplace_torch(model, x, y, x_new, tau)
    if reference is not None:
        # Once each, after hessop's: its predictive alone takes minutes at this size.
        theirs = {}
        for step, fn in zip(("fit (kron)", "evidence", "predictive (probit, 1,000 inputs)"), reference):
            start = time.perf_counter()
            theirs[step] = (fn(), (time.perf_counter() - start) * (10 if step.startswith("predictive") else 1))
            print(f"laplace-torch {step}: {theirs[step][1]:.1f} s", flush=True)
        rows = [(step, ms(t), round(times[f"hessop {step}"]["median"] / t, 3)) for step, (_, t) in theirs.items()]
        print(table(["laplace-torch step (one run)", "ms", "hessop ÷ laplace-torch"], rows))
        ours = state["la"].predictive(x_new, batch_size=250)
        rows = [
            ("evidence at τ = 1", state["la"].log_marginal_likelihood(tau), theirs["evidence"][0]),
            (
                "max |Δ probability| (probit)",
                float(np.max(np.abs(ours[:100] - theirs["predictive (probit, 1,000 inputs)"][0]))),
                0.0,
            ),
        ]
        print(table(["quantity", "hessop", "laplace-torch"], rows), flush=True)

    # Influence of all training examples on 10 queries.
    queries = (x_new[:NUM_QUERIES], np.arange(NUM_QUERIES, dtype=np.int32) % 10)
    start = time.perf_counter()
    ekfac = hessop.influence_scores(model, loss_fn, (x, y), queries, damping=1e-3, batch_size=BATCH)
    ekfac_time = time.perf_counter() - start
    rows = [("EK-FAC (two passes, eigendecompositions, solves, JVPs)", ms(ekfac_time), round(ekfac_time / gradient, 1))]
    if not args.skip_cg:
        ggn = hessop.GGNOperator(model, loss_fn, (x, y), batch_size=BATCH, check_deterministic=False)
        start = time.perf_counter()
        hessop.influence_scores(model, loss_fn, (x, y), queries, curvature=ggn, damping=1e-3, batch_size=BATCH, rtol=1e-3)
        cg_time = time.perf_counter() - start
        rows.append(("exact GGN by block CG (rtol 1e-3)", ms(cg_time), round(cg_time / gradient, 1)))
    print(f"\ninfluence of N = {NUM_DATA} training examples on {NUM_QUERIES} queries, damping 1e-3, scores {ekfac.scores.shape}")
    print(table(["route", "ms", "÷ gradient (N = 4096)"], rows))


if __name__ == "__main__":
    main()
