"""Blocks on large models: hessop's block plan against one vectorised pass and against single products.

A block of k vectors vectorised in one pass costs about half of k single
products on a small MLP, but on large models its k-fold activations can
cost more per vector than single products. hessop's `BlockPlan`
(``hessop/operators/blocks.py``) then narrows the passes, by measured time
and by memory. For each model, a Hessian block of k = 10 three ways, in one
process, interleaved:

- ``10 single products``: ``H @ V[:, j]`` for each column;
- ``block, hessop's plan``: ``H @ V`` as users call it;
- ``block, one vectorised pass``: the same with the plan turned off (what
  hessop did before it had one).

Each row gives the median seconds and the rise of the process's peak
resident memory during one call (reset before it through
``/proc/self/clear_refs``). Models: the benchmark MLP (784-128-64-10,
P = 109 k), an MLP 784-1024-1024-10 (P ≈ 1.9 M) and MobileNetV2 on 32×32
images (P ≈ 2.2 M).

    python benchmarks/bench_block_large.py [--repeats 3] [--models mlp wide_mlp mobilenet]
"""

from __future__ import annotations

import argparse
import statistics
import time

import keras
import numpy as np
from _common import machine_info, table

import hessop
from hessop.dense.columns import MemoryProbe
from hessop.operators.blocks import BlockPlan

K = 10


def _kilobytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def peak_rise_mb(fn) -> tuple[float, float]:
    """(seconds, rise of the peak resident size in MB) of one call of ``fn``."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size
    except OSError:
        pass
    before = _kilobytes("VmRSS")
    began = time.perf_counter()
    fn()
    seconds = time.perf_counter() - began
    return seconds, (_kilobytes("VmHWM") - before) / 1024


def build(name: str):
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    if name == "mobilenet":
        model = keras.applications.MobileNetV2(input_shape=(32, 32, 3), weights=None, classes=10, classifier_activation=None)
        n, batch = 256, 128
        x = rng.normal(size=(n, 32, 32, 3)).astype("float32")
        label = f"MobileNetV2 32×32×3, N = {n}, batch {batch}"
    else:
        widths = (128, 64) if name == "mlp" else (1024, 1024)
        layers = [keras.Input((784,))] + [keras.layers.Dense(w, activation="tanh") for w in widths]
        model = keras.Sequential([*layers, keras.layers.Dense(10)])
        n, batch = 2048, 512
        x = rng.normal(size=(n, 784)).astype("float32")
        label = f"MLP 784-{'-'.join(map(str, widths))}-10 tanh, N = {n}, batch {batch}"
    y = rng.integers(0, 10, size=n)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return model, loss, (x, y), batch, label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=["mlp", "wide_mlp", "mobilenet"])
    args = parser.parse_args()
    print(machine_info())
    rows = []
    for name in args.models:
        model, loss, data, batch, label = build(name)
        H = hessop.HessianOperator(model, loss, data, batch_size=batch, hvp_mode="reverse")
        one_pass = hessop.HessianOperator(model, loss, data, batch_size=batch, hvp_mode="reverse")
        plan = one_pass._forward_plan = one_pass._adjoint_plan = BlockPlan(MemoryProbe(on_host=False))
        plan._narrow = lambda: None  # never narrows: every block in one pass
        P = H.shape[0]
        V = np.random.default_rng(1).normal(size=(P, K)).astype("float32")
        cases = {
            "10 single products": lambda H=H, V=V: [H @ V[:, j] for j in range(K)],
            "block, hessop's plan": lambda H=H, V=V: H @ V,
            "block, one vectorised pass": lambda one_pass=one_pass, V=V: one_pass @ V,
        }
        for fn in cases.values():  # traces, the plan's memory trial and its first timings
            fn()
            fn()
        samples: dict[str, list[tuple[float, float]]] = {case: [] for case in cases}
        for r in range(args.repeats):
            for case in list(cases)[:: 1 if r % 2 == 0 else -1]:
                samples[case].append(peak_rise_mb(cases[case]))
        singles = statistics.median(s for s, _ in samples["10 single products"])
        for case, values in samples.items():
            seconds = statistics.median(s for s, _ in values)
            rows.append(
                [label if case == "10 single products" else "", f"{P:,}" if case == "10 single products" else "", case]
                + [round(seconds, 3), round(seconds / singles, 2), round(max(m for _, m in values))]
            )
        p = H._forward_plan
        print(
            f"{label}: the plan's widest pass {p.max_width or K} (memory allows {p.memory_width}, "
            f"{(p.bytes_per_vector or 0) / 2**20:.0f} MB a vector measured)"
        )
    print()
    print(table(["model", "P", "k = 10", "median s", "÷ 10 singles", "peak rise MB"], rows))


if __name__ == "__main__":
    main()
