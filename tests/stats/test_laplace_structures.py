"""Likelihoods, posterior structures, subsets and hyperparameters of Laplace, against closed forms and dense truths."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import scipy.optimize
from conftest import mlp_case, rel_err

import hessop

F64 = "float64"


def linear_data(num_data=40, seed=0, centred=False, orthogonal=False):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_data, 3))
    if centred:
        x -= x.mean(axis=0)
    if orthogonal:  # XᵀX diagonal: the GGN of a linear model is diagonal
        q, _ = np.linalg.qr(x)
        x = q * np.array([3.0, 2.0, 1.0]) * np.sqrt(num_data)
    y = x @ np.array([1.0, -2.0, 0.5]) + 0.3 + 0.5 * rng.normal(size=num_data)
    return x, y[:, None]


def linear_model(weights=None, bias=True):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,), dtype=F64), keras.layers.Dense(1, use_bias=bias, dtype=F64)])
    if weights is not None:
        model.layers[0].kernel.assign(np.reshape(weights[:3], (3, 1)))
        if bias:
            model.layers[0].bias.assign(weights[3:])
    return model


def blr(x, y, sigma, tau):
    """Bayesian linear regression with a bias column: posterior mean, covariance and exact evidence."""
    design = np.hstack([x, np.ones((len(x), 1))])
    precision = design.T @ design / sigma**2 + tau * np.eye(4)
    cov = np.linalg.inv(precision)
    mean = cov @ design.T @ y[:, 0] / sigma**2
    marginal = sigma**2 * np.eye(len(y)) + design @ design.T / tau
    _, logdet = np.linalg.slogdet(marginal)
    evidence = -0.5 * (y[:, 0] @ np.linalg.solve(marginal, y[:, 0]) + logdet + len(y) * np.log(2 * np.pi))
    return mean, cov, evidence


# -- likelihoods ------------------------------------------------------------------------
@pytest.mark.parametrize("structure", ["full", "kron", "ekfac"])
def test_regression_with_sigma_is_bayesian_linear_regression(structure):
    """Exact for these structures: centred inputs decouple kernel and bias (diag: its own test below)."""
    sigma, tau = 0.7, 2.0
    x, y = linear_data(centred=True)
    mean, cov, evidence = blr(x, y, sigma, tau)
    model = linear_model(mean)
    la = hessop.Laplace(model, None, (x, y), likelihood="regression", sigma_noise=sigma, prior_precision=tau, structure=structure)
    assert rel_err(la.mean, mean) < 1e-12
    assert rel_err(la.posterior_covariance.to_dense(), cov) < 1e-10
    assert abs(la.log_marginal_likelihood() - evidence) < 1e-9 * abs(evidence)
    new = np.random.default_rng(3).normal(size=(5, 3))
    predictive = la.predictive(new)
    design = np.hstack([new, np.ones((5, 1))])
    f_var = np.einsum("ij,jk,ik->i", design, cov, design)
    assert rel_err(predictive.mean[:, 0], design @ mean) < 1e-12
    assert rel_err(predictive.function_covariance[:, 0, 0], f_var) < 1e-10
    assert rel_err(predictive.covariance[:, 0, 0], f_var + sigma**2) < 1e-10


def test_evidence_optimum_over_sigma_and_tau_is_the_closed_form_one():
    """At the exact evidence's optimum (σ*, τ*), with θ̂ its mode, the Laplace evidence is stationary there.

    Envelope theorem: d/dσ of the closed form equals ∂/∂σ of the Laplace
    evidence at fixed θ̂ = θ*(σ, τ), since the log joint's gradient in θ
    vanishes at the mode. The optimum comes from the closed form alone.
    """
    x, y = linear_data(centred=True)

    def negative(z):
        return -blr(x, y, np.exp(z[0]), np.exp(z[1]))[2]

    best = scipy.optimize.minimize(negative, [0.0, 0.0], method="Nelder-Mead", options={"xatol": 1e-10, "fatol": 1e-13})
    sigma, tau = np.exp(best.x)
    mean, _, evidence = blr(x, y, sigma, tau)
    la = hessop.Laplace(linear_model(mean), None, (x, y), likelihood="regression", sigma_noise=1.0, prior_precision=1.0)
    la.optimize_prior_precision(sigma_noise=True)
    assert la.optimization.success
    assert abs(la.sigma_noise - sigma) < 1e-5 * sigma
    assert abs(la.prior_precision - tau) < 1e-4 * tau
    assert abs(la.log_marginal_likelihood() - evidence) < 1e-9 * abs(evidence)


def test_temperature_scales_the_likelihood():
    x, y = linear_data(centred=True)
    mean, _, _ = blr(x, y, 1.0, 1.0)
    model = linear_model(mean)
    cold = hessop.Laplace(model, None, (x, y), likelihood="regression", temperature=0.5, prior_precision=1.0)
    # T = ½ is σ² halved in the curvature: Λ = 2 XᵀX + τI.
    design = np.hstack([x, np.ones((len(x), 1))])
    expected = np.linalg.inv(2 * design.T @ design + np.eye(4))
    assert rel_err(cold.posterior_covariance.to_dense(), expected) < 1e-10


def classifier(num_classes=3, seed=2):
    case = mlp_case(seed=seed)
    if num_classes == 1:
        keras.utils.set_random_seed(seed)
        model = keras.Sequential(
            [keras.Input((5,), dtype=F64), keras.layers.Dense(4, activation="tanh", dtype=F64), keras.layers.Dense(1, dtype=F64)]
        )
        return model, case.x, (case.y > 0).astype(np.float64)[:, None]
    return case.model, case.x, case.y


@pytest.mark.parametrize("labels", ["sparse", "one-hot", "binary"])
def test_classification_likelihood_is_the_cross_entropy(labels):
    model, x, y = classifier(num_classes=1 if labels == "binary" else 3)
    if labels == "one-hot":
        y = np.eye(3)[y]
    if labels == "binary":
        loss = keras.losses.BinaryCrossentropy(from_logits=True, reduction=None, dtype=F64)
    elif labels == "sparse":
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None, dtype=F64)
    else:
        loss = keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None, dtype=F64)
    mine = hessop.Laplace(model, None, (x, y), likelihood="classification", prior_precision=1.0)
    theirs = hessop.Laplace(model, loss, (x, y), prior_precision=1.0)
    assert rel_err(mine.posterior_covariance.to_dense(), theirs.posterior_covariance.to_dense()) < 1e-10
    assert abs(mine.log_marginal_likelihood() - theirs.log_marginal_likelihood()) < 1e-9
    probabilities = mine.predictive(x[:6], link="mc", num_samples=5000, seed=0)
    assert probabilities.shape == (6, 1 if labels == "binary" else 3)
    assert np.all((probabilities > 0) & (probabilities < 1))
    assert np.max(np.abs(mine.predictive(x[:6], link="probit") - probabilities)) < 0.05  # an approximation


def test_classification_refuses_probabilities_and_other_losses():
    model, x, y = classifier()
    with pytest.raises(ValueError, match="on logits"):
        hessop.Laplace(model, keras.losses.SparseCategoricalCrossentropy(), (x, y), likelihood="classification")
    with pytest.raises(ValueError, match="loss_fn: with likelihood='regression'"):
        hessop.Laplace(model, keras.losses.Huber(), (x, y), likelihood="regression")
    with pytest.raises(TypeError, match="loss_fn: required"):
        hessop.Laplace(model, None, (x, y))
    with pytest.raises(ValueError, match="likelihood"):
        hessop.Laplace(model, None, (x, y), likelihood="poisson")
    la = hessop.Laplace(model, keras.losses.SparseCategoricalCrossentropy(from_logits=True), (x, y), likelihood="classification")
    with pytest.raises(ValueError, match="link"):
        la.predictive(x[:2], link="softmax")
    with pytest.raises(ValueError, match="sigma_noise: only a regression"):
        la.optimize_prior_precision(sigma_noise=True)


# -- structures -------------------------------------------------------------------------
def test_kron_and_ekfac_equal_full_per_layer_on_a_deep_linear_network():
    """Deep linear, squared error, no biases: KFAC is exact on each layer's block."""
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(30, 3)), rng.normal(size=(30, 2))
    keras.utils.set_random_seed(4)
    model = keras.Sequential(
        [
            keras.Input((3,), dtype=F64),
            keras.layers.Dense(4, use_bias=False, dtype=F64),
            keras.layers.Dense(2, use_bias=False, dtype=F64),
        ]
    )
    for layer in model.layers:
        subset = [layer.kernel]
        options = {"likelihood": "regression", "sigma_noise": 0.8, "prior_precision": 0.5, "subset": subset}
        full = hessop.Laplace(model, None, (x, y), **options)
        for structure in ("kron", "ekfac"):
            la = hessop.Laplace(model, None, (x, y), structure=structure, **options)
            assert rel_err(la.posterior_covariance.to_dense(), full.posterior_covariance.to_dense()) < 1e-9
            assert abs(la.log_marginal_likelihood() - full.log_marginal_likelihood()) < 1e-9 * abs(full.log_marginal_likelihood())
            _, cov = la.glm_predictive(x[:4])
            assert rel_err(cov, full.glm_predictive(x[:4])[1]) < 1e-9


def test_diag_equals_full_on_a_diagonal_problem():
    x, y = linear_data(orthogonal=True)
    model = linear_model(bias=False)
    model.layers[0].kernel.assign([[1.0], [-2.0], [0.5]])
    options = {"likelihood": "regression", "sigma_noise": 0.6, "prior_precision": 3.0}
    full = hessop.Laplace(model, None, (x, y), **options)
    diag = hessop.Laplace(model, None, (x, y), structure="diag", **options)
    dense = full.posterior_covariance.to_dense()
    assert np.max(np.abs(dense - np.diag(np.diag(dense)))) < 1e-12 * np.max(np.abs(dense))  # the problem is diagonal
    assert rel_err(diag.posterior_covariance.to_dense(), dense) < 1e-10
    assert abs(diag.log_marginal_likelihood() - full.log_marginal_likelihood()) < 1e-10 * abs(full.log_marginal_likelihood())


@pytest.mark.parametrize("structure", ["full", "lowrank", "kron", "ekfac", "diag"])
def test_samples_have_the_posterior_covariance(structure):
    model, x, y = classifier()
    options = {"k": 20} if structure == "lowrank" else {}
    la = hessop.Laplace(model, None, (x, y), likelihood="classification", structure=structure, prior_precision=2.0, **options)
    cov = la.posterior_covariance.to_dense()
    precision = la.posterior_precision.to_dense()
    assert rel_err(cov @ precision, np.eye(la.num_params)) < 1e-9
    samples = la.sample(40000, seed=0)
    empirical = np.cov(samples.T)
    assert np.max(np.abs(empirical - cov)) < 0.05 * np.max(np.abs(cov))


@pytest.mark.parametrize("structure", ["full", "lowrank", "kron", "ekfac", "diag"])
def test_evidence_gradients_match_finite_differences(structure):
    """The gradients L-BFGS-B follows, per layer's log τ and log σ, against central differences."""
    model, x, y = classifier()
    options = {"k": 20} if structure == "lowrank" else {}
    la = hessop.Laplace(model, None, (x, y % 2), likelihood="classification", structure=structure, **options)
    la.likelihood = "regression"  # exercise σ on the same curvature
    la.num_outputs = 3
    tau = np.array([0.7, 1.9]) if structure != "lowrank" else np.array([1.3, 1.3])
    sigma, eps = 0.9, 1e-5
    value, grad_tau, d_sigma = la._evidence(tau, sigma)
    for g in range(2):
        if structure == "lowrank":
            step = np.full(2, eps)
            expected = (la._evidence(tau * np.exp(step), sigma)[0] - la._evidence(tau * np.exp(-step), sigma)[0]) / (2 * eps)
            assert abs(np.sum(grad_tau) - expected) < 1e-6 * max(1.0, abs(expected))
            break
        step = np.zeros(2)
        step[g] = eps
        expected = (la._evidence(tau * np.exp(step), sigma)[0] - la._evidence(tau * np.exp(-step), sigma)[0]) / (2 * eps)
        assert abs(grad_tau[g] - expected) < 1e-6 * max(1.0, abs(expected))
    expected = (la._evidence(tau, sigma * np.exp(eps))[0] - la._evidence(tau, sigma * np.exp(-eps))[0]) / (2 * eps)
    assert abs(d_sigma - expected) < 1e-6 * max(1.0, abs(expected))


def test_per_layer_prior_is_optimised_to_a_stationary_point():
    model, x, y = classifier()
    la = hessop.Laplace(model, None, (x, y), likelihood="classification", structure="kron")
    tau = la.optimize_prior_precision(prior="layer")
    assert la.optimization.success and tau.shape == (2,) and len(la.prior_names) == 2
    _, grad, _ = la._evidence(tau, 1.0)
    assert np.max(np.abs(grad[(tau > 1.01e-6) & (tau < 0.99e6)])) < 1e-5
    scalar = hessop.Laplace(model, None, (x, y), likelihood="classification", structure="kron")
    scalar.optimize_prior_precision()
    assert la.log_marginal_likelihood() >= scalar.log_marginal_likelihood() - 1e-9


# -- subsets ----------------------------------------------------------------------------
def test_last_layer_equals_full_laplace_on_the_head():
    model, x, y = classifier()
    head = model.layers[-1]
    options = {"likelihood": "classification", "prior_precision": 0.5}
    last = hessop.Laplace(model, None, (x, y), subset="last_layer", **options)
    explicit = hessop.Laplace(model, None, (x, y), subset=[head.kernel, head.bias], **options)
    assert last.num_params == explicit.num_params == 15
    assert rel_err(last.posterior_covariance.to_dense(), explicit.posterior_covariance.to_dense()) < 1e-10
    assert abs(last.log_marginal_likelihood() - explicit.log_marginal_likelihood()) < 1e-10
    for link in ("probit", "bridge"):
        assert rel_err(last.predictive(x[:5], link=link), explicit.predictive(x[:5], link=link)) < 1e-10
    kron = hessop.Laplace(model, None, (x, y), subset="last_layer", structure="kron", **options)
    assert kron.num_params == 15 and np.isfinite(kron.log_marginal_likelihood())


def test_last_layer_refusals():
    model, x, y = classifier()
    with pytest.raises(TypeError, match="Keras Sequential or functional"):
        hessop.Laplace(lambda x: x, None, (x, y), likelihood="classification", subset="last_layer")
    keras.utils.set_random_seed(0)
    softmax = keras.Sequential([keras.Input((5,), dtype=F64), keras.layers.Dense(3, activation="softmax", dtype=F64)])
    with pytest.raises(ValueError, match="linear outputs"):
        hessop.Laplace(softmax, None, (x, y), likelihood="classification", subset="last_layer")
    with pytest.raises(ValueError, match="params: not with subset"):
        hessop.Laplace(model, None, (x, y), likelihood="classification", subset="last_layer", params=model.weights)
    with pytest.raises(ValueError, match="subset"):
        hessop.Laplace(model, None, (x, y), likelihood="classification", subset="first_layer")


# -- numerics and refusals ------------------------------------------------------------------
def test_float32_evidence_does_not_refuse_the_ggn():
    """A float32 GGN has round-off eigenvalues near −1e-7·max; they are not indefiniteness."""
    case = mlp_case(num_data=200)
    keras.utils.set_random_seed(2)
    model32 = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(3)])
    for target, source in zip(model32.weights, case.model.weights):
        target.assign(np.asarray(source, dtype=np.float32))
    la32 = hessop.Laplace(model32, None, (case.x.astype(np.float32), case.y), likelihood="classification", prior_precision=1e-6)
    la64 = hessop.Laplace(case.model, None, (case.x, case.y), likelihood="classification", prior_precision=1e-6)
    assert abs(la32.log_marginal_likelihood() - la64.log_marginal_likelihood()) < 1e-3 * abs(la64.log_marginal_likelihood())
    la32.optimize_prior_precision()


def test_bad_input():
    model, x, y = classifier()
    options = {"likelihood": "classification"}
    with pytest.raises(ValueError, match="structure"):
        hessop.Laplace(model, None, (x, y), structure="block", **options)
    with pytest.raises(ValueError, match="k: structure='lowrank' needs"):
        hessop.Laplace(model, None, (x, y), structure="lowrank", **options)
    with pytest.raises(ValueError, match="k: only for structure='lowrank'"):
        hessop.Laplace(model, None, (x, y), structure="kron", k=3, **options)
    with pytest.raises(ValueError, match="approximates the GGN"):
        hessop.Laplace(model, None, (x, y), structure="kron", curvature="hessian", **options)
    with pytest.raises(ValueError, match="sigma_noise"):
        hessop.Laplace(model, None, (x, y), sigma_noise=0.0, **options)
    with pytest.raises(ValueError, match="one per layer"):
        hessop.Laplace(model, None, (x, y), prior_precision=[1.0, 2.0, 3.0], **options)
    with pytest.raises(TypeError, match="data"):
        hessop.Laplace(model, None, **options)
    low = hessop.Laplace(model, None, (x, y), structure="lowrank", k=5, **options)
    with pytest.raises(ValueError, match="low-rank"):
        low.log_marginal_likelihood([1.0, 2.0])
    with pytest.raises(ValueError, match="prior"):
        low.optimize_prior_precision(prior="parameter")
    assert isinstance(hessop.Laplace(model, None, (x, y), **options).predictive(x[:2]), np.ndarray)
