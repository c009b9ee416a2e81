"""How wide a block product's passes are: chosen by memory and by measurement.

A block of k vectors runs in one data pass, vectorised over the vectors. On
small models that costs about half as much per vector as k single products
(``benchmarks/bench_block.py``); on large ones the k-fold activations can
cost more per vector than single products and exhaust memory. A
`BlockPlan` splits each block into chunks, one pass each:

- **memory** (Linux, products on the CPU): the first block wider than
  ``_UNTRIED_WIDTH`` starts with a chunk of ``_TRIAL_WIDTH`` vectors, whose
  rise of the process's peak resident size, per vector, estimates a
  vector's memory; chunks are then at most as wide as fits in
  ``_MEMORY_SHARE`` of the memory available at that time. A rise below
  ``_MIN_RISE`` counts as that much: the chunk may have reused memory the
  process held. The rise includes what does not grow with the width (the
  forward pass), and a peak set earlier counts as the chunk's, which both
  err towards narrower chunks; memory the process had freed and reuses
  beyond ``_MIN_RISE`` does not show, which errs the other way.
- **time**: once block products have taken ``_PROBE_AFTER`` times as long
  as tracing the block did (so a short computation never pays for a probe),
  a block whose single products were never timed runs its first vector as a
  single product. Where the widest chunk of width w costs more per vector
  than ``_SLOWER_BY`` single products, later blocks use chunks of w // 2,
  down to single products. A width's first pass is not timed (the first
  pass of a kind traces its graph, and a new width runs slower at first),
  and a width is judged on the least of at least ``_SAMPLES_TO_JUDGE``
  passes.

The plan has no TensorFlow in it: the operator runs the chunks through
`BlockPlan.run`, which times them and reads the memory.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator

from hessop.dense.columns import MemoryProbe

__all__ = ["BlockPlan"]

# Blocks up to this width run in one pass before any memory is measured.
_UNTRIED_WIDTH = 4
_TRIAL_WIDTH = 2
_MEMORY_SHARE = 0.5
# A smaller rise of the peak counts as this much: the chunk may have reused memory the process held.
_MIN_RISE = 16 * 2**20
# Probe single products once warm block passes have taken this many times the block's trace.
_PROBE_AFTER = 4.0
# Samples kept per width (their minimum counts: a slow sample is noise).
_SAMPLES = 5
_SAMPLES_TO_JUDGE = 2
_SLOWER_BY = 1.1


class BlockPlan:
    """Chunk widths for block products of one operator and direction (A or Aᴴ).

    Parameters
    ----------
    memory : MemoryProbe
        Where a chunk's memory is read (``on_host=False``: not measured, no memory cap).
    clock : callable
        Seconds, for tests.

    Examples
    --------
    >>> plan = BlockPlan(MemoryProbe(on_host=False))
    >>> list(plan.chunks(10))  # nothing measured: one pass
    [(0, 10)]
    >>> plan.max_width = 4
    >>> list(plan.chunks(10))
    [(0, 4), (4, 4), (8, 2)]
    """

    def __init__(self, memory: MemoryProbe, clock: Callable[[], float] = time.perf_counter) -> None:
        self.memory = memory
        self.clock = clock
        # The widest chunk allowed: None until a measurement limits it.
        self.max_width: int | None = None
        self.memory_width: int | None = None
        self.bytes_per_vector: float | None = None
        self.single_seconds: deque[float] = deque(maxlen=_SAMPLES)
        self.per_vector_seconds: dict[int, deque[float]] = {}
        self._traced: set[str] = set()  # "single", "block": their first pass traced
        self._ran: set[int] = set()  # widths that have run once (their first pass is not timed)
        self._block_trace_seconds = 0.0
        self._block_seconds = 0.0  # warm block passes so far

    # -- the plan ----------------------------------------------------------------
    def chunks(self, k: int) -> Iterator[tuple[int, int]]:
        """``(start, width)`` of consecutive chunks of a block of ``k`` vectors, planned anew after each one ran."""
        start = 0
        while start < k:
            remaining = k - start
            cap = min(w for w in (remaining, self.max_width, self.memory_width) if w is not None)
            width = cap
            if start == 0 and remaining > 1:
                if remaining > _UNTRIED_WIDTH and self.bytes_per_vector is None and self.memory.on_host:
                    width = min(_TRIAL_WIDTH, cap)
                elif self._wants_single_probe(cap):
                    width = 1
            yield start, width
            start += width

    def _wants_single_probe(self, cap: int) -> bool:
        return (
            cap > 1
            and not self.single_seconds
            and "block" in self._traced
            and self._block_seconds >= _PROBE_AFTER * self._block_trace_seconds
        )

    # -- what the chunks cost -------------------------------------------------------
    def run(self, width: int, product: Callable[[], object]) -> object:
        """``product()`` for a chunk of ``width`` vectors (1: a single product), timed and, the first time, measured."""
        kind = "single" if width == 1 else "block"
        resident = self.memory.resident() if self.bytes_per_vector is None and kind == "block" else None
        began = self.clock()
        out = product()
        seconds = self.clock() - began
        if resident is not None:
            peak, available = self.memory.peak(), self.memory.available()
            if peak is not None and available is not None:
                self.bytes_per_vector = max(peak - resident, _MIN_RISE) / width
                self.memory_width = max(1, int(_MEMORY_SHARE * available / self.bytes_per_vector))
        self.record(width, seconds)
        return out

    def record(self, width: int, seconds: float) -> None:
        """Count a pass of ``width`` vectors that took ``seconds``; narrow the chunks where they lose to single products."""
        kind = "single" if width == 1 else "block"
        if kind not in self._traced:  # the first pass of a kind traces its graph
            self._traced.add(kind)
            self._ran.add(width)
            if kind == "block":
                self._block_trace_seconds = seconds
            return
        if width not in self._ran:  # a new width's first pass runs slower
            self._ran.add(width)
            self._block_seconds += seconds
            return
        if kind == "single":
            self.single_seconds.append(seconds)
        else:
            self._block_seconds += seconds
            self.per_vector_seconds.setdefault(width, deque(maxlen=_SAMPLES)).append(seconds / width)
        self._narrow()

    def _narrow(self) -> None:
        if not self.single_seconds:
            return
        # The widest chunk within the cap decides (a short remainder costs more per vector).
        cap = self.max_width
        measured = [
            w for w, samples in self.per_vector_seconds.items() if (cap is None or w <= cap) and len(samples) >= _SAMPLES_TO_JUDGE
        ]
        if not measured:
            return
        widest = max(measured)
        if min(self.per_vector_seconds[widest]) > _SLOWER_BY * min(self.single_seconds):
            self.max_width = max(1, widest // 2)
