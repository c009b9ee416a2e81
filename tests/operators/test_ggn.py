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


def test_ggn_of_a_model_with_two_heads_equals_that_of_their_concatenation():
    # A dict of outputs (classification logits and a regression value) and a
    # loss over both: the GGN is that of the same layers with one
    # concatenated output, whose dense reference needs no structure.
    import keras
    import tensorflow as tf
    from conftest import F64, Case

    keras.utils.set_random_seed(3)
    rng = np.random.default_rng(3)
    inputs = keras.Input((3,), dtype=F64)
    hidden = keras.layers.Dense(4, activation="tanh", dtype=F64)(inputs)
    logits = keras.layers.Dense(2, dtype=F64)(hidden)
    value = keras.layers.Dense(1, dtype=F64)(hidden)
    heads = keras.Model(inputs, {"logits": logits, "value": value})
    joined = keras.Model(inputs, keras.layers.Concatenate(dtype=F64)([logits, value]))
    cross_entropy = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None, dtype=F64)

    def heads_loss(y, out):
        return cross_entropy(y["label"], out["logits"]) + tf.reduce_sum((out["value"] - y["target"]) ** 2, axis=-1)

    def joined_loss(y, out):
        return cross_entropy(y[:, 0], out[:, :2]) + (out[:, 2] - y[:, 1]) ** 2

    x = rng.normal(size=(10, 3))
    label, target = rng.integers(0, 2, size=10), rng.normal(size=10)
    params = heads.trainable_variables
    reference = dense_ggn(Case("joined", joined, joined_loss, x, np.column_stack([label, target]), params=params))
    G = hessop.GGNOperator(heads, heads_loss, (x, {"label": label, "target": target[:, None]}), params=params, batch_size=4)
    vector = rng.normal(size=G.shape[0])
    assert rel_err(G @ vector, reference @ vector) < 1e-10
    assert rel_err(G.to_dense(), reference) < 1e-10


def test_monte_carlo_diagonal_converges_to_the_exact_one_in_one_pass(mlp):
    G = ggn(mlp, batch_size=16)
    exact = hessop.diagonal(G)
    passes = G.num_passes
    errors = [rel_err(hessop.diagonal(G, method="mc", mc_samples=samples, seed=3), exact) for samples in (2, 200)]
    assert G.num_passes == passes + 2  # one data pass each
    # Monte Carlo error shrinks as 1/√samples: 10× here; ask for 4×.
    assert errors[1] < errors[0] / 4
    assert errors[1] < 0.2
    np.testing.assert_array_equal(hessop.diagonal(G, method="mc", seed=3), hessop.diagonal(G, method="mc", seed=3))
    with pytest.raises(ValueError, match="GGNOperator"):
        hessop.diagonal(hessop.HessianOperator(mlp.model, mlp.loss_fn, (mlp.x, mlp.y), params=mlp.params), method="mc")


def test_monte_carlo_fisher_is_fixed_symmetric_and_converges_to_the_ggn(mlp):
    dense = ggn(mlp).to_dense()
    errors = []
    for samples in (2, 200):
        F = hessop.FisherOperator(
            mlp.model, mlp.loss_fn, (mlp.x, mlp.y), params=mlp.params, mc_samples=samples, seed=1, batch_size=16
        )
        fisher = F.to_dense()
        np.testing.assert_allclose(fisher, fisher.T, atol=1e-12 * np.abs(fisher).max())
        errors.append(rel_err(fisher, dense))
    v = np.random.default_rng(2).normal(size=F.shape[0])
    np.testing.assert_array_equal(F @ v, F @ v)  # the same samples at every product
    np.testing.assert_allclose(F @ v, fisher @ v, rtol=1e-10)
    assert errors[1] < errors[0] / 4
    assert errors[1] < 0.2
    with pytest.raises(ValueError, match="GGNOperator"):
        hessop.FisherOperator(mlp.model, mlp.loss_fn, (mlp.x, mlp.y), fisher_type="type2")
    with pytest.raises(TypeError, match="reduce"):
        hessop.FisherOperator(mlp.model, mlp.loss_fn, (mlp.x, mlp.y), reduce="sum")


@pytest.mark.parametrize("loss", ["sparse_ce", "bce", "mse", "custom"])
def test_sampled_label_gradients_have_the_loss_hessian_as_covariance(loss):
    """E[g gᵀ] at labels sampled from the predictive is the loss's Hessian in the outputs (closed forms)."""
    import keras
    import tensorflow as tf

    from hessop.autodiff.engine import Engine
    from hessop.operators.ggn import _sampled_label_gradients

    f = tf.constant([[0.5, -1.0, 2.0], [0.0, 0.3, -0.2]], tf.float64)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Identity(dtype="float64")])
    keras_losses = {
        "sparse_ce": keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64"),
        "bce": keras.losses.BinaryCrossentropy(from_logits=True, dtype="float64"),
        "mse": keras.losses.MeanSquaredError(dtype="float64"),
        "custom": lambda y, p: tf.reduce_sum((p - y) ** 2, axis=-1),
    }
    w = tf.Variable(np.ones(1))
    engine = Engine(model, keras_losses[loss], [w])
    y = tf.zeros((2, 3), tf.float64) if loss != "sparse_ce" else tf.constant([0, 2])
    g = _sampled_label_gradients(engine, y, f, 40_000, tf.constant([1, 2], tf.int64))
    if loss == "custom":
        assert g is None
        return
    covariance = np.einsum("bkr,blr->bkl", g, g)
    p = tf.nn.softmax(f).numpy() if loss == "sparse_ce" else tf.sigmoid(f).numpy()
    expected = {
        "sparse_ce": np.stack([np.diag(q) - np.outer(q, q) for q in p]),
        "bce": np.stack([np.diag(q * (1 - q)) / 3 for q in p]),
        "mse": np.broadcast_to(2 / 3 * np.eye(3), (2, 3, 3)),
    }[loss]
    # 40,000 samples: a standard error of about 0.5 % of the largest entry; allow 3 %.
    np.testing.assert_allclose(covariance, expected, atol=0.03 * np.abs(expected).max())


def test_the_diagonal_of_an_embedding_model_does_not_densify_with_a_warning() -> None:
    """Embedding gradients are IndexedSlices: the per-column backward passes densify them quietly."""
    import logging

    from zoo import transformer_case

    case = transformer_case()
    G = hessop.GGNOperator(case.model, case.loss_fn, (case.x, case.y))
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("tensorflow")
    logger.addHandler(handler)
    try:
        diagonal = hessop.diagonal(G)
    finally:
        logger.removeHandler(handler)
    assert np.all(np.isfinite(diagonal))
    assert not [r for r in records if "IndexedSlices" in r.getMessage()]
