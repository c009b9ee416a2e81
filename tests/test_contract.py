"""One contract over every operator and every model of the zoo (tests/zoo.py).

References use no second derivative of the model: H·v is checked against a
central difference of the float64 gradient, the GGN against Jᵀ(∂²ℓ/∂f²)J
from first-order Jacobians, OPG and J against per-example gradients and the
output Jacobian. Each operator must also be symmetric or have a matching
adjoint, and its matmat columns must be its matvecs.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
from conftest import Case, dense_ggn, dense_output_jacobian, dense_per_example_gradients
from zoo import FD_RTOL, ZOO, fd_hessian_product

import hessop

# The zoo only: the shared cases of conftest.py are checked operator by
# operator against dense references (test_hessian.py, test_ggn.py, ...), and
# each case here costs 20-50 s of tracing for its five operators.
ALL_CASES = ZOO
OPERATORS = ("hessian", "ggn", "opg", "jacobian", "output_jacobian")
# Agreement of products that differ only in summation order (float64).
RTOL = 1e-9


def _operator(kind: str, case: Case) -> Any:
    common = {"params": case.params}
    if kind == "hessian":
        return hessop.HessianOperator(case.model, case.loss_fn, (case.x, case.y), **common)
    if kind == "ggn":
        return hessop.GGNOperator(case.model, case.loss_fn, (case.x, case.y), **common)
    if kind == "opg":
        return hessop.OPGOperator(case.model, case.loss_fn, (case.x, case.y), **common)
    if kind == "jacobian":
        return hessop.JacobianOperator(case.model, case.loss_fn, (case.x, case.y), **common)
    return hessop.JacobianOperator(case.model, None, (case.x, None), target="outputs", **common)


def _reference(kind: str, case: Case) -> np.ndarray | None:
    """The dense reference from first-order Jacobians; None for the Hessian (checked by finite differences)."""
    if kind == "ggn":
        return dense_ggn(case)
    if kind == "opg":
        rows = dense_per_example_gradients(case)
        return rows.T @ rows / case.num_data
    if kind == "jacobian":
        return dense_per_example_gradients(case)
    if kind == "output_jacobian":
        return dense_output_jacobian(case)
    return None


def _close(actual: np.ndarray, expected: np.ndarray, rtol: float) -> None:
    scale = max(float(np.max(np.abs(expected))), np.finfo(float).tiny)
    error = float(np.max(np.abs(actual - expected))) / scale
    assert error <= rtol, f"relative error {error:.2e} > {rtol:.0e}"


@pytest.mark.parametrize("kind", OPERATORS)
@pytest.mark.parametrize("name", sorted(ALL_CASES))
def test_contract(name: str, kind: str) -> None:
    case = ALL_CASES[name]()
    with warnings.catch_warnings():
        # Loops where pfor cannot vectorise (RNNs) are announced; they are not the subject here.
        warnings.filterwarnings("ignore", message=".*cannot be vectorised.*")
        warnings.filterwarnings("ignore", message=".*forward-mode.*")
        op = _operator(kind, case)
        rng = np.random.default_rng(0)
        n_rows, n_cols = op.shape
        block = rng.standard_normal((n_cols, 2))
        products = op.matmat(block)
        single = op.matvec(block[:, 0])
        cotangents = rng.standard_normal((n_rows, 2))
        adjoints = op.rmatmat(cotangents)

    # matvec is matmat's column
    _close(single, products[:, 0], RTOL)
    # adjoint (dot) test: <A v, w> = <v, Aᵀ w>
    lhs, rhs = cotangents.T @ products, adjoints.T @ block
    _close(lhs, rhs, RTOL)

    reference = _reference(kind, case)
    if reference is None:
        expected = np.column_stack([fd_hessian_product(case, block[:, j]) for j in range(2)])
        _close(products, expected, FD_RTOL)
    else:
        _close(products, reference @ block, RTOL)
        _close(adjoints, reference.T @ cotangents, RTOL)
    if kind in ("hessian", "ggn", "opg"):
        _close(products[:, 1] @ block[:, 0], products[:, 0] @ block[:, 1], RTOL)
    if kind in ("ggn", "opg"):
        # The diagonal by backpropagation (C backward passes per example), not by P products.
        _close(hessop.diagonal(op), np.diag(reference), RTOL)


# Layers KFAC factors; any other layer's variables must be refused by name.
_KFAC_REFUSES = {
    "transformer": "multi_head_attention",
    "cnn_groupnorm": "group_normalization",
    "separable": "depthwise_conv2d",
    "lstm": "lstm",
    "gru": "gru",
    "tf_module": "Keras model",
    "subclassed": "called 2 times",  # its hidden layer is applied twice
}


@pytest.mark.parametrize("name", sorted(ALL_CASES))
def test_kfac_contract(name: str) -> None:
    """KFAC and EKFAC: symmetric, matmat columns are matvecs, and their diagonal and trace are their matrix's."""
    case = ALL_CASES[name]()
    if name in _KFAC_REFUSES:
        with pytest.raises((ValueError, TypeError), match=_KFAC_REFUSES[name]):
            hessop.KFACOperator(case.model, case.loss_fn, (case.x, case.y), params=case.params)
        return
    for cls in (hessop.KFACOperator, hessop.EKFACOperator):
        op = cls(case.model, case.loss_fn, (case.x, case.y), params=case.params)
        dense = op.to_dense()
        block = np.random.default_rng(1).standard_normal((op.shape[0], 2))
        _close(op.matmat(block), dense @ block, RTOL)
        _close(op.matvec(block[:, 0]), dense @ block[:, 0], RTOL)
        _close(dense, dense.T, RTOL)
        _close(hessop.diagonal(op), np.diag(dense), RTOL)
        assert op.trace() == pytest.approx(np.trace(dense), rel=RTOL)
        assert np.linalg.eigvalsh(dense)[0] >= -RTOL * np.abs(dense).max()
