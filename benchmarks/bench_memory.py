"""Peak memory of Hessian matvecs: it must not grow with N, nor like P².

Each configuration runs in its own subprocess. The data are built and the
operator constructed first (RSS "before"), then five matvecs run and the peak
RSS (ru_maxrss) is read. The growth (peak − before) is compared with one
batch's activations and a few P-vectors, and with what a dense P×P Hessian
would take. Then the same for blocks of 10 vectors (``H @ V``, traced first),
against ten times that bound.

    python benchmarks/bench_memory.py
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

from _common import machine_info, table

BLOCK = 10


def child(num_data: int, hidden: int, batch_size: int) -> dict:
    import keras
    import numpy as np

    import hessop

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(hidden, activation="tanh"), keras.layers.Dense(10)])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(num_data, 784)).astype("float32")
    y = rng.integers(0, 10, size=num_data).astype("int32")
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    H = hessop.HessianOperator(model, loss_fn, (x, y), batch_size=batch_size, hvp_mode="reverse")
    vector = np.ones(H.shape[0], dtype=np.float32)
    H @ vector  # trace once: tracing memory is not a matvec's
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(5):
        H @ vector
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    block = np.ones((H.shape[0], BLOCK), dtype=np.float32)
    H @ block  # trace the block product
    before_block = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(5):
        H @ block
    peak_block = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "P": H.shape[0],
        "before_mb": before / 1024,
        "growth_mb": (peak - before) / 1024,
        "block_growth_mb": (peak_block - before_block) / 1024,
        "data_mb": x.nbytes / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    print(machine_info())
    rows = []
    batch = 512
    for num_data, hidden in [(2048, 128), (16384, 128), (2048, 512), (16384, 512)]:
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(num_data), str(hidden), str(batch)],
            capture_output=True,
            text=True,
            timeout=900,
        )
        result = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
        P = result["P"]
        activations_mb = batch * (784 + hidden + 10) * 4 * 3 / 2**20  # forward, backward, second backward
        vectors_mb = 6 * P * 4 / 2**20
        dense_mb = P * P * 4 / 2**20
        bound_mb = activations_mb + vectors_mb
        rows.append(
            [
                num_data,
                f"{P:,}",
                round(result["data_mb"], 1),
                round(result["before_mb"]),
                round(result["growth_mb"], 1),
                round(bound_mb, 1),
                round(result["block_growth_mb"], 1),
                round(BLOCK * bound_mb, 1),
                f"{dense_mb:,.0f}",
            ]
        )
    print(f"MLP 784-h-10, batch {batch}, float32, reverse-over-reverse HVPs, blocks of {BLOCK}")
    headers = [
        "N",
        "P",
        "data MB",
        "RSS before MB",
        "peak growth over 5 matvecs MB",
        "1 batch activations + 6 P-vectors MB",
        "peak growth over 5 blocks MB",
        f"{BLOCK} × that bound MB",
        "dense P×P MB",
    ]
    print(table(headers, rows))


if __name__ == "__main__":
    main()
