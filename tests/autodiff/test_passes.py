"""Fused data passes (hessop/autodiff/passes.py): a whole pass in one compiled function.

Each product of a fused pass must equal the same product summed batch by
batch from Python (the path re-iterables take), and both must equal the
dense references of conftest.py; a pass must trace once for all vectors,
block widths and the short last batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import tensorflow as tf
from conftest import Case, dense_hessian, dense_per_example_gradients, mlp_case, multi_input_case, rel_err

import hessop

BATCH = 9  # 64 and 40 examples: short last batches of 1 and 4


def _operators(case: Case, data: Any, batch_size: int | None) -> dict[str, Any]:
    common = {"batch_size": batch_size, "params": case.params}
    return {
        "hessian": hessop.HessianOperator(case.model, case.loss_fn, data, **common),
        "ggn": hessop.GGNOperator(case.model, case.loss_fn, data, **common),
        "opg": hessop.OPGOperator(case.model, case.loss_fn, data, **common),
        "jacobian": hessop.JacobianOperator(case.model, case.loss_fn, data, **common),
    }


def _unfused(op: Any) -> Any:
    """The same operator with its passes batch by batch, as for a list of batches."""
    op._fused = None
    return op


def _data(case: Case, source: str) -> tuple[Any, int | None]:
    if source == "arrays":
        return (case.x, case.y), BATCH
    return tf.data.Dataset.from_tensor_slices((case.x, case.y)).batch(BATCH), None


@pytest.mark.parametrize(
    ("make_case", "source"),
    [(mlp_case, "arrays"), (mlp_case, "dataset"), (multi_input_case, "dataset")],
    ids=["mlp-arrays", "mlp-dataset", "multi_input-dataset"],
)
def test_fused_passes_equal_batch_by_batch_passes(make_case: Any, source: str) -> None:
    case = make_case()
    data, batch_size = _data(case, source)
    fused = _operators(case, data, batch_size)
    looped = {name: _unfused(op) for name, op in _operators(case, data, batch_size).items()}
    rng = np.random.default_rng(0)
    for name, op in fused.items():
        assert op._fused is not None
        m, n = op.shape
        v, block = rng.normal(size=n), rng.normal(size=(n, 3))
        assert rel_err(op @ v, looped[name] @ v) < 1e-12, name
        assert rel_err(op @ block, looped[name] @ block) < 1e-12, name
        if name == "jacobian":
            u = rng.normal(size=m)
            assert rel_err(op.T @ u, looped[name].T @ u) < 1e-12, name
            U = rng.normal(size=(m, 2))
            assert rel_err(op.T @ U, looped[name].T @ U) < 1e-12, name


def test_fused_products_match_dense_references_with_a_short_last_batch() -> None:
    case = mlp_case()
    ops = _operators(case, *_data(case, "dataset"))
    rng = np.random.default_rng(1)
    v = rng.normal(size=ops["hessian"].shape[1])
    gradients = dense_per_example_gradients(case)
    assert rel_err(ops["hessian"] @ v, dense_hessian(case) @ v) < 1e-10
    assert rel_err(ops["opg"] @ v, gradients.T @ (gradients @ v) / case.num_data) < 1e-10
    assert rel_err(ops["jacobian"] @ v, gradients @ v) < 1e-10
    u = rng.normal(size=case.num_data)
    assert rel_err(ops["jacobian"].T @ u, gradients.T @ u) < 1e-10


def test_sample_weights_of_a_dataset_reach_the_fused_pass() -> None:
    # An integer sample weight counts its example that many times: the
    # reference is the unweighted Hessian of the data with examples repeated.
    case = mlp_case()
    weights = np.random.default_rng(2).integers(0, 4, size=case.num_data).astype("float64")
    dataset = tf.data.Dataset.from_tensor_slices((case.x, case.y, weights)).batch(BATCH)
    H = hessop.HessianOperator(case.model, case.loss_fn, dataset, reduction="sum")
    assert H._fused is not None
    counts = weights.astype(int)
    repeated = hessop.HessianOperator(
        case.model, case.loss_fn, (np.repeat(case.x, counts, 0), np.repeat(case.y, counts, 0)), reduction="sum"
    )
    v = np.random.default_rng(3).normal(size=H.shape[1])
    assert rel_err(H @ v, repeated @ v) < 1e-10


def test_a_pass_traces_once_for_all_vectors_widths_and_the_short_last_batch() -> None:
    case = mlp_case()
    ops = _operators(case, *_data(case, "arrays"))
    rng = np.random.default_rng(4)
    for op in ops.values():
        m, n = op.shape
        for width in (2, 3, 5, 2):
            op @ rng.normal(size=n)
            op @ rng.normal(size=(n, width))
        if isinstance(op, hessop.JacobianOperator):
            for width in (2, 4):
                op.T @ rng.normal(size=m)
                op.T @ rng.normal(size=(m, width))
        passes = op._fused.tracing_counts
        assert passes and set(passes.values()) == {1}, (type(op).__name__, passes)
        per_batch = op._engine._compiled
        assert per_batch and all(traced.tracing_count == 1 for traced in per_batch.values()), type(op).__name__


def test_a_list_of_batches_keeps_the_batch_by_batch_pass() -> None:
    case = mlp_case()
    batches = [(case.x[i : i + BATCH], case.y[i : i + BATCH]) for i in range(0, case.num_data, BATCH)]
    H = hessop.HessianOperator(case.model, case.loss_fn, batches)
    assert H._fused is None
    v = np.random.default_rng(5).normal(size=H.shape[1])
    assert rel_err(H @ v, dense_hessian(case) @ v) < 1e-10
