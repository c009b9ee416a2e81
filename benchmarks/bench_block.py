"""Block products: one data pass for k vectors vs k separate matvecs.

Same MLP as bench_hvp.py (784-128-64-10 tanh, N = 2048, batch 512, float32).
For H, G and GGN: ``A @ V`` with V of shape (P, k) against k calls of
``A @ v``, interleaved in one process. The target for k = 10 is a ratio of at
most 0.5. "Hessian, XLA" is the same with ``jit_compile=True`` (both its
block and its columns through XLA). "Hessian, hessop's pfor rules" is H
with ``hvp_mode="reverse"``, its block product traced with hessop's opt-in
pfor rules (``HESSOP_PFOR_RULES=1``, ``hessop/autodiff/pfor.py``) instead of
TensorFlow's (its first block call is not a trace). Baseline in the same
run: a hand-written reverse-over-reverse HVP in TF on tensors, k tangents
through ``tf.vectorized_map`` against k calls, and the matmul FLOPs of that
block against k single HVPs: the ratio's floor.

    python benchmarks/bench_block.py [--repeats 5] [--k 10]
"""

from __future__ import annotations

import argparse

import keras
import numpy as np
import tensorflow as tf
from _common import hessop_pfor_rules, interleaved, machine_info, ms, table
from bench_hvp import data, mlp, reverse_over_reverse

import hessop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--k", type=int, nargs="+", default=[4, 10, 20])
    args = parser.parse_args()
    print(machine_info())
    model = mlp()
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    x, y = data(2048)
    operators = {
        "Hessian": hessop.HessianOperator(model, loss_fn, (x, y), batch_size=512),
        "Hessian, XLA": hessop.HessianOperator(model, loss_fn, (x, y), batch_size=512, jit_compile=True),
        "Hessian, hessop's pfor rules": hessop.HessianOperator(model, loss_fn, (x, y), batch_size=512, hvp_mode="reverse"),
        "OPG": hessop.OPGOperator(model, loss_fn, (x, y), batch_size=512),
        "GGN": hessop.GGNOperator(model, loss_fn, (x, y), batch_size=512),
    }
    P = operators["Hessian"].shape[0]
    with hessop_pfor_rules():  # its block product is traced here (HESSOP_PFOR_RULES=1)
        operators["Hessian, hessop's pfor rules"] @ np.ones((P, 2), "float32")
    print(f"model: MLP 784-128-64-10 tanh, N = 2048, batch 512, float32, P = {P:,}")
    # Baseline: the same products written by hand in TF, on tensors (no
    # numpy, no scipy): ten HVPs through tf.vectorized_map against ten calls.
    variables = [v.value for v in model.trainable_variables]
    batches = [(tf.constant(x[i : i + 512]), tf.constant(y[i : i + 512])) for i in range(0, len(x), 512)]
    hvp = reverse_over_reverse(model, loss_fn, variables)
    hvp_one = tf.function(hvp)
    hvp_block = tf.function(lambda xb, yb, tangents: tf.vectorized_map(lambda t: hvp(xb, yb, t), tangents))

    def hand_written(k: int) -> dict:
        tangents = [tf.random.normal((k, *v.shape), seed=k) for v in variables]
        columns = [[t[j] for t in tangents] for j in range(k)]
        return {
            "block": lambda: [hvp_block(xb, yb, tangents) for xb, yb in batches][-1][0].numpy(),
            "columns": lambda: [[hvp_one(xb, yb, c) for xb, yb in batches][-1][0].numpy() for c in columns],
        }

    rows = []
    for k in args.k:
        block = np.random.default_rng(k).normal(size=(P, k)).astype("float32")
        cases = {
            name: {
                "block": lambda op=op, block=block: op @ block,
                "columns": lambda op=op, block=block: [op @ block[:, j] for j in range(block.shape[1])],
            }
            for name, op in operators.items()
        }
        cases["hand-written TF HVP"] = hand_written(k)
        for name, fns in cases.items():
            result = interleaved(fns, repeats=args.repeats)
            ratio = result["block"]["median"] / result["columns"]["median"]
            rows.append(
                [
                    name,
                    k,
                    ms(result["block"]["median"]),
                    ms(result["columns"]["median"]),
                    round(ratio, 2),
                    ms(result["block"]["first"]),
                ]
            )
    chosen = operators["Hessian"]._engine._chosen_mode
    print(f"\nHessian HVP mode chosen by timing: {chosen}")
    print(
        table(
            ["operator", "k", "A @ V median ms", "k × (A @ v) median ms", "block ÷ columns", "first block call ms (trace)"], rows
        )
    )
    # The arithmetic floor of the ratio: a block shares the forward pass and
    # first gradient, but each tangent still costs its own matmuls.
    xb, yb = batches[0]
    single_flops = matmul_flops(hvp_one.get_concrete_function(xb, yb, [tf.zeros(v.shape) for v in variables]))
    flop_rows = []
    for k in args.k:
        block_flops = matmul_flops(hvp_block.get_concrete_function(xb, yb, [tf.zeros((k, *v.shape)) for v in variables]))
        flop_rows.append(
            [k, round(single_flops / 1e6, 1), round(block_flops / 1e6, 1), round(block_flops / (k * single_flops), 3)]
        )
    print("\nmatmul work of the hand-written HVP per batch of 512 (ops the result depends on):")
    print(table(["k", "one column MFLOP", "block MFLOP", "block ÷ k columns"], flop_rows))


def matmul_flops(concrete: tf.types.experimental.ConcreteFunction) -> int:
    """2·m·n·(inner) summed over the MatMul and BatchMatMul ops the outputs depend on.

    Walks back from the outputs: pfor leaves the loop body it converted in the
    graph, unused, and TF's own FLOP count would include it.
    """
    seen: set[str] = set()
    stack = [t.op for t in concrete.outputs]
    total = 0
    while stack:
        op = stack.pop()
        if op.name in seen:
            continue
        seen.add(op.name)
        stack.extend(t.op for t in op.inputs)
        if op.type == "MatMul":
            inner = op.inputs[0].shape[0 if op.get_attr("transpose_a") else 1]
        elif op.type.startswith("BatchMatMul"):
            inner = op.inputs[0].shape[-2 if op.get_attr("adj_x") else -1]
        else:
            continue
        total += 2 * int(np.prod(op.outputs[0].shape)) * int(inner)
    return total


if __name__ == "__main__":
    main()
