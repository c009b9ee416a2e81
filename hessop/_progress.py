"""Progress bars that count an operator's products over a whole computation.

A solver such as ``eigsh`` makes dozens of products, each a data pass. One
bar per call of `eigen`, `trace`, ... counts those products, instead of a bar
per pass. Operators report their products to listeners (`DataPassOperator`
does); other LinearOperators are cheap and get no bar.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from tqdm.auto import tqdm

__all__ = ["check_progress", "product_progress"]


def check_progress(progress: Any) -> bool:
    """Validate a ``progress`` argument (True or False)."""
    if not isinstance(progress, bool):
        msg = f"progress: expected True or False, got {progress!r}."
        raise TypeError(msg)
    return progress


@contextlib.contextmanager
def product_progress(op: Any, desc: str, *, total: int | None = None, enabled: bool = True) -> Iterator[None]:
    """A tqdm bar counting ``op``'s products (vectors multiplied) while the block runs.

    ``total``: the expected number of products, when known. A no-op when
    ``enabled`` is False or ``op`` does not report its products.
    """
    listeners = getattr(op, "_product_listeners", None)
    if not enabled or listeners is None:
        yield
        return
    bar = tqdm(total=total, desc=desc, unit="product", leave=False, delay=1.0)
    listeners.append(bar.update)
    try:
        yield
    finally:
        listeners.remove(bar.update)
        bar.close()
