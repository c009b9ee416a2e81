"""GGNOperator: equals the Hessian for canonical-link GLMs, differs (PSD) for networks."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import compiled_with_xla, dense_ggn, dense_hessian, poisson_case, rel_err

import hessop


def ggn(case, **kwargs):
    return hessop.GGNOperator(case.model, case.loss_fn, (case.x, case.y), params=case.params, **kwargs)


@pytest.mark.parametrize("parts", ["one part", "a part per variable"])
def test_ggn_matches_autodiff_reference(case, parts, request):
    if parts == "a part per variable":
        request.getfixturevalue("parts_per_variable")
    assert rel_err(ggn(case, batch_size=16).to_dense(), dense_ggn(case)) < 1e-10


def test_xla_compiled_ggn_matches_autodiff(mlp):
    G = ggn(mlp, batch_size=20, jit_compile=True)
    dense = dense_ggn(mlp)
    block = np.random.default_rng(6).normal(size=(G.shape[0], 2))
    assert rel_err(G @ block[:, 0], dense @ block[:, 0]) < 1e-10
    assert rel_err(G @ block, dense @ block) < 1e-10
    assert compiled_with_xla(G)


@pytest.mark.parametrize("make_case", ["logistic", "poisson"])
def test_ggn_equals_hessian_for_canonical_link(make_case, logistic):
    case = logistic if make_case == "logistic" else poisson_case()
    assert rel_err(ggn(case, batch_size=100).to_dense(), dense_hessian(case)) < 1e-10


def test_least_squares_ggn_is_hessian():
    rng = np.random.default_rng(5)
    import tensorflow as tf

    w = tf.Variable(rng.normal(size=3))
    x, y = rng.normal(size=(30, 3)), rng.normal(size=30)
    model = lambda x: tf.linalg.matvec(x, w)  # noqa: E731
    G = hessop.GGNOperator(model, lambda y, f: 0.5 * (f - y) ** 2, (x, y), params=[w])
    assert rel_err(G.to_dense(), x.T @ x / 30) < 1e-12


def test_mlp_ggn_differs_from_hessian_and_is_psd(mlp):
    dense = ggn(mlp).to_dense()
    hessian = dense_hessian(mlp)
    difference = np.linalg.norm(dense - hessian) / np.linalg.norm(hessian)
    assert difference > 0.05  # the dropped curvature term (seed 004) is not small here
    assert np.linalg.eigvalsh(hessian).min() < -1e-3  # the Hessian is indefinite ...
    assert np.linalg.eigvalsh(dense).min() > -1e-12  # ... the GGN is PSD
