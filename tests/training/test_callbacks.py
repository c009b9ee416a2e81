"""EvidenceCallback and PriorRegularizer: the penalty follows τ inside compiled training, and τ is the evidence's optimum."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import hessop


def regression(num_data=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_data, 3)).astype("float32")
    y = (np.tanh(x @ np.array([1.0, -2.0, 0.5])) + 0.2 * rng.normal(size=num_data)).astype("float32")[:, None]
    return x, y


def model_with(regularizer):
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(8, activation="tanh", kernel_regularizer=regularizer, bias_regularizer=regularizer),
            keras.layers.Dense(1, kernel_regularizer=regularizer, bias_regularizer=regularizer),
        ]
    )


def test_the_penalty_is_the_prior_and_follows_tau():
    tau = keras.Variable(3.0, trainable=False)
    regularizer = hessop.PriorRegularizer(tau, num_data=10)
    model = model_with(regularizer)
    x, _ = regression()
    model(x[:1])
    squares = sum(float(np.sum(np.asarray(w) ** 2)) for w in model.trainable_weights)
    assert abs(sum(float(v) for v in model.losses) - 3.0 / 20 * squares) < 1e-4 * squares
    tau.assign(6.0)
    model(x[:1])
    assert abs(sum(float(v) for v in model.losses) - 6.0 / 20 * squares) < 1e-4 * squares


def test_refits_set_tau_and_sigma_to_the_evidence_optimum():
    x, y = regression()
    callback = hessop.EvidenceCallback(
        (x, y), every=3, likelihood="regression", structure="full", fit_sigma_noise=True, prior_precision=1.0
    )
    model = model_with(callback.regularizer)
    model.compile(keras.optimizers.Adam(0.02), "mse")
    history = model.fit(x, y, epochs=6, batch_size=16, verbose=0, callbacks=[callback])
    assert [epoch for epoch, *_ in callback.history] == [2, 5]
    epoch, tau, sigma, evidence = callback.history[-1]
    assert float(callback.prior_precision.numpy()) == pytest.approx(tau, rel=1e-6)
    assert history.history["log_evidence"][-1] == evidence
    fresh = hessop.Laplace(model, None, (x, y), likelihood="regression", prior_precision=5.0, sigma_noise=0.3)
    fresh.optimize_prior_precision(sigma_noise=True)
    assert fresh.prior_precision == pytest.approx(tau, rel=1e-4)
    assert fresh.sigma_noise == pytest.approx(sigma, rel=1e-4)
    assert 0.1 < sigma < 1.0  # the data's noise is 0.2, plus misfit after six epochs


def test_bad_input():
    x, y = regression()
    with pytest.raises(ValueError, match="every"):
        hessop.EvidenceCallback((x, y), every=0)
    with pytest.raises(ValueError, match="fit_sigma_noise"):
        hessop.EvidenceCallback((x, y), fit_sigma_noise=True)
