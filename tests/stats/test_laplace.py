"""Laplace against the closed-form Bayesian linear regression posterior (where it is exact)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from conftest import mlp_case, rel_err

import hessop

NOISE = 0.5  # known observation standard deviation σ
PRIOR = 2.0  # prior precision τ


def regression(num_data=30, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_data, 3))
    y = x @ np.array([1.0, -2.0, 0.5]) + NOISE * rng.normal(size=num_data)
    return x, y


def exact_posterior(x, y, tau=PRIOR):
    precision = x.T @ x / NOISE**2 + tau * np.eye(x.shape[1])
    cov = np.linalg.inv(precision)
    mean = cov @ x.T @ y / NOISE**2
    evidence_cov = NOISE**2 * np.eye(len(y)) + x @ x.T / tau
    sign, logdet = np.linalg.slogdet(evidence_cov)
    evidence = -0.5 * (y @ np.linalg.solve(evidence_cov, y) + logdet + len(y) * np.log(2 * np.pi))
    return mean, cov, evidence


def gaussian_model(mean):
    w = tf.Variable(mean, dtype=tf.float64)

    def model(x):
        return tf.linalg.matvec(x, w)

    def nll(y, f):  # full Gaussian negative log-likelihood, constants included
        return 0.5 * ((y - f) / NOISE) ** 2 + 0.5 * np.log(2 * np.pi * NOISE**2)

    return model, nll, w


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_laplace_equals_bayesian_linear_regression(curvature):
    x, y = regression()
    mean, cov, evidence = exact_posterior(x, y)
    model, nll, w = gaussian_model(mean)
    la = hessop.Laplace(model, nll, (x, y), params=[w], curvature=curvature, prior_precision=PRIOR, batch_size=7)
    assert rel_err(la.mean, mean) < 1e-12
    assert rel_err(la.posterior_covariance.to_dense(), cov) < 1e-10
    assert rel_err(la.posterior_precision.to_dense(), np.linalg.inv(cov)) < 1e-10
    assert abs(la.log_marginal_likelihood() - evidence) < 1e-8 * abs(evidence)


def test_low_rank_with_k_equal_p_is_exact():
    x, y = regression()
    mean, cov, evidence = exact_posterior(x, y)
    model, nll, w = gaussian_model(mean)
    la = hessop.Laplace(model, nll, (x, y), params=[w], prior_precision=PRIOR, k=3)
    assert rel_err(la.posterior_covariance.to_dense(), cov) < 1e-8
    assert abs(la.log_marginal_likelihood() - evidence) < 1e-8 * abs(evidence)
    partial = hessop.Laplace(model, nll, (x, y), params=[w], prior_precision=PRIOR, k=1)
    top_variance_direction = partial.posterior_covariance.to_dense()
    assert rel_err(top_variance_direction, cov) > 1e-3  # truncation is visible with k < P


def test_samples_have_the_posterior_covariance():
    x, y = regression()
    mean, cov, _ = exact_posterior(x, y)
    model, nll, w = gaussian_model(mean)
    la = hessop.Laplace(model, nll, (x, y), params=[w], prior_precision=PRIOR)
    samples = la.sample(40_000, seed=0)
    assert samples.shape == (40_000, 3)
    assert np.allclose(samples.mean(axis=0), mean, atol=4 * np.sqrt(np.diag(cov) / 40_000).max())
    assert rel_err(np.cov(samples.T), cov) < 0.05


def test_predictive_matches_closed_form():
    x, y = regression()
    mean, cov, _ = exact_posterior(x, y)
    model, nll, w = gaussian_model(mean)
    la = hessop.Laplace(model, nll, (x, y), params=[w], prior_precision=PRIOR)
    new = np.random.default_rng(3).normal(size=(5, 3))
    f_mean, f_cov = la.predictive(new, batch_size=2)
    assert f_mean.shape == (5, 1) and f_cov.shape == (5, 1, 1)
    assert rel_err(f_mean[:, 0], new @ mean) < 1e-12
    assert rel_err(f_cov[:, 0, 0], np.einsum("ij,jk,ik->i", new, cov, new)) < 1e-10


def test_predictive_of_two_heads_puts_them_side_by_side():
    # Heads a = xᵀw and b = 2xᵀw, the likelihood on a only: the posterior is
    # that of the one-head model, and each example's output covariance is
    # s·[[1, 2], [2, 4]] with s = xᵀΣx (heads in sorted-key order).
    x, y = regression()
    mean, cov, _ = exact_posterior(x, y)
    model, nll, w = gaussian_model(mean)

    def heads(x):
        f = model(x)[:, None]
        return {"b": 2 * f, "a": f}

    la = hessop.Laplace(heads, lambda y, out: nll(y, out["a"][:, 0]), (x, y), params=[w], prior_precision=PRIOR)
    assert rel_err(la.posterior_covariance.to_dense(), cov) < 1e-10
    new = np.random.default_rng(4).normal(size=(5, 3))
    f_mean, f_cov = la.predictive(new, batch_size=2)
    assert f_mean.shape == (5, 2) and f_cov.shape == (5, 2, 2)
    assert rel_err(f_mean, np.column_stack([new @ mean, 2 * new @ mean])) < 1e-12
    s = np.einsum("ij,jk,ik->i", new, cov, new)
    assert rel_err(f_cov, s[:, None, None] * np.array([[1.0, 2.0], [2.0, 4.0]])) < 1e-10


def test_predictive_of_a_tf_module_model():
    # A tf.Module has trainable_variables but its __call__ takes no
    # training argument: the mean calls it as the products do.
    x, y = regression()
    mean, cov, _ = exact_posterior(x, y)
    _, nll, _ = gaussian_model(mean)

    class Linear(tf.Module):
        def __init__(self) -> None:
            self.w = tf.Variable(mean, dtype=tf.float64)

        def __call__(self, x):
            return tf.linalg.matvec(x, self.w)

    model = Linear()
    la = hessop.Laplace(model, nll, (x, y), params=[model.w], prior_precision=PRIOR)
    new = np.random.default_rng(5).normal(size=(4, 3))
    f_mean, f_cov = la.predictive(new)
    assert rel_err(f_mean[:, 0], new @ mean) < 1e-12
    assert rel_err(f_cov[:, 0, 0], np.einsum("ij,jk,ik->i", new, cov, new)) < 1e-10


def test_optimize_prior_precision_maximises_the_evidence():
    x, y = regression()
    mean, _, _ = exact_posterior(x, y)
    model, nll, w = gaussian_model(mean)
    la = hessop.Laplace(model, nll, (x, y), params=[w], prior_precision=PRIOR)
    before = la.log_marginal_likelihood()
    best = la.optimize_prior_precision()
    assert la.prior_precision == best
    after = la.log_marginal_likelihood()
    assert after >= before
    for factor in (0.9, 1.1):  # a maximum: nearby values are no better
        assert la.log_marginal_likelihood(best * factor) <= after + 1e-9


def test_bad_input():
    x, y = regression()
    model, nll, w = gaussian_model(np.zeros(3))
    with pytest.raises(ValueError, match="prior_precision"):
        hessop.Laplace(model, nll, (x, y), params=[w], prior_precision=-1.0)
    with pytest.raises(ValueError, match="curvature"):
        hessop.Laplace(model, nll, (x, y), params=[w], curvature="fisher")
    with pytest.raises(ValueError, match="k=4 exceeds"):
        hessop.Laplace(model, nll, (x, y), params=[w], k=4)
    case = mlp_case()
    with pytest.raises(hessop.NotPositiveDefiniteError, match="smallest eigenvalue"):
        hessop.Laplace(case.model, case.loss_fn, (case.x, case.y), curvature="hessian", prior_precision=1e-3)
    la = hessop.Laplace(case.model, case.loss_fn, (case.x, case.y), prior_precision=1.0)  # GGN: fine
    assert la.posterior_covariance.shape == (39, 39)
