"""dense_from_operator: exact columns, and the default block widths' growth, timing and memory guard."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.sparse.linalg import LinearOperator, aslinearoperator

from hessop.dense import columns as _dense
from hessop.dense.columns import TRIAL_BLOCK_SIZES, DenseHooks, dense_from_operator


class RecordingOperator(LinearOperator):
    """A sparse matrix as a LinearOperator that records block widths and advances a fake clock and memory."""

    def __init__(self, matrix, seconds_per_column=None, bytes_per_column=0):
        super().__init__(matrix.dtype, matrix.shape)
        self.matrix = matrix
        self.widths: list[int] = []
        self.seconds_per_column = seconds_per_column or {}
        self.bytes_per_column = bytes_per_column
        self.now = 0.0
        self.peak = 0

    def _matmat(self, X):
        width = X.shape[1]
        self.widths.append(width)
        self.now += self.seconds_per_column.get(width, 1.0) * width
        self.peak = max(self.peak, self.bytes_per_column * width)  # a high-water mark, as VmHWM
        return self.matrix @ X

    def _matvec(self, x):
        return self._matmat(x.reshape(-1, 1)).reshape(-1)


class PartedOperator(RecordingOperator):
    """A symmetric matrix whose columns come in parts, as hessop's symmetric operators: only rows from the part's start."""

    def __init__(self, matrix, parts, seconds_per_column=None):
        super().__init__(matrix, seconds_per_column)
        self._dense_parts = parts
        self.blocks: list[tuple[int, int]] = []

    def dense_hooks(self):
        return DenseHooks(parts=self._dense_parts, lower_block_rows=self._lower_block_rows)

    def _lower_block_rows(self, first, stop):
        row_start = next(start for start, end in self._dense_parts if start <= first < end)
        assert stop <= next(end for start, end in self._dense_parts if start <= first < end)
        self.blocks.append((first, stop))
        return self._matmat(np.eye(self.shape[1])[:, first:stop])[row_start:].T


def banded(size: int) -> sp.csr_matrix:
    rng = np.random.default_rng(0)
    return sp.diags([rng.normal(size=size - 2), rng.normal(size=size), rng.normal(size=size - 3)], [-2, 0, 3]).tocsr()


@pytest.fixture
def fake_clock_and_memory(monkeypatch):
    """Route the trials' clock and /proc readings to the operator's fake ones."""
    state = {"op": None, "available": 2**40}

    def status_bytes(field):
        op = state["op"]
        return 0 if field == "VmRSS" else op.peak

    monkeypatch.setattr(_dense, "_clock", lambda: state["op"].now)
    monkeypatch.setattr(_dense, "_status_bytes", status_bytes)
    monkeypatch.setattr(_dense, "_meminfo_bytes", lambda field: state["available"])
    return state


def test_columns_are_exact_for_any_operator_and_block_width():
    matrix = banded(3500)
    expected = matrix.toarray()
    assert np.array_equal(dense_from_operator(aslinearoperator(matrix), max_params=10_000, block_size=None), expected)
    assert np.array_equal(dense_from_operator(aslinearoperator(matrix), max_params=10_000, block_size=333), expected)


def test_widths_grow_while_faster_and_the_fastest_builds_the_rest(fake_clock_and_memory):
    costs = {16: 4.0, 32: 2.0, 64: 1.0, 128: 1.05, 256: 1.2, 512: 0.1}  # 256 is > 10 % slower than 64
    op = RecordingOperator(banded(3500), costs)
    fake_clock_and_memory["op"] = op
    dense = dense_from_operator(op, max_params=10_000, block_size=None)
    trials = [w for w in (16, 32, 64, 128, 256) for _ in range(3)]
    assert op.widths[: len(trials)] == trials
    rest = 3500 - sum(trials)
    assert op.widths[len(trials) :] == [64] * (rest // 64) + [rest % 64]
    assert np.array_equal(dense, op.matrix.toarray())


def test_parts_build_their_lower_blocks_and_mirror_the_rest(fake_clock_and_memory):
    matrix = banded(2000)
    matrix = (matrix + matrix.T).tocsr()
    parts = ((0, 1000), (1000, 1010), (1010, 2000))
    # Widths: 16, 32, 64 and 128 three times each (720 columns); 256 to the
    # end of the first part (256, then 24 cut short: untimed), then the
    # second part (10, cut short), then the third (its first block untimed,
    # two timed); 512 only to the end (222, untimed), so 256 builds no more.
    costs = {w: 1.0 / w for w in TRIAL_BLOCK_SIZES}
    op = PartedOperator(matrix, parts, costs)
    fake_clock_and_memory["op"] = op
    dense = dense_from_operator(op, max_params=10_000, block_size=None)
    assert np.array_equal(dense, matrix.toarray())
    assert op.widths == [w for w in (16, 32, 64, 128) for _ in range(3)] + [256, 24, 10, 256, 256, 256, 222]
    assert all(any(start <= first < stop <= end for start, end in parts) for first, stop in op.blocks)
    assert [first for first, _ in op.blocks] == [0, *np.cumsum(op.widths)[:-1]]


def test_a_width_whose_memory_would_not_fit_is_not_tried(fake_clock_and_memory):
    # 1 MB a column; 100 MB available, half of it for a block: 16 and 32
    # columns fit (32 MB), 64 would need 64 MB.
    op = RecordingOperator(banded(3500), {w: 1.0 / w for w in TRIAL_BLOCK_SIZES}, bytes_per_column=2**20)
    fake_clock_and_memory.update(op=op, available=100 * 2**20)
    dense_from_operator(op, max_params=10_000, block_size=None)
    assert max(op.widths) == 32
    assert op.widths[:6] == [16, 16, 16, 32, 32, 32]


@pytest.mark.parametrize("unmeasured", ["no /proc", "memory on an accelerator"])
def test_widths_stop_at_128_where_memory_cannot_be_measured(fake_clock_and_memory, monkeypatch, unmeasured):
    op = RecordingOperator(banded(3500), {w: 1.0 / w for w in TRIAL_BLOCK_SIZES})
    fake_clock_and_memory["op"] = op
    if unmeasured == "no /proc":
        monkeypatch.setattr(_dense, "_status_bytes", lambda field: None)
    else:
        op.dense_hooks = lambda: DenseHooks(memory_on_host=False)
    dense_from_operator(op, max_params=10_000, block_size=None)
    assert max(op.widths) == 128


def test_memory_watch_reads_this_process_on_linux():
    watch = _dense._MemoryWatch.start()
    if not watch.measured:
        pytest.skip("no /proc here")
    block = np.ones((64, 2**20))  # 512 MiB, touched
    watch.record(64)
    del block
    assert watch.peaks[64] >= 2**29 * 0.9
    assert watch.allows(64) == (watch.peaks[64] <= watch.budget)
