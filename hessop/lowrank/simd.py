"""Register-tiled float64 multiply-accumulate loops for numba kernels, in LLVM IR (opt-in).

Loaded only with ``HESSOP_SIMD_TILES=1`` (`hessop.lowrank.tiles`): it writes
LLVM IR through llvmlite's builder and numba's code-generation helpers,
whose interfaces may change with their releases.

numba leaves LLVM's SLP vectoriser off (numba/numba#8852: it miscompiled), so
a register-tiled micro-kernel written as scalar Python stays scalar; the loop
vectoriser only turns innermost loops over contiguous memory into SIMD code,
and such loops must load and store their accumulators at every step. For the
block products of ``_kernels`` (P × K times K × m with K and m small) that left
QC, with float64 accumulation, at 2.4–2.6 × the time of float32 sgemm.

:func:`outer_product_tile` writes the missing micro-kernel with
:func:`numba.extending.intrinsic`: one loop over explicit ``<W x double>``
vectors whose R × H accumulator vectors stay in registers from the first step
to the last. Each step loads H vectors of B, broadcasts R scalars of A and
issues R·H fused multiply-adds. LLVM legalises the vector type on any target
(a ``<8 x double>`` is one zmm register with AVX-512, two ymm with AVX2), so
the code is correct everywhere; the sizes below only choose what fits the
register file of the CPU numba compiles for.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from hessop.lowrank.tiles import TILE_ROWS, VECTOR_WIDTH

__all__ = ["TILE_ROWS", "VECTOR_WIDTH", "outer_product_tile"]


def outer_product_tile(rows: int, vectors: int):
    """A numba intrinsic ``tile(A, a_off, a_step, a_row, B, b_off, b_step, count, acc, c_off, c_row)``.

    Inside a jitted function it does, with ``W = VECTOR_WIDTH``::

        for t in range(count):
            for r in range(rows):
                for v in range(vectors):
                    acc[c_off + r*c_row + v*W : ... + W] += (
                        A[a_off + t*a_step + r*a_row] * B[b_off + t*b_step + v*W : ... + W])

    with one fused multiply-add per vector, the ``rows × vectors`` accumulator
    vectors loaded once before the loop and stored once after it. ``A``, ``B``
    and ``acc`` are 1-D C-contiguous float64 arrays; the offsets, steps and
    count are integers. Nothing is bounds-checked: the caller guarantees every
    index it implies lies inside its array.

    Examples
    --------
    >>> import numpy as np
    >>> from numba import njit
    >>> tile = outer_product_tile(2, 1)
    >>> @njit
    ... def outer_sum(a, b, acc):  # acc[r*W + j] += Σ_t a[2t + r] b[W t + j]
    ...     tile(a, 0, 2, 1, b, 0, VECTOR_WIDTH, a.size // 2, acc, 0, VECTOR_WIDTH)
    >>> a, b = np.arange(6.0), np.ones(3 * VECTOR_WIDTH)
    >>> acc = np.zeros(2 * VECTOR_WIDTH)
    >>> outer_sum(a, b, acc)
    >>> print(acc[0], acc[VECTOR_WIDTH])  # 0 + 2 + 4 and 1 + 3 + 5
    6.0 9.0
    """
    if rows < 1 or vectors < 1:
        msg = f"rows and vectors: expected positive integers, got {rows} and {vectors}."
        raise ValueError(msg)
    width = VECTOR_WIDTH
    float_array = types.Array(types.float64, 1, "C")

    @intrinsic
    def tile(typingctx, A, a_off, a_step, a_row, B, b_off, b_step, count, acc, c_off, c_row):
        if not all(arg == float_array for arg in (A, B, acc)):
            return None  # numba reports a typing error naming the argument types
        index = types.intp
        signature = types.void(A, index, index, index, B, index, index, index, acc, index, index)

        def codegen(context, builder, sig, args):
            a, a_off, a_step, a_row, b, b_off, b_step, count, c, c_off, c_row = args
            intp = context.get_value_type(types.intp)
            vector = ir.VectorType(ir.DoubleType(), width)
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vector, [vector] * 3), f"llvm.fma.v{width}f64")
            a_data, b_data, c_data = (
                context.make_array(sig.args[i])(context, builder, value).data for i, value in ((0, a), (4, b), (8, c))
            )

            def const(value: int) -> ir.Constant:
                return ir.Constant(intp, value)

            def vector_pointer(data, offset):
                return builder.bitcast(builder.gep(data, [offset]), vector.as_pointer())

            def accumulator_offset(r: int, v: int):
                return builder.add(c_off, builder.add(builder.mul(const(r), c_row), const(v * width)))

            # Unaligned vector accesses (align 8): the offsets are arbitrary multiples of a double.
            initial = [
                [builder.load(vector_pointer(c_data, accumulator_offset(r, v)), align=8) for v in range(vectors)]
                for r in range(rows)
            ]
            entry = builder.basic_block
            loop = builder.append_basic_block("tile.loop")
            done = builder.append_basic_block("tile.done")
            builder.cbranch(builder.icmp_signed(">", count, const(0)), loop, done)

            builder.position_at_end(loop)
            step = builder.phi(intp)
            running = [[builder.phi(vector) for _ in range(vectors)] for _ in range(rows)]
            a_base = builder.add(a_off, builder.mul(step, a_step))
            b_base = builder.add(b_off, builder.mul(step, b_step))
            b_vectors = [
                builder.load(vector_pointer(b_data, builder.add(b_base, const(v * width))), align=8) for v in range(vectors)
            ]
            splat_mask = ir.Constant(ir.VectorType(ir.IntType(32), width), [0] * width)
            undefined = ir.Constant(vector, ir.Undefined)
            updated = []
            for r in range(rows):
                scalar = builder.load(builder.gep(a_data, [builder.add(a_base, builder.mul(const(r), a_row))]), align=8)
                lane0 = builder.insert_element(undefined, scalar, ir.Constant(ir.IntType(32), 0))
                broadcast = builder.shuffle_vector(lane0, undefined, splat_mask)
                updated.append([builder.call(fma, [broadcast, b_vectors[v], running[r][v]]) for v in range(vectors)])
            next_step = builder.add(step, const(1))
            loop_end = builder.basic_block
            step.add_incoming(const(0), entry)
            step.add_incoming(next_step, loop_end)
            for r in range(rows):
                for v in range(vectors):
                    running[r][v].add_incoming(initial[r][v], entry)
                    running[r][v].add_incoming(updated[r][v], loop_end)
            builder.cbranch(builder.icmp_signed("<", next_step, count), loop, done)

            builder.position_at_end(done)
            final = [[builder.phi(vector) for _ in range(vectors)] for _ in range(rows)]  # phis first
            for r in range(rows):
                for v in range(vectors):
                    final[r][v].add_incoming(initial[r][v], entry)
                    final[r][v].add_incoming(updated[r][v], loop_end)
                    builder.store(final[r][v], vector_pointer(c_data, accumulator_offset(r, v)), align=8)
            return context.get_dummy_value()

        return signature, codegen

    return tile
