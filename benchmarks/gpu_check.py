"""One check for whoever has a GPU: correctness on the model zoo, then the headline timings.

About five minutes. On a machine without a GPU it runs on the CPU and says so.

1. The contract tests (``tests/test_contract.py``: every operator on every
   model of the zoo, against finite differences and first-order references)
   and the fused-pass tests (``tests/test_passes.py``), on the default device.
2. Each data-pass operator's matvec against the fused hand-written product and
   the fused gradient (``bench_fused.py``) on the MLP, CNN and transformer.
3. A block of 10 vectors against 10 single products of H, GGN and OPG on the
   MLP (one data pass for the block).

Paste the whole output into an issue.

    python benchmarks/gpu_check.py [--repeats 7] [--skip-tests]
"""

from __future__ import annotations

import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_tests() -> int:
    import pytest

    tests = [str(ROOT / "tests" / "test_contract.py"), str(ROOT / "tests" / "test_passes.py")]
    return int(pytest.main(["-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT), *tests]))


def block_rows(repeats: int) -> list[list]:
    import keras
    import numpy as np
    from _common import interleaved, ms
    from bench_fused import model_and_data

    import hessop

    rng = np.random.default_rng(0)
    model, x, y, batch, _ = model_and_data("mlp", rng)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    rows = []
    for name in ("HessianOperator", "GGNOperator", "OPGOperator"):
        op = getattr(hessop, name)(model, loss_fn, (x, y), batch_size=batch)
        block = rng.normal(size=(op.shape[1], 10)).astype("float32")
        times = interleaved(
            {"block": lambda op=op, block=block: op @ block, "singles": lambda op=op, block=block: [op @ v for v in block.T]},
            repeats=repeats,
        )
        ratio = times["block"]["median"] / times["singles"]["median"]
        rows.append([name, ms(times["block"]["median"]), ms(times["singles"]["median"]), ratio])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--skip-tests", action="store_true", help="only the timings")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    status = None if args.skip_tests else run_tests()

    import numpy as np
    import tensorflow as tf
    from _common import machine_info, table
    from bench_fused import run

    gpus = tf.config.list_physical_devices("GPU")
    print("\n" + machine_info())
    print(f"GPUs: {[gpu.name for gpu in gpus]}" if gpus else "no GPU found: everything below ran on the CPU")
    if status is not None:
        print(f"contract and fused-pass tests: {'passed' if status == 0 else f'FAILED (pytest exit code {status})'}")
    rng = np.random.default_rng(0)
    rows = []
    for name in ("mlp", "cnn", "transformer"):
        rows += run(name, args.repeats, rng)
    print()
    print(table(["model", "operator", "hessop matvec ms", "fused hand-written ms", "÷ hand-written", "÷ fused gradient"], rows))
    print("\nblock of 10 vectors, MLP (one data pass) against 10 single products:")
    print(table(["operator", "block ms", "10 singles ms", "block ÷ singles"], block_rows(args.repeats)))
    sys.exit(0 if status in (None, 0) else 1)


if __name__ == "__main__":
    main()
