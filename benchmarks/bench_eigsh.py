"""eigsh / lobpcg on a HessianOperator: time and matvec count for k = 1, 5, 20.

Same MLP as bench_hvp.py (784-128-64-10 tanh, N = 2048, batch 512, float32).
Also compares a matvec's time alone with its average time inside ``eigsh``
(where numpy's BLAS threads and TensorFlow's threads could compete), and the
P-scaling of one matvec over several model widths.

    python benchmarks/bench_eigsh.py [--k 1 5 20]
"""

from __future__ import annotations

import argparse
import time

import keras
import numpy as np
import scipy.sparse.linalg as sla
from _common import interleaved, machine_info, ms, table
from bench_hvp import data, mlp

import hessop


class Counted(sla.LinearOperator):
    """Counts products and the time spent in them."""

    def __init__(self, op):
        self.op, self.calls, self.columns, self.seconds = op, 0, 0, 0.0
        super().__init__(dtype=op.dtype, shape=op.shape)

    def _matvec(self, x):
        return self._matmat(x.reshape(-1, 1)).reshape(-1)

    def _matmat(self, X):
        start = time.perf_counter()
        out = self.op @ X
        self.seconds += time.perf_counter() - start
        self.calls += 1
        self.columns += X.shape[1]
        return out

    def _adjoint(self):
        return self


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, nargs="+", default=[1, 5, 20])
    args = parser.parse_args()
    print(machine_info())
    model = mlp()
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    x, y = data(2048)
    H = hessop.HessianOperator(model, loss_fn, (x, y), batch_size=512)
    P = H.shape[0]
    print(f"model: MLP 784-128-64-10 tanh, N = 2048, batch 512, float32, P = {P:,}")
    alone = interleaved({"matvec": lambda: H @ np.ones(P, dtype=np.float32)}, repeats=7)["matvec"]["median"]
    rows = []
    for k in args.k:
        counted = Counted(H)
        start = time.perf_counter()
        values = sla.eigsh(counted, k=k, which="LA", tol=1e-4, return_eigenvectors=False, v0=np.ones(P, dtype=np.float32))
        total = time.perf_counter() - start
        rows.append(
            [
                "eigsh",
                k,
                round(total, 2),
                counted.calls,
                counted.columns,
                ms(counted.seconds / counted.calls),
                round(float(np.max(values)), 4),
            ]
        )
        counted = Counted(H)
        start = time.perf_counter()
        block = np.random.default_rng(0).normal(size=(P, max(k, 2))).astype(np.float32)
        values = sla.lobpcg(counted, block, tol=1e-4, maxiter=100, largest=True)[0]
        total = time.perf_counter() - start
        rows.append(
            [
                "lobpcg (block products)",
                k,
                round(total, 2),
                counted.calls,
                counted.columns,
                ms(counted.seconds / counted.calls),
                round(float(np.max(values)), 4),
            ]
        )
    print(f"\none Hessian matvec alone: {ms(alone)} ms")
    print(table(["solver", "k", "seconds", "operator calls", "vectors", "ms per call inside solver", "top eigenvalue"], rows))

    rows = []
    for hidden in (32, 128, 512):
        keras.utils.set_random_seed(0)
        model_p = keras.Sequential([keras.Input((784,)), keras.layers.Dense(hidden, activation="tanh"), keras.layers.Dense(10)])
        Hp = hessop.HessianOperator(model_p, loss_fn, (x, y), batch_size=512)
        vector = np.ones(Hp.shape[0], dtype=np.float32)
        t = interleaved({"H": lambda Hp=Hp, vector=vector: Hp @ vector}, repeats=5)["H"]["median"]
        rows.append([f"784-{hidden}-10", f"{Hp.shape[0]:,}", ms(t), round(t / Hp.shape[0] * 1e9, 1)])
    print("\nHessian matvec vs P (N = 2048):")
    print(table(["model", "P", "median ms", "ns per parameter"], rows))


if __name__ == "__main__":
    main()
