"""influence_scores against dense first-order truths, plain gradient products and leave-one-out retraining."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import scipy.optimize
import scipy.sparse.linalg
import scipy.special
import scipy.stats
import tensorflow as tf
from conftest import rel_err

import hessop

F64 = "float64"


def per_example_gradients(model, loss_fn, x, y):
    """(N, P) by one GradientTape per example: first-order only."""
    rows = []
    for n in range(len(x)):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(loss_fn(y[n : n + 1], model(x[n : n + 1])))
        rows.append(np.concatenate([np.ravel(g) for g in tape.gradient(loss, model.trainable_variables)]))
    return np.array(rows)


def output_jacobians(model, x):
    """(N, K, P) output Jacobians, first-order."""
    out = []
    for n in range(len(x)):
        with tf.GradientTape() as tape:
            f = tf.reshape(model(x[n : n + 1]), [-1])
        jac = tape.jacobian(f, model.trainable_variables)
        out.append(np.concatenate([np.reshape(j, (f.shape[0], -1)) for j in jac], axis=1))
    return np.array(out)


def deep_linear():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 4))
    x -= x.mean(axis=0)
    y = rng.normal(size=(24, 2))
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((4,), dtype=F64),
            keras.layers.Dense(3, use_bias=False, dtype=F64),
            keras.layers.Dense(2, use_bias=False, dtype=F64),
        ]
    )
    loss = keras.losses.MeanSquaredError(reduction=None, dtype=F64)
    return model, loss, x, y


@pytest.mark.parametrize("curvature", ["ekfac", "kfac"])
def test_exact_where_kfac_is_exact(curvature):
    """Deep linear, squared error: (E)KFAC is the layer-block GGN, so the scores are the exact ones under it."""
    model, loss, x, y = deep_linear()
    damping = 1e-3
    jac = output_jacobians(model, x)  # (N, K, P); MSE's output Hessian is (2/K) I
    ggn = np.einsum("nkp,nkq->pq", jac, jac) * (2 / 2) / len(x)
    sizes = np.cumsum([0] + [int(np.prod(v.shape)) for v in model.trainable_variables])
    blocks = np.zeros_like(ggn)
    for first, last in zip(sizes[:-1], sizes[1:]):
        blocks[first:last, first:last] = ggn[first:last, first:last]
    train = per_example_gradients(model, loss, x, y)
    test = train[:3]
    expected = -test @ np.linalg.solve(blocks + damping * np.eye(len(blocks)), train.T)
    result = hessop.influence_scores(model, loss, (x, y), (x[:3], y[:3]), curvature=curvature, damping=damping, top_k=4)
    assert rel_err(result.scores, expected) < 1e-7
    assert np.array_equal(result.helpful, np.argsort(expected, axis=1)[:, :4])
    assert np.array_equal(result.harmful, np.argsort(-expected, axis=1)[:, :4])


def test_ekfac_beats_gradient_products_on_a_nonlinear_classifier():
    """Against the exact influence (dense GGN + δI): EK-FAC must be clearly closer than TracIn-style g_qᵀ g_n."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(96, 6))
    y = (x[:, 0] + np.sin(2 * x[:, 1]) > 0).astype(np.int64) + (x[:, 2] > 1).astype(np.int64)
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [
            keras.Input((6,), dtype=F64),
            keras.layers.Dense(8, activation="tanh", dtype=F64),
            keras.layers.Dense(3, dtype=F64),
        ]
    )
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None, dtype=F64)
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss=loss)
    model.fit(x, y, epochs=60, batch_size=32, verbose=0)
    damping = 1e-2
    ggn = hessop.GGNOperator(model, loss, (x, y)).to_dense()
    train = per_example_gradients(model, loss, x, y)
    queries = slice(0, 4)
    exact = -train[queries] @ np.linalg.solve(ggn + damping * np.eye(len(ggn)), train.T)
    ekfac = hessop.influence_scores(model, loss, (x, y), (x[queries], y[queries]), damping=damping).scores
    tracin = -train[queries] @ train.T
    pearson = [np.mean([scipy.stats.pearsonr(a[q], exact[q])[0] for q in range(4)]) for a in (ekfac, tracin)]
    assert pearson[0] > 0.7 and pearson[0] > pearson[1] + 0.1, pearson  # measured 0.75 against 0.58


def test_leave_one_out_retraining_on_l2_logistic_regression():
    """Removing example n changes the test loss by about −𝓘ₙ / N; here against retraining without it."""
    rng = np.random.default_rng(2)
    num, lam = 80, 0.05
    x = rng.normal(size=(num, 3))
    y = (x @ np.array([1.5, -1.0, 0.5]) + rng.normal(size=num) > 0).astype(np.float64)
    x_test, y_test = rng.normal(size=(1, 3)), np.array([1.0])

    def objective(theta, rows):
        logits = x[rows] @ theta[:3] + theta[3]
        losses = np.logaddexp(0, logits) - y[rows] * logits
        residual = scipy.special.expit(logits) - y[rows]
        # Σ over the kept rows / N: removing n keeps everyone else's weight (and the penalty's) as it was.
        grad = np.concatenate([x[rows].T @ residual, [residual.sum()]]) / num
        return losses.sum() / num + lam / 2 * theta @ theta, grad + lam * theta

    def fit(rows, start):
        return scipy.optimize.minimize(objective, start, args=(rows,), jac=True, method="BFGS", options={"gtol": 1e-13}).x

    def test_loss(theta):
        logit = x_test @ theta[:3] + theta[3]
        return float((np.logaddexp(0, logit) - y_test * logit)[0])

    theta = fit(np.arange(num), np.zeros(4))
    model = keras.Sequential([keras.Input((3,), dtype=F64), keras.layers.Dense(1, dtype=F64)])
    model.layers[0].kernel.assign(theta[:3, None])
    model.layers[0].bias.assign(theta[3:])
    loss = keras.losses.BinaryCrossentropy(from_logits=True, reduction=None, dtype=F64)
    hessian = hessop.HessianOperator(model, loss, (x, y[:, None]))
    result = hessop.influence_scores(model, loss, (x, y[:, None]), (x_test, y_test[:, None]), curvature=hessian, damping=lam)
    predicted = -result.scores[0] / num
    actual = np.array([test_loss(fit(np.delete(np.arange(num), n), theta)) - test_loss(theta) for n in range(num)])
    assert scipy.stats.pearsonr(predicted, actual)[0] > 0.99
    assert rel_err(predicted, actual) < 0.1


def test_bad_input():
    model, loss, x, y = deep_linear()
    with pytest.raises(ValueError, match="curvature"):
        hessop.influence_scores(model, loss, (x, y), (x[:1], y[:1]), curvature="hessian")
    with pytest.raises(TypeError, match="curvature"):
        hessop.influence_scores(model, loss, (x, y), (x[:1], y[:1]), curvature=np.eye(14))
    with pytest.raises(ValueError, match="damping"):
        hessop.influence_scores(model, loss, (x, y), (x[:1], y[:1]), damping=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        hessop.influence_scores(model, loss, (x, y), (x[:1], y[:1]), top_k=0)
    wrong = scipy.sparse.linalg.aslinearoperator(np.eye(5))
    with pytest.raises(ValueError, match="does not match"):
        hessop.influence_scores(model, loss, (x, y), (x[:1], y[:1]), curvature=wrong)
