"""covariance, standard_errors, summary, predictive_variance, influence against closed forms.

Maximum-likelihood fits are done here with Newton's method in numpy, independently of hessop.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.optimize
import scipy.sparse.linalg
import tensorflow as tf
from conftest import mlp_case, rel_err

import hessop


def newton(design, y, family, penalty=0.0, iterations=50):
    """MLE (or ridge-penalised estimate) of a logistic or Poisson GLM, in numpy."""
    beta = np.zeros(design.shape[1])
    for _ in range(iterations):
        eta = design @ beta
        mu = 1 / (1 + np.exp(-eta)) if family == "logistic" else np.exp(eta)
        w = mu * (1 - mu) if family == "logistic" else mu
        grad = design.T @ (mu - y) / len(y) + penalty * beta
        hess = design.T @ (design * w[:, None]) / len(y) + penalty * np.eye(len(beta))
        beta -= np.linalg.solve(hess, grad)
    return beta


def glm_model(design, family, beta):
    """Plain-TF GLM with its per-example negative log-likelihood."""
    variable = tf.Variable(beta, dtype=tf.float64)

    def model(x):
        return tf.linalg.matvec(x, variable)

    if family == "logistic":

        def nll(y, eta):
            return tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=eta)

    else:

        def nll(y, eta):
            return tf.exp(eta) - y * eta

    return model, nll, variable


def simulate(family, num_data, seed):
    rng = np.random.default_rng(seed)
    design = np.column_stack([np.ones(num_data), rng.normal(size=(num_data, 2))])
    truth = np.array([0.3, -0.8, 0.5])
    eta = design @ truth
    if family == "logistic":
        y = (rng.uniform(size=num_data) < 1 / (1 + np.exp(-eta))).astype(float)
    else:
        y = rng.poisson(np.exp(eta)).astype(float)
    return design, y, truth


def closed_forms(design, y, beta, family):
    eta = design @ beta
    mu = 1 / (1 + np.exp(-eta)) if family == "logistic" else np.exp(eta)
    w = mu * (1 - mu) if family == "logistic" else mu
    bread = np.linalg.inv(design.T @ (design * w[:, None]))
    residual = y - mu
    meat = design.T @ (design * (residual**2)[:, None])
    return bread, bread @ meat @ bread


@pytest.fixture(params=["logistic", "poisson"])
def fitted(request):
    family = request.param
    design, y, _ = simulate(family, 400, seed=11)
    beta = newton(design, y, family)
    model, nll, variable = glm_model(design, family, beta)
    H = hessop.HessianOperator(model, nll, (design, y), params=[variable], batch_size=128)
    G = hessop.OPGOperator(model, nll, (design, y), params=[variable], batch_size=128)
    return family, design, y, beta, H, G, variable


def test_covariance_and_sandwich_equal_closed_forms(fitted):
    family, design, y, beta, H, G, _ = fitted
    model_cov, sandwich = closed_forms(design, y, beta, family)
    assert rel_err(hessop.covariance(H).to_dense(), model_cov) < 1e-8
    assert rel_err(hessop.covariance(H, opg=G).to_dense(), sandwich) < 1e-8


@pytest.mark.parametrize("sandwich", [False, True])
def test_standard_errors_agree_across_methods(fitted, sandwich):
    *_, H, G, _ = fitted
    opg = G if sandwich else None
    dense = hessop.standard_errors(H, opg=opg, method="dense")
    cg = hessop.standard_errors(H, opg=opg, method="cg")
    low_rank = hessop.standard_errors(H, opg=opg, method="low_rank", k=H.shape[0])
    assert rel_err(cg, dense) < 1e-8
    assert rel_err(low_rank, dense) < 1e-8


@pytest.mark.parametrize("method", ["dense", "cg", "low_rank"])
def test_damping_adds_to_the_hessian(fitted, method):
    family, design, y, beta, H, _, _ = fitted
    damping = 0.3
    information = np.linalg.inv(closed_forms(design, y, beta, family)[0]) / len(y)  # X^T W X / N
    expected = np.linalg.inv(len(y) * (information + damping * np.eye(3)))
    cov = hessop.covariance(H, damping=damping, method=method, k=3)
    assert rel_err(cov @ np.eye(3), expected) < 1e-8


def test_stochastic_standard_errors_are_close(fitted):
    *_, H, _, _ = fitted
    exact = hessop.standard_errors(H, method="cg")
    estimate = hessop.standard_errors(H, method="cg", num_probes=400)
    assert rel_err(estimate, exact) < 0.5  # a Hutchinson estimate: close, not exact


def test_negative_stochastic_variances_are_nan_with_a_warning():
    # One Rademacher probe z gives the estimates z ∘ Cz = diag(C) + z0 z1 (c01, c01): with a strong
    # correlation, z0 z1 = -1 makes the first negative. Its standard error was clipped to a false 0.
    c01 = 0.999 * 10
    H = scipy.sparse.linalg.aslinearoperator(np.linalg.inv([[1.0, c01], [c01, 100.0]]))
    assert np.allclose(hessop.standard_errors(H, num_data=1), [1.0, 10.0])
    seen = set()
    for seed in range(10):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            estimate = hessop.standard_errors(H, num_data=1, num_probes=1, seed=seed)
        if np.isnan(estimate[0]):
            assert np.isclose(estimate[1], np.sqrt(100.0 - c01))
            assert [str(w.message)[:70] for w in caught] == [
                "standard_errors: 1 of 2 Hutchinson estimates of the variance are negat"
            ]
            seen.add("negative")
        else:
            assert np.allclose(estimate, np.sqrt([1.0 + c01, 100.0 + c01])) and not caught
            seen.add("positive")
    assert seen == {"negative", "positive"}


def test_summary_table(fitted):
    family, design, y, beta, H, _, variable = fitted
    table = hessop.summary([variable], hessop.covariance(H))
    se = np.sqrt(np.diag(closed_forms(design, y, beta, family)[0]))
    assert np.allclose(table.std_error, se, rtol=1e-8)
    assert np.allclose(table.z, beta / se)
    assert np.allclose(table.lower, beta - 1.959963984540054 * se)
    text = str(table)
    assert "std.err" in text and "p-value" in text and len(text.splitlines()) == 2 + len(beta)
    with pytest.raises(ValueError, match="names"):
        hessop.summary([variable], hessop.covariance(H), names=["a"])


def test_wald_intervals_cover_at_nominal_rate():
    covered, total = 0, 0
    for seed in range(60):
        design, y, truth = simulate("logistic", 300, seed=1000 + seed)
        beta = newton(design, y, "logistic")
        model, nll, variable = glm_model(design, "logistic", beta)
        H = hessop.HessianOperator(model, nll, (design, y), params=[variable], hvp_mode="reverse", check_deterministic=False)
        table = hessop.summary([variable], hessop.covariance(H))
        covered += int(np.sum((table.lower <= truth) & (truth <= table.upper)))
        total += truth.size
    rate = covered / total
    # 180 intervals at 95%: the binomial standard deviation is 1.6 points; allow ~2.5 of them.
    assert 0.91 <= rate <= 0.99, rate


def test_not_positive_definite_hessian_is_refused():
    case = mlp_case()  # an untrained MLP: indefinite Hessian
    H = hessop.HessianOperator(case.model, case.loss_fn, (case.x, case.y))
    for method in ("dense", "low_rank"):
        with pytest.raises(hessop.NotPositiveDefiniteError, match="smallest eigenvalue"):
            hessop.covariance(H, method=method, k=5)
    lazy = hessop.covariance(H, method="cg")  # solves happen per product
    with pytest.raises(hessop.NotPositiveDefiniteError, match="smallest eigenvalue"):
        lazy.diagonal()
    with pytest.raises(ValueError, match="smallest eigenvalue"):
        hessop.standard_errors(H)


def test_bad_covariance_arguments(fitted):
    family, design, y, beta, H, G, variable = fitted
    model, nll, _ = glm_model(design, family, beta)
    small = hessop.OPGOperator(model, nll, (design[:50], y[:50]), params=[variable])
    with pytest.raises(ValueError, match="50 examples"):
        hessop.covariance(H, opg=small)
    other = tf.Variable(np.zeros(2))
    wrong_shape = hessop.OPGOperator(lambda x: tf.linalg.matvec(x[:, :2], other), nll, (design, y), params=[other])
    with pytest.raises(ValueError, match="does not match"):
        hessop.covariance(H, opg=wrong_shape)
    with pytest.raises(ValueError, match="method"):
        hessop.covariance(H, method="qr")
    with pytest.raises(ValueError, match="damping"):
        hessop.covariance(H, damping=-1.0)
    with pytest.raises(ValueError, match="k=4 exceeds"):
        hessop.covariance(H, method="low_rank", k=4)
    with pytest.raises(ValueError, match="num_data"):
        hessop.covariance(hessop.LowRankOperator(np.eye(3), np.ones(3)))


def test_predictive_variance_is_delta_method(fitted):
    family, design, y, beta, H, _, variable = fitted
    model, _, _ = glm_model(design, family, beta)
    cov = hessop.covariance(H)
    new = design[:7]
    variance = hessop.predictive_variance(
        lambda x: tf.linalg.matvec(x, variable)[:, None], new, cov, params=[variable], batch_size=3
    )
    expected = np.einsum("ij,jk,ik->i", new, closed_forms(design, y, beta, family)[0], new)
    assert variance.shape == (7, 1, 1)
    assert rel_err(variance[:, 0, 0], expected) < 1e-8
    with pytest.raises(TypeError, match=r"x: expected input arrays, got a LinearOperator; the order is"):
        hessop.predictive_variance(lambda x: tf.linalg.matvec(x, variable)[:, None], cov, new, params=[variable])
    with pytest.raises(ValueError, match="x: expected input arrays with a leading example dimension, got float"):
        hessop.predictive_variance(lambda x: tf.linalg.matvec(x, variable)[:, None], 1.0, cov, params=[variable])
    bad = new.copy()
    bad[[2, 5], 1] = [np.nan, np.inf]
    with pytest.raises(ValueError, match=r"^x: 2 of 7 examples have non-finite inputs"):
        hessop.predictive_variance(lambda x: tf.linalg.matvec(x, variable)[:, None], bad, cov, params=[variable])


def test_influence_matches_leave_one_out():
    """Ridge-penalised logistic regression (strongly convex): retrain without each point."""
    design, y, _ = simulate("logistic", 40, seed=5)
    penalty = 0.05
    beta = newton(design, y, "logistic", penalty)
    variable = tf.Variable(beta, dtype=tf.float64)

    def model(x):
        return tf.linalg.matvec(x, variable)

    def nll(y, eta):
        return tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=eta)

    def penalised(y, eta):
        return nll(y, eta) + 0.5 * penalty * tf.reduce_sum(variable**2)

    H = hessop.HessianOperator(model, penalised, (design, y), params=[variable])
    J = hessop.JacobianOperator(model, nll, (design, y), params=[variable])
    x_test, y_test = np.array([1.0, 0.7, -1.2]), 1.0

    def test_loss(b):
        eta = x_test @ b
        return np.logaddexp(0, eta) - y_test * eta

    p_test = 1 / (1 + np.exp(-x_test @ beta))
    test_gradient = (p_test - y_test) * x_test
    influences = hessop.influence(H, J, test_gradient)
    assert np.allclose(influences, hessop.influence(H, J @ np.eye(3), test_gradient, method="dense"), rtol=1e-8)

    n = len(y)
    loo_change = np.empty(n)
    for i in range(n):
        weights = np.ones(n)
        weights[i] = 0.0

        def objective(b, weights=weights):
            eta = design @ b
            return np.sum(weights * (np.logaddexp(0, eta) - y * eta)) / n + 0.5 * penalty * b @ b

        refit = scipy.optimize.minimize(objective, beta, method="BFGS", options={"gtol": 1e-12}).x
        loo_change[i] = test_loss(refit) - test_loss(beta)
    predicted = -influences / n
    assert np.corrcoef(predicted, loo_change)[0, 1] > 0.99
    assert rel_err(predicted, loo_change) < 0.15  # first order in 1/N


def test_influence_bad_input(fitted):
    *_, H, _, _ = fitted
    with pytest.raises(ValueError, match="test_gradient"):
        hessop.influence(H, np.ones((4, 3)), np.ones(2))
    with pytest.raises(ValueError, match="train_gradients"):
        hessop.influence(H, np.ones((4, 2)), np.ones(3))
    with pytest.raises(ValueError, match="method"):
        hessop.influence(H, np.ones((4, 3)), np.ones(3), method="svd")
    # Arguments out of order: numpy's own error named no argument.
    with pytest.raises(TypeError, match=r"^test_gradient: expected an array of real numbers, got HessianOperator"):
        hessop.influence(H, np.ones(3), H)
    with pytest.raises(TypeError, match="test_gradient: expected real numbers, got complex"):
        hessop.influence(H, np.ones((4, 3)), np.ones(3) * 1j)  # numpy dropped the imaginary part with a warning
