"""Which block kernels run, and the register-tile sizes of the opt-in ones.

By default the block products of the low-rank kernels (m ≥ 2 vectors) go
through float64 BLAS (dgemm) on chunks of rows converted to float64.
``HESSOP_SIMD_TILES=1`` (read at import) swaps in numba kernels built on
`hessop.lowrank.simd`'s register tiles, written in LLVM IR, which also
accumulate in float64 but at about float32 sgemm's speed. They rely on llvmlite's IR builder and numba's
code-generation helpers, whose interfaces may change with their releases,
so they are opt-in; ``bench_lowrank.py`` compares the two.
"""

from __future__ import annotations

import os

import llvmlite.binding
import numba

__all__ = ["SIMD_TILES", "TILE_ROWS", "VECTOR_WIDTH"]

#: Whether the block kernels use the LLVM-IR tiles (``HESSOP_SIMD_TILES=1``).
SIMD_TILES = os.environ.get("HESSOP_SIMD_TILES", "") == "1"


def _target_features() -> str:
    """The CPU features numba compiles for, from its documented settings.

    ``NUMBA_CPU_FEATURES`` if set; else, for a CPU named by ``NUMBA_CPU_NAME``
    (other than "host"), none assumed (LLVM knows that CPU's features; the
    smaller tiles are correct on any CPU); else the host's.
    """
    if numba.config.CPU_FEATURES:
        return str(numba.config.CPU_FEATURES)
    if numba.config.CPU_NAME and str(numba.config.CPU_NAME).lower() != "host":
        return ""
    return llvmlite.binding.get_host_cpu_features().flatten()


_HAS_AVX512 = "+avx512f" in _target_features().split(",")

#: doubles per vector: one zmm register with AVX-512, one ymm otherwise.
VECTOR_WIDTH = 8 if _HAS_AVX512 else 4
#: accumulator rows of a tile two vectors wide: 16 of AVX-512's 32 vector
#: registers, 8 of AVX2's 16, leaving room for the loads and the broadcast.
TILE_ROWS = 8 if _HAS_AVX512 else 4
