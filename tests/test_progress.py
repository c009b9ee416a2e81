"""Product counters of the data-pass operators and one progress bar per computation (hessop/_progress.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import scipy.sparse.linalg as sla
from conftest import mlp_case

import hessop
from hessop import _progress


class _Bar:
    """Stands in for tqdm: records what a bar was told."""

    made: list[_Bar] = []

    def __init__(self, **options: Any) -> None:
        self.options, self.count, self.closed = options, 0, False
        _Bar.made.append(self)

    def update(self, n: int) -> None:
        self.count += n

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def bars(monkeypatch: pytest.MonkeyPatch) -> list[_Bar]:
    _Bar.made = []
    monkeypatch.setattr(_progress, "tqdm", _Bar)
    return _Bar.made


def test_operators_count_their_products_and_passes() -> None:
    case = mlp_case()
    H = hessop.HessianOperator(case.model, case.loss_fn, (case.x, case.y), batch_size=16)
    J = hessop.JacobianOperator(case.model, case.loss_fn, (case.x, case.y), batch_size=16)
    assert (H.num_products, H.num_passes) == (0, 0)  # construction is not counted
    rng = np.random.default_rng(0)
    H @ rng.normal(size=H.shape[1])
    H @ rng.normal(size=(H.shape[1], 3))
    assert (H.num_products, H.num_passes) == (4, 2)
    J.T @ rng.normal(size=J.shape[0])
    J @ rng.normal(size=(J.shape[1], 2))
    assert (J.num_products, J.num_passes) == (3, 2)
    H.loss_and_gradient()
    assert (H.num_products, H.num_passes) == (4, 3)


def test_the_count_is_what_the_solver_asked_for() -> None:
    # The reference counts the calls scipy makes through a plain wrapper.
    case = mlp_case()
    H = hessop.HessianOperator(case.model, case.loss_fn, (case.x, case.y))
    calls = []

    def matvec(v: np.ndarray) -> np.ndarray:
        calls.append(1)
        return H @ v

    wrapped = sla.LinearOperator(H.shape, matvec=matvec, rmatvec=matvec, dtype=H.dtype)
    sla.eigsh(wrapped, k=2, v0=np.ones(H.shape[0]))
    assert H.num_products == len(calls) > 0


def test_one_bar_per_call_counts_every_product(bars: list[_Bar]) -> None:
    case = mlp_case()
    H = hessop.HessianOperator(case.model, case.loss_fn, (case.x, case.y), batch_size=16)
    hessop.trace(H, method="hutchinson", num_matvecs=7, block_size=3, progress=True)
    hessop.spectral_density(H, num_lanczos=4, num_probes=2, progress=True)
    before = H.num_products
    hessop.eigen(H, k=2, progress=True)
    assert [bar.options["desc"] for bar in bars] == ["trace", "spectral_density", "eigen"]
    assert [bar.count for bar in bars] == [7, 8, H.num_products - before]
    assert [bar.options["total"] for bar in bars] == [7, 8, None]
    assert all(bar.closed for bar in bars) and H._product_listeners == []
    hessop.trace(H, num_matvecs=6)
    assert len(bars) == 3  # progress=False: no bar


def test_progress_is_refused_unless_a_bool() -> None:
    A = sla.aslinearoperator(np.eye(3))
    with pytest.raises(TypeError, match="progress: expected True or False, got 'yes'"):
        hessop.trace(A, progress="yes")
    with pytest.raises(TypeError, match="progress: expected True or False"):
        hessop.eigen(A, k=1, progress=1)
