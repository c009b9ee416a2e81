"""Command line: ``python -m hessop demo``.

Trains a small Keras MLP on scikit-learn's bundled digits data (no download)
and reports the curvature of its training loss: the top Hessian eigenvalues
from ``eigsh``, a trace estimate, the spectral density, and a picture of it.
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


def _output_path(text: str) -> str:
    # Checked before training, not after a minute of it.
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        msg = f"expected a file in an existing folder, got {text} (no folder {folder})"
        raise argparse.ArgumentTypeError(msg)
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hessop", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="train a digits MLP and report its Hessian's spectrum",
        description="Train a Keras MLP on scikit-learn's digits and report its Hessian: top eigenvalues, "
        "trace, spectral density and a spectrum picture.",
    )
    demo.add_argument("--hidden", type=_positive_int, default=32, help="hidden units of the MLP (default 32)")
    demo.add_argument("--epochs", type=_positive_int, default=30, help="training epochs (default 30)")
    demo.add_argument("--k", type=_positive_int, default=5, help="number of top eigenvalues (default 5)")
    demo.add_argument("--batch-size", type=_positive_int, default=512, help="mini-batch size of the Hessian passes (default 512)")
    demo.add_argument("--trace-matvecs", type=_positive_int, default=60, help="Hutch++ products for the trace (default 60)")
    demo.add_argument("--lanczos", type=_positive_int, default=30, help="Lanczos steps for the spectral density (default 30)")
    demo.add_argument(
        "--output",
        type=_output_path,
        default="hessop-demo-spectrum.png",
        help="spectrum picture (default hessop-demo-spectrum.png)",
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    return parser


def run_demo(args: argparse.Namespace) -> int:
    import keras
    from sklearn.datasets import load_digits

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

    # Each product is one compiled pass over the data; the bars below count products.
    H = hessop.HessianOperator(model, loss_fn, (x, y), batch_size=args.batch_size)
    P = H.shape[0]
    print(f"training loss (mean cross-entropy): {H.loss:.4f}")
    print(f"Hessian: P = {P:,} parameters, {H.num_data} examples, {H._batches.num_batches} batches of <= {args.batch_size}")
    if args.k >= P:
        print(f"error: --k {args.k} must be smaller than P = {P}", file=sys.stderr)
        return 2

    start, before = time.perf_counter(), H.num_products
    eigenvalues, _ = hessop.eigen(H, args.k, which="LA", tol=1e-4, seed=args.seed, progress=True)
    elapsed = time.perf_counter() - start
    print(f"top-{args.k} Hessian eigenvalues ({elapsed:.1f} s, {H.num_products - before} matvecs):")
    for i, value in enumerate(eigenvalues, 1):
        print(f"  eigenvalue {i}: {value:.6g}")

    start = time.perf_counter()
    trace = hessop.trace(H, method="hutch++", num_matvecs=args.trace_matvecs, seed=args.seed, progress=True)
    print(f"trace estimate (Hutch++, {args.trace_matvecs} matvecs, {time.perf_counter() - start:.1f} s): {trace:.5g}")

    start = time.perf_counter()
    density = hessop.spectral_density(H, num_lanczos=min(args.lanczos, P), num_probes=6, seed=args.seed, progress=True)
    print(f"{density} ({time.perf_counter() - start:.1f} s)")

    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        print('no picture: matplotlib is not installed (pip install "hessop[plot]")')
        return 0
    ax = hessop.plot_spectrum(density, eigenvalues, title=f"Hessian spectrum, digits MLP (P = {P:,})")
    ax.figure.savefig(args.output, dpi=120, bbox_inches="tight")
    print(f"spectrum picture written to {args.output}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        return run_demo(args)
    return 2  # pragma: no cover - argparse enforces the sub-command


if __name__ == "__main__":
    sys.exit(main())
