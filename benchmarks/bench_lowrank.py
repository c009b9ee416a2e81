"""Low-rank / full-rank kernels: numba vs the numpy composition vs the bandwidth bound.

P = 1,000,000, K = 50, float32 (Q is 200 MB). For a vector and a block of 16:
low-rank matvec Q(λ∘Qᵀx), fused full-rank matvec Q((λ−λ̃)∘Qᵀx) + λ̃x, quadratic
form xᵀAx, and the diagonal. numpy baselines are written the way a user
would (``Q @ (lam * (Q.T @ x))``; ``x @ (A @ x)``), in the same process, timed
in alternating groups (see ``_common.grouped``: per-call interleaving would
make numba's threads compete with OpenBLAS threads still spinning). The bound is the time to read Q once
(or twice for a matvec) at
the copy bandwidth measured here; a second bound adds the other arrays read
and written once each (x or X, read twice by a full-rank product, and the
result). Compile time is excluded (warm-up calls).
A second table times the two halves of a block product alone (QᵀX and QC,
float64 accumulation) against the single sgemm each replaces (float32
accumulation) and against the same product in float64 through BLAS (dgemm on a
float64 copy of Q, made before timing): what float64 accumulation costs when
BLAS does it.

    python benchmarks/bench_lowrank.py [--size 1000000] [--rank 50] [--repeats 7] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import time

import numba
import numpy as np
from _common import grouped, machine_info, ms, table

import hessop
from hessop.lowrank import kernels as _kernels


def copy_bandwidth(num_bytes: int, repeats: int = 5) -> float:
    """Bytes moved per second by a large memcpy (read + write counted)."""
    src = np.ones(num_bytes // 8)
    dst = np.empty_like(src)
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--rank", type=int, default=50)
    parser.add_argument("--block", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=2, help="alternating groups of repeats per function")
    args = parser.parse_args()
    print(machine_info())
    print(f"numba threads: {numba.get_num_threads()}; OMP/BLAS threads env: {os.environ.get('OMP_NUM_THREADS', 'unset')}")
    rng = np.random.default_rng(0)
    P, K = args.size, args.rank
    # Orthonormal Q without a P×K QR: a random Q scaled to near-orthonormal, then
    # exactly orthonormalised via Cholesky of its K×K Gram matrix.
    Q = rng.standard_normal((P, K)).astype(np.float32)
    gram = Q.T.astype(np.float64) @ Q.astype(np.float64)
    Q = np.ascontiguousarray((Q.astype(np.float64) @ np.linalg.inv(np.linalg.cholesky(gram)).T).astype(np.float32))
    lam = np.sort(rng.uniform(1.0, 10.0, K))[::-1].astype(np.float32)
    tail = float(lam[-1])
    low = hessop.LowRankOperator(Q, lam, check_orthonormal=False)
    full = hessop.FullRankOperator(Q, lam, tail, check_orthonormal=False)
    x = rng.standard_normal(P).astype(np.float32)
    X = rng.standard_normal((P, args.block)).astype(np.float32)
    bandwidth = copy_bandwidth(Q.nbytes)
    read_once = Q.nbytes / bandwidth
    print(
        f"P = {P:,}, K = {K}, float32: Q = {Q.nbytes / 1e6:.0f} MB; copy bandwidth {bandwidth / 1e9:.1f} GB/s "
        f"→ reading Q once ≥ {read_once * 1e3:.1f} ms"
    )

    lam_col = lam[:, None]
    shifted = (lam - tail).astype(np.float32)
    cases = {
        "low-rank matvec": (lambda: low @ x, lambda: Q @ (lam * (Q.T @ x)), 2, 2 * x.nbytes),
        f"low-rank block {args.block}": (lambda: low @ X, lambda: Q @ (lam_col * (Q.T @ X)), 2, 2 * X.nbytes),
        "full-rank matvec (fused)": (
            lambda: full @ x,
            lambda: Q @ (shifted * (Q.T @ x)) + tail * x,
            2,
            3 * x.nbytes,
        ),
        f"full-rank block {args.block}": (
            lambda: full @ X,
            lambda: Q @ (shifted[:, None] * (Q.T @ X)) + tail * X,
            2,
            3 * X.nbytes,
        ),
        "quadratic form xᵀAx (full rank)": (
            lambda: full.quadratic_form(x),
            lambda: x @ (Q @ (shifted * (Q.T @ x)) + tail * x),
            1,
            x.nbytes,
        ),
        f"quadratic forms, block {args.block}": (
            lambda: full.quadratic_form(X),
            lambda: np.einsum("ij,ij->j", X, Q @ (shifted[:, None] * (Q.T @ X)) + tail * X),
            1,
            X.nbytes,
        ),
        "diagonal": (lambda: full.diagonal(), lambda: tail + (Q * Q) @ shifted, 1, 8 * P),  # float64 result
    }
    rows = []
    for name, (ours, numpy_version, passes, other_bytes) in cases.items():
        result = grouped({"numba": ours, "numpy": numpy_version}, repeats=args.repeats, rounds=args.rounds)
        bound = passes * read_once
        bound_all = bound + other_bytes / bandwidth
        rows.append(
            [
                name,
                ms(result["numba"]["median"]),
                ms(result["numba"]["min"]),
                ms(result["numpy"]["median"]),
                ms(result["numpy"]["min"]),
                round(result["numba"]["median"] / result["numpy"]["median"], 2),
                round(result["numba"]["min"] / result["numpy"]["min"], 2),
                ms(bound),
                round(result["numba"]["median"] / bound, 2),
                ms(bound_all),
                round(result["numba"]["median"] / bound_all, 2),
            ]
        )
    headers = ["operation", "numba median ms", "min", "numpy median ms", "min", "÷ numpy (medians)", "(mins)"]
    bounds = ["bound ms (Q reads)", "median ÷ bound", "bound ms (all arrays)", "median ÷ bound (all)"]
    print(table([*headers, *bounds], rows))
    print()
    print(block_kernel_table(Q, lam_col, X, args))


def block_kernel_table(Q: np.ndarray, lam_col: np.ndarray, X: np.ndarray, args: argparse.Namespace) -> str:
    """QᵀX and QC alone: numba (float64 accumulation) vs sgemm vs dgemm on a float64 copy of Q."""
    Q64, X64 = Q.astype(np.float64), X.astype(np.float64)
    coefficients = lam_col * (Q64.T @ X64)  # float64, as the kernels take it
    coefficients32 = coefficients.astype(np.float32)
    expanded, expanded64 = np.empty_like(X), np.empty_like(X64)
    cases = {
        f"QᵀX, block {args.block}": {
            "numba": lambda: _kernels.project("numba", Q, X),
            "sgemm": lambda: Q.T @ X,
            "dgemm": lambda: Q64.T @ X64,
        },
        f"QC, block {args.block}": {
            "numba": lambda: _kernels.KERNELS["numba"]["expand"](Q, coefficients, X, 0.0, expanded),
            "sgemm": lambda: np.matmul(Q, coefficients32, out=expanded),
            "dgemm": lambda: np.matmul(Q64, coefficients, out=expanded64),
        },
    }
    rows = []
    for name, fns in cases.items():
        result = grouped(fns, repeats=args.repeats, rounds=args.rounds)
        median = {key: result[key]["median"] for key in fns}
        rows.append(
            [
                name,
                ms(median["numba"]),
                ms(median["sgemm"]),
                ms(median["dgemm"]),
                round(median["numba"] / median["sgemm"], 2),
                round(median["numba"] / median["dgemm"], 2),
            ]
        )
    headers = ["block kernel alone (medians)", "numba f64 acc. ms", "sgemm f32 ms", "dgemm f64 ms", "÷ sgemm", "÷ dgemm"]
    return table(headers, rows)


if __name__ == "__main__":
    main()
