"""Per-example rows of J (gradients, output Jacobians) and predictive_variance, against tape.jacobian.

hessop computes one derivative per example, vectorised over the batch
(``tf.vectorized_map`` of a batch of one). The baseline is TensorFlow's
``GradientTape.jacobian`` of the whole batch's losses (or flattened outputs)
with pfor, which hessop used before: it runs B (or B·C) backward passes
through all B examples, so its time and memory grow like B².

Each (route, target, batch) runs in its own subprocess, so that its peak RSS
(ru_maxrss) is its own: the growth over the RSS before the first call is
reported beside the median of repeated calls (the first call, which traces,
separately). The results of the two routes are compared in the same run.
Then ``predictive_variance`` over N examples in chunks, against the earlier
implementation reproduced here (a JacobianOperator per chunk and
``J.H @ np.eye(B·C)``).

    python benchmarks/bench_per_example.py
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

from _common import interleaved, machine_info, table

INPUTS, HIDDEN, CLASSES = 64, 64, 10


def _setup(batch: int):
    import keras
    import numpy as np

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((INPUTS,)), keras.layers.Dense(HIDDEN, activation="tanh"), keras.layers.Dense(CLASSES)])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, INPUTS)).astype("float32")
    y = rng.integers(0, CLASSES, size=batch).astype("int32")
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    return model, loss_fn, x, y


def _tape_jacobian(model, loss_fn, target: str):
    import tensorflow as tf

    variables = model.trainable_variables

    @tf.function(reduce_retracing=True)
    def rows(x, y):
        with tf.GradientTape() as tape:
            out = loss_fn(y, model(x, training=False)) if target == "loss" else tf.reshape(model(x, training=False), [-1])
        blocks = tape.jacobian(out, variables, experimental_use_pfor=True)
        return tf.concat([tf.reshape(b, (tf.shape(out)[0], -1)) for b in blocks], axis=1)

    return lambda x, y: rows(x, y).numpy()


def child(route: str, target: str, batch: int) -> dict:
    import time

    import numpy as np

    import hessop

    model, loss_fn, x, y = _setup(batch)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if route == "hessop":
        J = hessop.JacobianOperator(model, loss_fn, (x, y), target=target, check_deterministic=False)

        def run():
            return np.vstack(list(J.row_blocks()))
    else:
        rows = _tape_jacobian(model, loss_fn, target)

        def run():
            return rows(x, y)

    start = time.perf_counter()
    result = run()
    first = time.perf_counter() - start
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        run()
        samples.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    np.save(f"/tmp/bench_per_example_{route}_{target}_{batch}.npy", result)
    return {
        "first": first,
        "median": float(np.median(samples)),
        "growth_mb": (peak - before) / 1024,
        "result_mb": result.nbytes / 2**20,
    }


def rows_table() -> str:
    import os

    import numpy as np

    rows = []
    for target in ("loss", "outputs"):
        for batch in (256, 1024, 4096):
            results = {}
            for route in ("hessop", "tape.jacobian"):
                out = subprocess.run(
                    [sys.executable, __file__, "--child", route, target, str(batch)], capture_output=True, text=True, timeout=1800
                )
                lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
                # A child killed by the kernel (out of memory) leaves no result: say so in the table.
                results[route] = json.loads(lines[-1]) if lines else {"failed": f"exit {out.returncode}"}
            saved = {r: f"/tmp/bench_per_example_{r}_{target}_{batch}.npy" for r in results}
            present = [os.path.exists(path) for path in saved.values()]
            diff = "-"
            if all(present):
                a, b = (np.load(saved[r]) for r in ("hessop", "tape.jacobian"))
                diff = f"{float(np.max(np.abs(a - b)) / np.max(np.abs(b))):.1e}"
            for path, exists in zip(saved.values(), present):
                if exists:
                    os.remove(path)
            h, t = results["hessop"], results["tape.jacobian"]

            def cell(result, key, scale=1.0, digits=2):
                return result["failed"] if "failed" in result else round(result[key] * scale, digits)

            ratio = "-" if "failed" in h or "failed" in t else round(t["median"] / h["median"], 1)
            rows.append(
                [
                    target,
                    batch,
                    cell(h, "result_mb", digits=1),
                    cell(h, "median", 1e3),
                    cell(t, "median", 1e3),
                    ratio,
                    cell(h, "first"),
                    cell(t, "first"),
                    cell(h, "growth_mb", digits=0),
                    cell(t, "growth_mb", digits=0),
                    diff,
                ]
            )
    headers = [
        "rows of",
        "B",
        "result MB",
        "hessop median ms",
        "tape.jacobian median ms",
        "tape.jacobian ÷ hessop",
        "hessop first s",
        "tape.jacobian first s",
        "hessop peak growth MB",
        "tape.jacobian peak growth MB",
        "max rel. diff",
    ]
    return table(headers, rows)


def predictive_table(num_data: int = 2048, batch_size: int = 256) -> str:
    import numpy as np

    import hessop

    model, loss_fn, x, y = _setup(num_data)
    P = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    cov = hessop.LowRankOperator(
        np.linalg.qr(np.random.default_rng(1).normal(size=(P, 20)))[0].astype("float32"), np.linspace(1, 2, 20)
    )

    def per_chunk_operators():  # the implementation before: one operator and J.H @ I per chunk
        blocks = []
        for start in range(0, num_data, batch_size):
            jf = hessop.JacobianOperator(
                model, None, (x[start : start + batch_size], None), target="outputs", check_deterministic=False
            )
            jt = jf.rmatmat(np.eye(jf.shape[0], dtype=jf.dtype))
            sj = np.asarray(cov.matmat(jt.astype(cov.dtype)), dtype=np.float64)
            jt3 = jt.reshape(-1, jt.shape[1] // CLASSES, CLASSES).astype(np.float64)
            blocks.append(np.einsum("pnc,pnd->ncd", jt3, sj.reshape(jt3.shape)))
        return np.concatenate(blocks)

    def current():
        return hessop.predictive_variance(model, x, cov, batch_size=batch_size)

    diff = float(np.max(np.abs(current() - per_chunk_operators())) / np.max(np.abs(per_chunk_operators())))
    timings = interleaved({"hessop": current, "per-chunk operators": per_chunk_operators}, repeats=3, warmup=1)
    h, o = timings["hessop"], timings["per-chunk operators"]
    return (
        f"predictive_variance, N = {num_data}, batch_size = {batch_size}, C = {CLASSES}, P = {P:,}, "
        "low-rank covariance (K = 20); both routes build their operators inside each call\n"
        + table(
            ["route", "median s", "min s", "ratio of medians to hessop", "max rel. diff"],
            [
                ["hessop.predictive_variance", round(h["median"], 3), round(h["min"], 3), 1.0, "-"],
                [
                    "per-chunk JacobianOperator + J.H @ I",
                    round(o["median"], 3),
                    round(o["min"], 3),
                    round(o["median"] / h["median"], 1),
                    f"{diff:.1e}",
                ],
            ],
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        route, target, batch = args.child
        print(json.dumps(child(route, target, int(batch))))
        return
    print(machine_info())
    print(f"MLP {INPUTS}-{HIDDEN}-{CLASSES} tanh, float32, one batch of B examples; median of 5 calls after the first")
    print(rows_table())
    print()
    print(predictive_table())


if __name__ == "__main__":
    main()
