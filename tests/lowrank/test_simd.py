"""The opt-in LLVM-IR register tile against a plain loop; the block kernels (default and opt-in) for an AVX2 target."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from numba import njit

from hessop.lowrank import simd as _simd

W = _simd.VECTOR_WIDTH
TILES = {
    (rows, vectors): _simd.outer_product_tile(rows, vectors)
    for rows, vectors in [(1, 1), (3, 2), (_simd.TILE_ROWS, 2), (_simd.TILE_ROWS, 1)]
}


def reference_tile(rows, vectors, A, a_off, a_step, a_row, B, b_off, b_step, count, acc, c_off, c_row):
    acc = acc.copy()
    for t in range(count):
        for r in range(rows):
            for v in range(vectors):
                b = B[b_off + t * b_step + v * W : b_off + t * b_step + (v + 1) * W]
                acc[c_off + r * c_row + v * W : c_off + r * c_row + (v + 1) * W] += A[a_off + t * a_step + r * a_row] * b
    return acc


def jitted_call(tile):
    @njit
    def call(A, a_off, a_step, a_row, B, b_off, b_step, count, acc, c_off, c_row):
        tile(A, a_off, a_step, a_row, B, b_off, b_step, count, acc, c_off, c_row)

    return call


@pytest.mark.parametrize(("rows", "vectors"), list(TILES))
@pytest.mark.parametrize("count", [0, 1, 7])
def test_tile_matches_a_plain_loop(rows, vectors, count):
    # Offsets and steps chosen so that no two of A's, B's or acc's indices coincide
    # by accident and the vectors are unaligned; acc starts non-zero (it accumulates).
    rng = np.random.default_rng(rows * 100 + vectors * 10 + count)
    a_off, a_step, a_row = 3, rows + 2, 1
    b_off, b_step = 1, vectors * W + 5
    c_off, c_row = 2, vectors * W + 3
    A = rng.normal(size=a_off + max(count, 1) * a_step + rows)
    B = rng.normal(size=b_off + max(count, 1) * b_step + vectors * W)
    acc = rng.normal(size=c_off + rows * c_row + vectors * W + 4)
    args = (A, a_off, a_step, a_row, B, b_off, b_step, count, acc, c_off, c_row)
    expected = reference_tile(rows, vectors, *args)
    jitted_call(TILES[rows, vectors])(*args)
    assert np.allclose(acc, expected, rtol=1e-14, atol=1e-14)
    untouched = np.ones(acc.size, dtype=bool)
    for r in range(rows):
        untouched[c_off + r * c_row : c_off + r * c_row + vectors * W] = False
    assert np.array_equal(acc[untouched], expected[untouched])  # nothing outside the tile is written


def test_tile_refuses_other_array_types():
    call = jitted_call(TILES[1, 1])
    with pytest.raises(Exception, match="(?i)typing"):
        call(np.zeros(W, dtype=np.float32), 0, 1, 1, np.zeros(W), 0, W, 1, np.zeros(W), 0, W)
    with pytest.raises(ValueError, match="rows and vectors"):
        _simd.outer_product_tile(0, 1)


AVX2_CHECK = textwrap.dedent(
    """
    import numpy as np
    import sys
    from hessop.lowrank import kernels as _kernels
    from hessop.lowrank import tiles as _tiles
    assert (_tiles.VECTOR_WIDTH, _tiles.TILE_ROWS) == (4, 4), (_tiles.VECTOR_WIDTH, _tiles.TILE_ROWS)
    assert ("hessop.lowrank.simd" in sys.modules) == _tiles.SIMD_TILES
    rng = np.random.default_rng(0)
    for size, rank, width in [(1001, 50, 16), (130, 7, 17), (9000, 13, 5), (3, 5, 3)]:
        for dtype in (np.float32, np.float64):
            Q = rng.normal(size=(size, rank)).astype(dtype)
            X = rng.normal(size=(size, width)).astype(dtype)
            shifted = rng.normal(size=rank)
            for name in ("apply", "quadratic_form"):
                fast = getattr(_kernels, name)("numba", Q, shifted, 0.3, X)
                reference = getattr(_kernels, name)("numpy", Q, shifted, 0.3, X)
                for f, r in zip(fast, reference):
                    tol = 1e-5 if dtype == np.float32 else 1e-12
                    assert np.allclose(f, r, rtol=tol, atol=tol * np.abs(r).max()), (name, size, rank, width, dtype)
    print("ok")
    """
)


def test_the_default_kernels_never_load_the_llvm_ir():
    code = (
        "import sys, numpy as np\n"
        "from hessop.lowrank import kernels\n"
        "Q, X = np.ones((50, 3), np.float32), np.ones((50, 4), np.float32)\n"
        "kernels.apply('numba', Q, np.ones(3), 0.5, X)\n"
        "assert 'hessop.lowrank.simd' not in sys.modules\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "HESSOP_SIMD_TILES"}
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_block_kernels_for_an_avx2_target(tmp_path):
    # This machine may have AVX-512; compiling for AVX2 (the CPU numba targets is
    # set by environment) takes the other tile sizes: 4-double vectors, 4-row tiles.
    env = dict(
        os.environ,
        HESSOP_SIMD_TILES="1",
        NUMBA_CPU_NAME="haswell",
        NUMBA_CPU_FEATURES="+64bit,+avx,+avx2,+fma,+sse,+sse2,+sse3,+ssse3,+sse4.1,+sse4.2,+popcnt,+cx16,+f16c,+bmi,+bmi2,+lzcnt,+movbe",
        NUMBA_CACHE_DIR=str(tmp_path),
    )
    result = subprocess.run([sys.executable, "-c", AVX2_CHECK], check=False, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"
