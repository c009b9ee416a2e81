"""Accuracy and cost of eigen(G, method="ipca") against Lanczos, by oversample.

Digits MLP 64-16-10 (tanh), trained 15 epochs, float64, N = 1,797 in batches
of 600 (P = 1,210): the top-5 eigenvalues of the OPG matrix G from the one-pass
uncentred incremental SVD vs ``eigsh`` to tolerance 1e-10, and a centred
IncrementalPCA of the same gradients for contrast.

    python benchmarks/bench_ipca.py
"""

from __future__ import annotations

import time

import keras
import numpy as np
from _common import machine_info, table
from sklearn.datasets import load_digits
from sklearn.decomposition import IncrementalPCA

import hessop


def main() -> None:
    print(machine_info())
    digits = load_digits()
    x, y = digits.data / 16.0, digits.target
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((64,), dtype="float64"),
            keras.layers.Dense(16, activation="tanh", dtype="float64"),
            keras.layers.Dense(10, dtype="float64"),
        ]
    )
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None, dtype="float64")
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=loss_fn)
    model.fit(x, y, epochs=15, batch_size=128, verbose=0)
    G = hessop.OPGOperator(model, loss_fn, (x, y), batch_size=600)
    k = 5
    start = time.perf_counter()
    reference, ref_vectors = hessop.eigen(G, k=k, tol=1e-10)
    lanczos_time = time.perf_counter() - start
    print(f"P = {G.shape[0]:,}, N = {G.num_data}; Lanczos: {lanczos_time:.2f} s")
    rows = []
    for oversample in (0, 10, 20, 40, 80):
        start = time.perf_counter()
        values, vectors = hessop.eigen(G, k=k, method="ipca", oversample=oversample)
        elapsed = time.perf_counter() - start
        error = np.max(np.abs(values - reference) / reference)
        cosines = np.linalg.svd(ref_vectors.T @ vectors, compute_uv=False)
        rows.append([oversample, f"{error:.1e}", f"{np.sqrt(max(0.0, 1 - cosines.min() ** 2)):.1e}", round(elapsed, 2)])
    J = np.vstack(list(G.per_example_gradients()))
    centred = IncrementalPCA(n_components=k, batch_size=600).fit(J).singular_values_ ** 2 / G.num_data
    rows.append(["centred IncrementalPCA (sklearn)", f"{np.max(np.abs(centred - reference) / reference):.1e}", "-", "-"])
    print(table(["oversample", "max rel. error, top-5 eigenvalues", "subspace sin θ", "seconds"], rows))


if __name__ == "__main__":
    main()
