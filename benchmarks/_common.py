"""Shared helpers for the benchmark scripts: timing, machine info, tables.

Benchmarks are scripts, not tests: run ``python benchmarks/bench_hvp.py``.
Each reports the median and minimum of repeated runs after a warm-up, and
ratios against baselines measured interleaved in the same process.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import contextlib
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any


def machine_info() -> str:
    import numba
    import numpy
    import scipy
    import tensorflow as tf

    try:
        import keras

        keras_version = keras.__version__
    except ImportError:  # pragma: no cover
        keras_version = "-"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpus = tf.config.list_physical_devices("GPU")
    return (
        f"machine: {cpu}, {os.cpu_count()} cores, {'GPU: ' + str(len(gpus)) if gpus else 'no GPU'}; "
        f"python {platform.python_version()}, tensorflow {tf.__version__}, keras {keras_version}, "
        f"numpy {numpy.__version__}, scipy {scipy.__version__}, numba {numba.__version__}"
    )


def time_calls(fn: Callable[[], Any], *, repeats: int = 7, warmup: int = 2) -> dict[str, float]:
    """Median and min seconds of ``repeats`` calls after ``warmup`` calls; first-call time separately."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    for _ in range(max(warmup - 1, 0)):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return {"first": first, "median": statistics.median(samples), "min": min(samples)}


def interleaved(fns: dict[str, Callable[[], Any]], *, repeats: int = 7, warmup: int = 2) -> dict[str, dict[str, float]]:
    """Time several functions round-robin so machine noise hits all of them alike."""
    firsts = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        fn()
        firsts[name] = time.perf_counter() - start
        for _ in range(max(warmup - 1, 0)):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: {"first": firsts[name], "median": statistics.median(s), "min": min(s)} for name, s in samples.items()}


def grouped(
    fns: dict[str, Callable[[], Any]], *, repeats: int = 7, rounds: int = 2, pause: float = 0.3
) -> dict[str, dict[str, float]]:
    """Time each function's repeats back to back, alternating the order over rounds.

    For multi-threaded kernels: OpenBLAS worker threads keep spinning for a
    while after a BLAS call, so per-call interleaving makes whichever code runs
    right after numpy compete with them. A pause before each group lets the
    previous group's threads go idle.
    """
    firsts = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        fn()
        firsts[name] = time.perf_counter() - start
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            time.sleep(pause)
            for _ in range(repeats):
                start = time.perf_counter()
                fns[name]()
                samples[name].append(time.perf_counter() - start)
    return {name: {"first": firsts[name], "median": statistics.median(s), "min": min(s)} for name, s in samples.items()}


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells[1:]]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def ms(seconds: float) -> float:
    return round(seconds * 1e3, 2)


@contextlib.contextmanager
def hessop_pfor_rules() -> Iterator[None]:
    """Operators traced inside this block vectorise with hessop's pfor rules (``HESSOP_PFOR_RULES=1``).

    By default the engine uses TensorFlow's rules (hessop's patch a private
    registry); this gives the opt-in side by side with the default. Only
    tracing is affected: call the operator's block product once inside the block.
    """
    before = os.environ.get("HESSOP_PFOR_RULES")
    os.environ["HESSOP_PFOR_RULES"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["HESSOP_PFOR_RULES"]
        else:
            os.environ["HESSOP_PFOR_RULES"] = before
