"""Command line: ``python -m hessop demo``.

Trains a small Keras MLP on scikit-learn's bundled digits data (no download)
and prints the top Hessian eigenvalues of its training loss from `eigsh`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        msg = f"expected a positive integer, got {text}"
        raise argparse.ArgumentTypeError(msg)
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hessop", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a digits MLP and print its top Hessian eigenvalues")
    demo.add_argument("--hidden", type=_positive_int, default=32, help="hidden units of the MLP (default 32)")
    demo.add_argument("--epochs", type=_positive_int, default=30, help="training epochs (default 30)")
    demo.add_argument("--k", type=_positive_int, default=5, help="number of top eigenvalues (default 5)")
    demo.add_argument("--batch-size", type=_positive_int, default=512, help="mini-batch size of the Hessian passes (default 512)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    return parser


def run_demo(args: argparse.Namespace) -> int:
    import keras
    import numpy as np
    import scipy.sparse.linalg as sla
    from sklearn.datasets import load_digits
    from tqdm.auto import tqdm

    import hessop

    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    y = digits.target.astype("int32")
    keras.utils.set_random_seed(args.seed)
    model = keras.Sequential(
        [
            keras.Input((x.shape[1],)),
            keras.layers.Dense(args.hidden, activation="tanh"),
            keras.layers.Dense(10),
        ]
    )
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=loss_fn)
    print(f"digits: N = {len(x)} images of {x.shape[1]} pixels; MLP {x.shape[1]}-{args.hidden}-10")
    start = time.perf_counter()
    model.fit(x, y, epochs=args.epochs, batch_size=128, verbose=0)
    print(f"trained {args.epochs} epochs in {time.perf_counter() - start:.1f} s")

    H = hessop.HessianOperator(model, loss_fn, (x, y), batch_size=args.batch_size)
    print(f"training loss (mean cross-entropy): {H.loss:.4f}")
    print(f"Hessian: P = {H.shape[0]:,} parameters, {H.num_data} examples, {len(H._batches.batch_sizes)} batches")
    if args.k >= H.shape[0]:
        print(f"error: --k {args.k} must be smaller than P = {H.shape[0]}", file=sys.stderr)
        return 2

    with tqdm(desc="eigsh (Hessian matvecs)", unit="matvec") as bar:

        def counted_matvec(v: np.ndarray) -> np.ndarray:
            bar.update(1)
            return H.matvec(v)

        counted = sla.LinearOperator(H.shape, matvec=counted_matvec, dtype=H.dtype)
        start = time.perf_counter()
        eigenvalues = sla.eigsh(counted, k=args.k, which="LA", tol=1e-4, return_eigenvectors=False)
        elapsed = time.perf_counter() - start
    eigenvalues = np.sort(eigenvalues)[::-1]
    print(f"top-{args.k} Hessian eigenvalues ({elapsed:.1f} s):")
    for i, value in enumerate(eigenvalues, 1):
        print(f"  eigenvalue {i}: {value:.6g}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        return run_demo(args)
    return 2  # pragma: no cover - argparse enforces the sub-command


if __name__ == "__main__":
    sys.exit(main())
