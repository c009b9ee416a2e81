"""Probit, Laplace bridge and Monte-Carlo predictives against quadrature and the bridge's closed-form inverse."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.special
import scipy.stats

from hessop.stats.likelihoods import laplace_bridge, mc_probabilities, probit

MEANS = np.array([-3.0, -0.5, 0.0, 1.2, 4.0])
VARIANCES = np.array([0.1, 1.0, 4.0, 2.5, 9.0])


def quadrature(means, variances, link):
    """E[link(f)] for f ~ N(μ, s²) by 200-point Gauss-Hermite."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(200)
    f = means[:, None] + np.sqrt(variances)[:, None] * nodes
    return (link(f) @ weights) / np.sqrt(2 * np.pi)


def test_probit_is_exact_for_the_probit_link_and_close_for_the_sigmoid():
    # With σ(t) replaced by Φ(λt), λ² = π/8, E[Φ(λf)] = Φ(λμ/√(1 + λ²s²)) exactly: the formula's origin.
    lam = np.sqrt(np.pi / 8)
    exact_probit = quadrature(MEANS, VARIANCES, lambda f: scipy.stats.norm.cdf(lam * f))
    ours = probit(MEANS[:, None], VARIANCES[:, None, None])[:, 0]
    assert np.max(np.abs(scipy.stats.norm.cdf(lam * MEANS / np.sqrt(1 + lam**2 * VARIANCES)) - exact_probit)) < 1e-12
    assert np.max(np.abs(scipy.special.expit(MEANS / np.sqrt(1 + np.pi * VARIANCES / 8)) - ours)) < 1e-15
    # Against the sigmoid's own expectation: the approximation is good to about 0.02.
    assert np.max(np.abs(ours - quadrature(MEANS, VARIANCES, scipy.special.expit))) < 0.02


def test_mc_matches_quadrature_within_sampling_error():
    exact = quadrature(MEANS, VARIANCES, scipy.special.expit)
    samples = 200_000
    ours = mc_probabilities(MEANS[:, None], VARIANCES[:, None, None], samples, seed=0)[:, 0]
    assert np.all(np.abs(ours - exact) < 5 * 0.5 / np.sqrt(samples))
    again = mc_probabilities(MEANS[:, None], VARIANCES[:, None, None], samples, seed=0)[:, 0]
    assert np.array_equal(ours, again)  # seeded


def test_mc_multiclass_matches_many_samples_of_the_softmax():
    rng = np.random.default_rng(1)
    mean = rng.normal(size=(3, 4))
    root = rng.normal(size=(3, 4, 4)) / 2
    cov = root @ root.transpose(0, 2, 1)
    ours = mc_probabilities(mean, cov, 100_000, seed=2)
    logits = mean[:, None, :] + np.einsum("nij,nsj->nsi", root, rng.normal(size=(3, 400_000, 4)))
    reference = scipy.special.softmax(logits, axis=-1).mean(axis=1)
    assert np.max(np.abs(ours - reference)) < 5e-3
    assert np.allclose(ours.sum(axis=1), 1.0)


def dirichlet_to_logistic_normal(alpha):
    """The Laplace approximation of Dirichlet(α) in the softmax basis (Hobbhahn et al., 2022, eq. 2)."""
    k = alpha.size
    mean = np.log(alpha) - np.mean(np.log(alpha))
    inverse = 1.0 / alpha
    cov = np.diag(inverse) - (inverse[:, None] + inverse[None, :]) / k + inverse.sum() / k**2
    return mean, cov


@pytest.mark.parametrize("alpha", [np.array([1.5, 2.0, 7.0]), np.array([3.0, 0.8, 2.2, 5.5, 1.1])])
def test_bridge_inverts_the_dirichlet_laplace_approximation(alpha):
    mean, cov = dirichlet_to_logistic_normal(alpha)
    cov = cov + 0.3 * np.ones_like(cov)  # a sum direction, which the bridge's zero-sum projection removes
    ours = laplace_bridge(mean[None], cov[None])[0]
    assert np.max(np.abs(ours - alpha / alpha.sum())) < 1e-12


def test_bridge_refuses_one_logit():
    with pytest.raises(ValueError, match="C ≥ 2"):
        laplace_bridge(np.zeros((2, 1)), np.ones((2, 1, 1)))
