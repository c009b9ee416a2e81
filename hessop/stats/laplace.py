r"""Laplace approximation of a model's posterior around its MAP estimate."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import scipy.optimize

from hessop._validation import check_positive_int
from hessop.dense.columns import DEFAULT_MAX_DENSE
from hessop.lowrank.operators import FullRankOperator
from hessop.stats.solve import NotPositiveDefiniteError

__all__ = ["Laplace"]

CURVATURES = ("ggn", "hessian", "opg")


def _check_precision(value: Any, name: str = "prior_precision") -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        msg = f"{name}: expected a positive float, got {value!r}."
        raise TypeError(msg) from None
    if not np.isfinite(value) or value <= 0:
        msg = f"{name}: expected a positive finite float, got {value}."
        raise ValueError(msg)
    return value


class Laplace:
    r"""Gaussian (Laplace) posterior :math:`\mathcal N(\hat\theta, \Lambda^{-1})` at the MAP :math:`\hat\theta`.

    With :math:`\ell_n` the negative log-likelihood of example n, an isotropic
    prior :math:`\mathcal N(0, \tau^{-1} I)` and C the curvature of the mean
    loss (GGN, Hessian or OPG), the posterior precision is
    :math:`\Lambda = N C + \tau I`.

    ``k=None`` is exact: C is formed densely (small P) and eigendecomposed.
    With ``k``, C is replaced by its top-k eigenpairs :math:`Q\Lambda_k Q^\top`, so
    :math:`\Lambda = Q(N\Lambda_k + \tau)Q^\top + \tau(I - QQ^\top)`, a
    `FullRankOperator` in O(kP) memory. Either way inverse, square root,
    samples and log-determinant are exact for that representation.

    Parameters
    ----------
    model, loss_fn, data, params, batch_size, progress, check_deterministic
        As for `HessianOperator`; ``loss_fn`` is the per-example negative
        log-likelihood and the model's parameters are the MAP estimate.
    curvature : {"ggn", "hessian", "opg"}
        GGN (default; PSD), exact Hessian (may be indefinite away from a
        minimum: refused then) or outer product of gradients.
    prior_precision : float
        τ > 0.
    k : int, optional
        Number of eigenpairs for the low-rank posterior (1 ≤ k ≤ P).
    max_params : int
        Size guard for the exact (``k=None``) case.

    Attributes
    ----------
    mean : numpy.ndarray
        :math:`\hat\theta`, flat (float64).
    num_data, num_params : int

    Examples
    --------
    >>> import numpy as np, tensorflow as tf, hessop
    >>> w = tf.Variable([0.0], dtype=tf.float64)
    >>> x, y = np.ones((4, 1)), np.zeros(4)
    >>> la = hessop.Laplace(lambda x: tf.linalg.matvec(x, w), lambda y, f: 0.5 * (f - y) ** 2, (x, y),
    ...                     params=[w], prior_precision=1.0)
    >>> la.posterior_covariance.to_dense()  # (N·1 + τ)⁻¹
    array([[0.2]])
    """

    def __init__(
        self,
        model: Any,
        loss_fn: Callable[[Any, Any], Any],
        data: Any,
        *,
        curvature: str = "ggn",
        prior_precision: float = 1.0,
        k: int | None = None,
        params: Sequence[Any] | None = None,
        batch_size: int | None = None,
        progress: bool = False,
        check_deterministic: bool = True,
        max_params: int = DEFAULT_MAX_DENSE,
    ) -> None:
        from hessop.autodiff.params import flatten
        from hessop.operators.ggn import GGNOperator
        from hessop.operators.hessian import HessianOperator
        from hessop.operators.opg import OPGOperator
        from hessop.spectral.eigen import low_rank

        if curvature not in CURVATURES:
            msg = f"curvature: expected one of {CURVATURES}, got {curvature!r}."
            raise ValueError(msg)
        self.prior_precision = _check_precision(prior_precision)
        operator_class = {"ggn": GGNOperator, "hessian": HessianOperator, "opg": OPGOperator}[curvature]
        self.curvature = operator_class(
            model,
            loss_fn,
            data,
            params=params,
            batch_size=batch_size,
            reduction="mean",
            dtype="float64",
            progress=progress,
            check_deterministic=check_deterministic,
        )
        self.model = model
        self.params = self.curvature.params
        self.num_data = self.curvature.num_data
        self.num_params = self.curvature.shape[0]
        self.mean = np.asarray(flatten(self.params), dtype=np.float64)
        self.neg_log_likelihood = self.curvature.num_data * self.curvature.loss  # Σₙ ℓₙ(θ̂)
        if k is None:
            dense = self.curvature.to_dense(max_params=max_params)
            values, vectors = np.linalg.eigh((dense + dense.T) / 2)
        else:
            k = check_positive_int(k, "k")
            if k > self.num_params:
                msg = f"k={k} exceeds the number of parameters P={self.num_params}; use k <= P (k=None is exact)."
                raise ValueError(msg)
            approx = low_rank(self.curvature, k)
            values, vectors = approx.eigenvalues, approx.Q
        self.k = k
        self._curvature_values = np.asarray(values, dtype=np.float64)  # eigenvalues of C (mean loss)
        self._vectors = np.asarray(vectors, dtype=np.float64)
        self._check_definite(self.prior_precision)

    # -- the posterior --------------------------------------------------------------
    def _precision_values(self, prior_precision: float) -> np.ndarray:
        return self.num_data * self._curvature_values + prior_precision

    def _check_definite(self, prior_precision: float) -> None:
        smallest = float(self._precision_values(prior_precision).min())
        if smallest <= 0:
            msg = (
                f"posterior precision N·C + τI is not positive definite for τ={prior_precision:g} "
                f"(smallest eigenvalue {smallest:.4g}): the curvature is indefinite here. Use "
                "curvature='ggn', fit to a minimum, or raise prior_precision."
            )
            raise NotPositiveDefiniteError(msg)

    @property
    def posterior_precision(self) -> FullRankOperator:
        r""":math:`\Lambda = NC + \tau I` as a `FullRankOperator`."""
        tail = self.prior_precision
        return FullRankOperator(self._vectors, self._precision_values(tail), tail=tail, check_orthonormal=False)

    @property
    def posterior_covariance(self) -> FullRankOperator:
        r""":math:`\Lambda^{-1}` as a `FullRankOperator`."""
        return self.posterior_precision.inverse()

    def sample(self, n: int, seed: int | None = None) -> np.ndarray:
        r"""``n`` parameter samples :math:`\hat\theta + \Lambda^{-1/2} z`, shape (n, P)."""
        n = check_positive_int(n, "n")
        z = np.random.default_rng(seed).standard_normal((self.num_params, n))
        return (self.mean[:, None] + self.posterior_precision.power(-0.5).matmat(z)).T

    def predictive(self, x: Any, *, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        r"""Linearised predictive: mean :math:`f(x)` (N, C) and covariance :math:`J_f \Lambda^{-1} J_f^\top` (N, C, C)."""
        import tensorflow as tf

        from hessop.autodiff.engine import model_caller, output_matrix
        from hessop.stats.covariance import predictive_variance

        cov = predictive_variance(self.model, x, self.posterior_covariance, params=self.params, batch_size=batch_size)
        # The engine's call, as for the covariance: training=False only for Keras layers.
        call = model_caller(self.model)

        def chunk(first: int) -> Any:
            return tf.nest.map_structure(lambda a: np.asarray(a)[first : first + batch_size], x)

        chunks = [chunk(first) for first in range(0, cov.shape[0], batch_size)]
        outputs = [output_matrix(call(chunk), len(tf.nest.flatten(chunk)[0])).numpy() for chunk in chunks]
        return np.concatenate(outputs, axis=0), cov

    # -- evidence -------------------------------------------------------------------
    def log_marginal_likelihood(self, prior_precision: float | None = None) -> float:
        r"""Laplace evidence, the approximate log marginal likelihood of the data.

        .. math:: \log p(D) \approx -\sum_n \ell_n(\hat\theta) - \frac\tau2\|\hat\theta\|^2
                  + \frac P2 \log\tau - \frac12 \log\det\Lambda

        The MAP :math:`\hat\theta` is held fixed when τ changes (as is usual for
        Laplace evidence optimisation); the loss must be the full negative
        log-likelihood, constants included, for the value to be a log-probability.
        """
        tau = self.prior_precision if prior_precision is None else _check_precision(prior_precision)
        self._check_definite(tau)
        precision_values = self._precision_values(tau)
        untouched = self.num_params - precision_values.size  # directions where Λ = τ (low rank)
        logdet = float(np.sum(np.log(precision_values)) + untouched * np.log(tau))
        return float(
            -self.neg_log_likelihood
            - 0.5 * tau * float(self.mean @ self.mean)
            + 0.5 * self.num_params * np.log(tau)
            - 0.5 * logdet
        )

    def optimize_prior_precision(self, *, bounds: tuple[float, float] = (1e-6, 1e6)) -> float:
        """Set τ to the maximiser of `log_marginal_likelihood` within ``bounds`` and return it."""
        low, high = (_check_precision(b, "bounds") for b in bounds)
        if low >= high:
            msg = f"bounds: expected low < high, got {bounds}."
            raise ValueError(msg)
        smallest = float(self.num_data * self._curvature_values.min())
        low = max(low, -smallest * (1 + 1e-9) + 1e-300) if smallest < 0 else low

        def negative(log_tau: float) -> float:
            return -self.log_marginal_likelihood(float(np.exp(log_tau)))

        result = scipy.optimize.minimize_scalar(
            negative, bounds=(np.log(low), np.log(high)), method="bounded", options={"xatol": 1e-10}
        )
        self.prior_precision = float(np.exp(result.x))
        return self.prior_precision

    def __repr__(self) -> str:
        kind = "exact" if self.k is None else f"low-rank k={self.k}"
        return (
            f"<Laplace {kind} curvature={type(self.curvature).__name__} P={self.num_params} "
            f"N={self.num_data} prior_precision={self.prior_precision:.4g}>"
        )
