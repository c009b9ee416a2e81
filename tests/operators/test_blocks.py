"""Block plans: chunk widths by memory and by measured time (a fake clock and memory; no timed tests)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import dense_hessian, mlp_case, rel_err

import hessop
from hessop.dense.columns import MemoryProbe
from hessop.operators import blocks
from hessop.operators.blocks import BlockPlan


class FakeMemory(MemoryProbe):
    """Resident size 1 GB; each block product raises the peak by ``per_vector`` bytes a vector."""

    def __init__(self, per_vector: int, available: int) -> None:
        super().__init__(on_host=True)
        self.per_vector, self._available, self._peak = per_vector, available, 2**30

    def resident(self) -> int:
        return 2**30

    def peak(self) -> int:
        return self._peak

    def available(self) -> int:
        return self._available

    def use(self, width: int) -> None:
        self._peak = max(self._peak, 2**30 + width * self.per_vector)


def run_block(plan: BlockPlan, k: int, seconds_per_vector: dict[int, float], memory: FakeMemory | None = None) -> list[int]:
    """Run a block of k through ``plan`` with a fake clock; the widths it ran."""
    widths = []
    for _, width in plan.chunks(k):
        clock = iter([0.0, seconds_per_vector.get(width, seconds_per_vector["block"]) * width])
        plan.clock = lambda clock=clock: next(clock)
        plan.run(width, lambda width=width: memory.use(width) if memory else None)
        widths.append(width)
    return widths


def test_unmeasured_blocks_run_in_one_pass():
    plan = BlockPlan(MemoryProbe(on_host=False))
    assert list(plan.chunks(10)) == [(0, 10)]
    assert list(plan.chunks(1)) == [(0, 1)]
    plan.max_width = 4
    assert list(plan.chunks(10)) == [(0, 4), (4, 4), (8, 2)]


def test_the_first_wide_block_measures_memory_and_caps_the_width(monkeypatch):
    # 100 MB a vector, 1 GB available: half of it holds 5 vectors.
    monkeypatch.setattr(blocks, "_PROBE_AFTER", float("inf"))  # no single-product probe here
    memory = FakeMemory(per_vector=100 * 2**20, available=2**30)
    plan = BlockPlan(memory)
    assert run_block(plan, 4, {"block": 1.0}, memory) == [4]  # narrow blocks run as they are, and measure
    assert plan.memory_width == 5
    memory = FakeMemory(per_vector=100 * 2**20, available=2**30)
    plan = BlockPlan(memory)
    assert run_block(plan, 12, {"block": 1.0}, memory) == [2, 5, 5]
    assert plan.bytes_per_vector == pytest.approx(100 * 2**20)
    assert run_block(plan, 12, {"block": 1.0}, memory) == [5, 5, 2]


def test_a_small_rise_of_the_peak_counts_as_sixteen_megabytes(monkeypatch):
    # 1 MB a vector: the trial's rise may be memory the process held and
    # reused, so it counts as 16 MB, 8 MB a vector: half of 1 GB holds 64.
    monkeypatch.setattr(blocks, "_PROBE_AFTER", float("inf"))  # no single-product probe here
    memory = FakeMemory(per_vector=2**20, available=2**30)
    plan = BlockPlan(memory)
    assert run_block(plan, 100, {"block": 1.0}, memory) == [2, 64, 34]
    assert plan.bytes_per_vector == 8 * 2**20


def test_blocks_narrow_while_they_cost_more_per_vector_than_single_products():
    # A width's first pass is not timed, and a width is judged on two passes
    # or more: 8 and 4 vectors cost more than 1.1 single products a vector, 2 less.
    plan = BlockPlan(MemoryProbe(on_host=False))
    cost = {1: 1.0, 8: 1.6, 4: 1.2, 2: 0.9, "block": 1.0}
    run_block(plan, 1, cost)  # traces the single product: not timed
    run_block(plan, 1, cost)
    caps, ran = [], []
    for _ in range(8):
        ran.append(run_block(plan, 8, cost))
        caps.append(plan.max_width)
    assert caps == [None, None, 4, 4, 2, 2, 2, 2]
    assert ran[:3] == [[8], [8], [8]]  # a trace, then two timed passes
    assert ran[3] == [4, 4] and ran[4] == [4, 2, 2]  # planned anew after each chunk
    assert ran[-1] == [2, 2, 2, 2]  # cheaper than single products: kept


def test_a_width_within_a_tenth_of_single_products_is_kept():
    plan = BlockPlan(MemoryProbe(on_host=False))
    cost = {1: 1.0, "block": 1.05}
    for k in (1, 1, 4, 4, 4, 4):
        run_block(plan, k, cost)
    assert plan.max_width is None


def test_blocks_that_lose_everywhere_become_single_products():
    plan = BlockPlan(MemoryProbe(on_host=False))
    cost = {1: 1.0, "block": 3.0}
    for k in (1, 1, 2, 2, 2):
        run_block(plan, k, cost)
    assert plan.max_width == 1
    assert run_block(plan, 3, cost) == [1, 1, 1]


def test_single_products_are_probed_only_once_blocks_paid_for_it(monkeypatch):
    # No single product was timed: after warm blocks have taken 4 × the
    # block's trace, a block starts with one single product (twice: the
    # first traces it), and then narrows.
    monkeypatch.setattr(blocks, "_PROBE_AFTER", 4.0)
    plan = BlockPlan(MemoryProbe(on_host=False))
    cost = {1: 1.0, "block": 2.0}
    assert run_block(plan, 3, cost) == [3]  # trace: 6 s
    ran = [run_block(plan, 3, cost) for _ in range(6)]
    assert ran[:4] == [[3]] * 4  # 6, 12, 18, 24 s of warm blocks
    assert ran[4] == [1, 2]  # the single product traces
    assert ran[5] == [1, 1, 1]  # timed: 1 s a vector against 2, so the rest runs as single products
    assert plan.max_width == 1


def test_operator_blocks_in_chunks_give_the_same_products():
    case = mlp_case()
    H = hessop.HessianOperator(case.model, case.loss_fn, (case.x, case.y), batch_size=16, hvp_mode="reverse")
    block = np.random.default_rng(0).normal(size=(H.shape[1], 7))
    expected = dense_hessian(case) @ block
    assert rel_err(H @ block, expected) < 1e-10
    for width in (3, 1):
        H._forward_plan.max_width = width
        passes = H.num_passes
        assert rel_err(H @ block, expected) < 1e-10
        assert H.num_passes - passes == -(-7 // width)
    J = hessop.JacobianOperator(case.model, case.loss_fn, (case.x, case.y), batch_size=16)
    J._forward_plan.max_width = J._adjoint_plan.max_width = 2
    dense = np.vstack(list(J.row_blocks()))
    np.testing.assert_allclose(J @ block, dense @ block, rtol=1e-10, atol=1e-12)
    cotangents = np.random.default_rng(1).normal(size=(J.shape[0], 5))
    np.testing.assert_allclose(J.H @ cotangents, dense.T @ cotangents, rtol=1e-10, atol=1e-12)
