r"""Predictive probabilities of a classifier from a Gaussian over its logits, :math:`f \sim \mathcal N(\mu, \Sigma)`.

Each takes the GLM predictive's mean (N, C) and covariance (N, C, C) and
returns probabilities (N, C); one logit (C = 1) is a binary classifier whose
probability of class 1 is returned. numpy only: no TensorFlow here.
"""

from __future__ import annotations

import numpy as np
import scipy.special

__all__ = ["LINKS", "laplace_bridge", "mc_probabilities", "probit"]

LINKS = ("probit", "bridge", "mc")


def _activate(logits: np.ndarray) -> np.ndarray:
    if logits.shape[-1] == 1:
        return scipy.special.expit(logits)
    return scipy.special.softmax(logits, axis=-1)


def probit(mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    r"""The probit approximation: :math:`\mathrm{softmax}(\mu_k / \sqrt{1 + \pi\Sigma_{kk}/8})` (MacKay, 1992).

    For one logit it is exact if the sigmoid is replaced by the probit
    :math:`\Phi(\sqrt{\pi/8}\,f)` it approximates.

    Examples
    --------
    >>> import numpy as np
    >>> from hessop.stats.likelihoods import probit
    >>> float(probit(np.array([[0.0]]), np.array([[[4.0]]]))[0, 0])
    0.5
    """
    variances = np.diagonal(cov, axis1=-2, axis2=-1)
    return _activate(mean / np.sqrt(1.0 + np.pi / 8.0 * variances))


def laplace_bridge(mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    r"""The Laplace bridge (Hobbhahn et al., 2022): the mean of the Dirichlet matched to :math:`\mathcal N(\mu, \Sigma)`.

    As laplace-torch computes it: μ and Σ are first projected onto logits
    that sum to zero, then
    :math:`\alpha_k = (1 - 2/C + e^{\mu_k} \sum_l e^{-\mu_l} / C^2) / \Sigma_{kk}`
    and the probabilities are α / Σα. Needs C ≥ 2.

    Examples
    --------
    >>> import numpy as np
    >>> from hessop.stats.likelihoods import laplace_bridge
    >>> laplace_bridge(np.zeros((1, 2)), np.eye(2)[None])
    array([[0.5, 0.5]])
    """
    classes = mean.shape[-1]
    if classes < 2:
        msg = "link: 'bridge' needs C ≥ 2 logits; use 'probit' or 'mc' for a binary classifier with one logit."
        raise ValueError(msg)
    row = cov.sum(axis=-1)  # (N, C)
    total = cov.sum(axis=(-2, -1))[:, None]  # (N, 1)
    mean = mean - row * mean.sum(axis=-1, keepdims=True) / total
    cov = cov - row[:, :, None] * cov.sum(axis=-2)[:, None, :] / total[:, :, None]
    variances = np.diagonal(cov, axis1=-2, axis2=-1)
    alpha = (1.0 - 2.0 / classes + np.exp(mean) / classes**2 * np.exp(-mean).sum(axis=-1, keepdims=True)) / variances
    return alpha / alpha.sum(axis=-1, keepdims=True)


def mc_probabilities(mean: np.ndarray, cov: np.ndarray, num_samples: int, seed: int | None) -> np.ndarray:
    """Probabilities averaged over ``num_samples`` logit samples from N(μ, Σ), seeded.

    Examples
    --------
    >>> import numpy as np
    >>> from hessop.stats.likelihoods import mc_probabilities
    >>> mc_probabilities(np.zeros((1, 1)), np.ones((1, 1, 1)), 1000, seed=0).shape
    (1, 1)
    """
    rng = np.random.default_rng(seed)
    values, vectors = np.linalg.eigh(cov)  # a root that tolerates singular Σ (softmax's sum direction)
    root = vectors * np.sqrt(np.maximum(values, 0.0))[:, None, :]
    noise = rng.standard_normal((mean.shape[0], mean.shape[1], num_samples))
    logits = mean[:, :, None] + root @ noise  # (N, C, S)
    return _activate(np.moveaxis(logits, 2, 1)).mean(axis=1)
