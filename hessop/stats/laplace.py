r"""Laplace approximation of a model's posterior around its MAP estimate."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import scipy.optimize

from hessop._validation import check_positive_int, warn
from hessop.dense.columns import DEFAULT_MAX_DENSE
from hessop.stats.likelihoods import LINKS, laplace_bridge, mc_probabilities, probit
from hessop.stats.posterior import DiagStructure, EigenStructure, KronStructure, clip_round_off
from hessop.stats.solve import NotPositiveDefiniteError

__all__ = ["Laplace", "RegressionPredictive"]

CURVATURES = ("ggn", "hessian", "opg")
LIKELIHOODS = (None, "regression", "classification")
STRUCTURES = ("full", "lowrank", "kron", "ekfac", "diag")
PRIORS = ("scalar", "layer")


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


class RegressionPredictive(NamedTuple):
    """The predictive of a Gaussian regression at N inputs with C outputs each."""

    mean: np.ndarray
    """(N, C): f(x) at the MAP."""
    covariance: np.ndarray
    """(N, C, C): of y, the function-space covariance plus σ² I."""
    function_covariance: np.ndarray
    r"""(N, C, C): :math:`J_f \Lambda^{-1} J_f^\top`, of f(x) alone."""


class Laplace:
    r"""Gaussian (Laplace) posterior :math:`\mathcal N(\hat\theta, \Lambda^{-1})` at the MAP :math:`\hat\theta`.

    With :math:`\ell_n` the negative log-likelihood of example n, C the
    curvature of the mean loss (GGN, Hessian, OPG, or a structured
    approximation of the GGN) and a prior :math:`\mathcal N(0, \mathrm{diag}(\tau)^{-1})`
    with one τ for all parameters or one per layer, the posterior precision is

    .. math:: \Lambda = s\,C + \mathrm{diag}(\tau), \qquad s = N / T \quad (N / (\sigma^2 T) \text{ for regression}),

    with T the temperature. Every structure keeps C in a form whose Λ has an
    exact inverse, inverse square root (for samples) and log-determinant,
    for any τ and σ without another pass over the data.

    Parameters
    ----------
    model : keras.Model or callable
        At its MAP estimate.
    loss_fn : callable, optional
        ``likelihood=None``: the per-example negative log-likelihood
        ``loss_fn(y, f)``, constants included (required). With a likelihood
        it is built for you; a matching Keras training loss (squared error
        for regression, a cross-entropy on logits for classification) may be
        passed and is replaced by it, anything else is refused.
    data : arrays ``(x, y)``, `tf.data.Dataset` or re-iterable of batches
        The training data.
    likelihood : {None, "regression", "classification"}
        ``"regression"``: Gaussian, :math:`\ell_n = \|y_n - f_n\|^2 / (2\sigma^2) + \frac K2 \log 2\pi\sigma^2`
        over the K outputs. ``"classification"``: softmax cross-entropy on
        C ≥ 2 logits (integer or one-hot labels), or a sigmoid on one logit
        (labels 0/1).
    sigma_noise : float
        σ > 0 of a regression's observation noise.
    temperature : float
        T > 0: the likelihood is raised to 1/T (T < 1 sharpens the posterior).
    structure : {"full", "lowrank", "kron", "ekfac", "diag"}, optional
        ``"full"`` (default; dense, P ≤ ``max_params``), ``"lowrank"`` (the
        top-``k`` eigenpairs of C; the default when ``k`` is given),
        ``"kron"``/``"ekfac"`` (`KFACOperator`/`EKFACOperator` of the GGN,
        type2) and ``"diag"`` (the exact diagonal of C, one pass).
    subset : "all", "last_layer" or list of variables
        Which weights are Bayesian. ``"last_layer"`` finds the model's last
        layer (a Dense with a linear activation), runs the rest of the model
        once over ``data`` and keeps its features: the posterior is over the
        head's kernel and bias. The other weights stay at their values.
    curvature : {"ggn", "hessian", "opg"}
        For ``"full"``, ``"lowrank"`` and ``"diag"``; ``"kron"`` and
        ``"ekfac"`` approximate the GGN.
    prior_precision : float or sequence of float
        τ > 0, or one per layer (in the order of `prior_names`).
    k : int, optional
        Eigenpairs of the low-rank posterior (1 ≤ k ≤ P).
    params, batch_size, progress, check_deterministic
        As for `HessianOperator` (``params`` is the same as an explicit ``subset``).
    max_params : int
        Size guard for the dense structures.

    Attributes
    ----------
    mean : numpy.ndarray
        :math:`\hat\theta`, flat (float64).
    num_data, num_params : int
    prior_names : list of str
        The layers, one τ each when ``prior_precision`` is per layer.
    curvature : LinearOperator
        The curvature operator the posterior was built from.
    optimization : scipy.optimize.OptimizeResult or None
        The last `optimize_prior_precision` run.

    Examples
    --------
    >>> import numpy as np, tensorflow as tf, hessop
    >>> w = tf.Variable([0.0], dtype=tf.float64)
    >>> x, y = np.ones((4, 1)), np.zeros(4)
    >>> def model(x):
    ...     return tf.linalg.matvec(x, w)[:, None]
    >>> la = hessop.Laplace(model, None, (x, y), likelihood="regression",
    ...                     sigma_noise=1.0, params=[w], prior_precision=1.0)
    >>> la.posterior_covariance.to_dense()  # (N / σ² + τ)⁻¹
    array([[0.2]])
    """

    def __init__(
        self,
        model: Any,
        loss_fn: Callable[[Any, Any], Any] | None = None,
        data: Any = None,
        *,
        likelihood: str | None = None,
        sigma_noise: float = 1.0,
        temperature: float = 1.0,
        structure: str | None = None,
        subset: str | Sequence[Any] = "all",
        curvature: str = "ggn",
        prior_precision: float | Sequence[float] = 1.0,
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
        from hessop.spectral.block_diagonal import variable_groups

        if data is None:
            msg = "data: expected the training data, (x, y) arrays, a tf.data.Dataset or batches; got None."
            raise TypeError(msg)
        if likelihood not in LIKELIHOODS:
            msg = f"likelihood: expected one of {LIKELIHOODS}, got {likelihood!r}."
            raise ValueError(msg)
        if curvature not in CURVATURES:
            msg = f"curvature: expected one of {CURVATURES}, got {curvature!r}."
            raise ValueError(msg)
        structure = _check_structure(structure, k, curvature)
        self.likelihood, self.structure = likelihood, structure
        self.sigma_noise = _check_precision(sigma_noise, "sigma_noise")
        self.temperature = _check_precision(temperature, "temperature")
        loss_fn = _likelihood_loss(likelihood, loss_fn)

        self.model = model
        self._extractor = None
        if isinstance(subset, str):
            if subset not in ("all", "last_layer"):
                msg = f"subset: expected 'all', 'last_layer' or a list of variables, got {subset!r}."
                raise ValueError(msg)
            if subset == "last_layer":
                if params is not None:
                    msg = "params: not with subset='last_layer', which chooses the last layer's kernel and bias."
                    raise ValueError(msg)
                self._extractor, model = _split_last_layer(model)
                data = _features(self._extractor, data, batch_size)
        else:
            if params is not None:
                msg = "params: give the variables once, as subset=[...] or as params=[...]."
                raise ValueError(msg)
            params, subset = list(subset), "params"
        self.subset = subset
        self._model = model  # what the curvature differentiates: the head for subset="last_layer"

        operator_class = {"ggn": GGNOperator, "hessian": HessianOperator, "opg": OPGOperator}[curvature]
        exact = operator_class(
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
        self.curvature = exact
        self.curvature_name = curvature
        self.params = exact.params
        self.num_data = exact.num_data
        self.num_params = exact.shape[0]
        self.mean = np.asarray(flatten(self.params), dtype=np.float64)
        self._nll = exact.num_data * exact.loss  # Σₙ ℓₙ(θ̂); for regression at σ = 1, without constants
        self.num_outputs = _num_outputs(model, data, batch_size)
        self.prior_names, self._groups = variable_groups(self.params, "layer")
        self._group_sizes = np.array([g.size for g in self._groups], dtype=np.float64)
        model_dtype = exact._engine.dtype.as_numpy_dtype
        psd = curvature != "hessian"

        if structure in ("full", "lowrank"):
            if structure == "full":
                dense = exact.to_dense(max_params=max_params)
                values, vectors = np.linalg.eigh((dense + dense.T) / 2)
            else:
                from hessop.spectral.eigen import low_rank

                k = check_positive_int(k, "k")
                if k > self.num_params:
                    msg = f"k={k} exceeds the number of parameters P={self.num_params}; use k <= P (k=None is exact)."
                    raise ValueError(msg)
                approx = low_rank(exact, k)
                values, vectors = approx.eigenvalues, approx.Q
            if psd:
                values = clip_round_off(values, model_dtype)
            self._structure = EigenStructure(values, vectors, self._groups)
        elif structure in ("kron", "ekfac"):
            from hessop.operators.kfac import EKFACOperator, KFACOperator

            factored_class = KFACOperator if structure == "kron" else EKFACOperator
            self.curvature = factored_class(
                model, loss_fn, data, params=params, batch_size=batch_size, reduction="mean", dtype="float64"
            )
            self._structure = KronStructure(self.curvature, self._groups, round_off_dtype=model_dtype)
        else:
            from hessop.spectral.estimators import diagonal

            values = diagonal(exact, method="exact", max_params=max_params, progress=progress)
            self._structure = DiagStructure(clip_round_off(values, model_dtype) if psd else values, self._groups)
        self.k = k
        self.prior_precision = self._check_prior(prior_precision)
        self.optimization: scipy.optimize.OptimizeResult | None = None
        self._check_definite(self._tau(self.prior_precision), self._scale(self.sigma_noise))

    # -- hyperparameters ------------------------------------------------------------
    def _check_prior(self, value: Any) -> float | np.ndarray:
        if np.ndim(value) == 0:
            return _check_precision(value)
        values = np.asarray([_check_precision(v) for v in np.ravel(value)])
        if values.size != len(self._groups):
            msg = (
                f"prior_precision: expected a float or one per layer ({len(self._groups)}: {self.prior_names}), "
                f"got {values.size} values."
            )
            raise ValueError(msg)
        return values

    def _tau(self, prior_precision: float | np.ndarray) -> np.ndarray:
        return np.broadcast_to(np.asarray(prior_precision, dtype=np.float64), (len(self._groups),)).copy()

    def _scale(self, sigma_noise: float) -> float:
        """s in Λ = s C + diag(τ)."""
        noise = sigma_noise**2 if self.likelihood == "regression" else 1.0
        return self.num_data / (noise * self.temperature)

    def _check_definite(self, tau: np.ndarray, scale: float) -> None:
        smallest = scale * self._structure.smallest() + float(tau.min())
        if smallest > 0:
            return
        if self.curvature_name == "hessian":
            advice = "the Hessian is indefinite here: use curvature='ggn', fit to a minimum, or raise prior_precision."
        else:
            name = {"kron": "KFAC of the GGN", "ekfac": "EKFAC of the GGN"}.get(self.structure, self.curvature_name.upper())
            advice = (
                f"the {name} has an eigenvalue {self._structure.smallest():.3g} beyond round-off: "
                "check that the loss is a negative log-likelihood, convex in the model's outputs."
            )
        msg = f"posterior precision s·C + τI is not positive definite (smallest eigenvalue ≤ {smallest:.4g}); {advice}"
        raise NotPositiveDefiniteError(msg)

    # -- the posterior --------------------------------------------------------------
    def _operator(self, power: float) -> Any:
        tau, scale = self._tau(self.prior_precision), self._scale(self.sigma_noise)
        self._check_definite(tau, scale)
        return self._structure.operator(scale, tau, power)

    @property
    def posterior_precision(self) -> Any:
        r""":math:`\Lambda = sC + \mathrm{diag}(\tau)` as an operator of the structure's kind."""
        return self._operator(1.0)

    @property
    def posterior_covariance(self) -> Any:
        r""":math:`\Lambda^{-1}` as an operator (no P × P matrix for the structured kinds)."""
        return self._operator(-1.0)

    def sample(self, n: int, seed: int | None = None) -> np.ndarray:
        r"""``n`` parameter samples :math:`\hat\theta + \Lambda^{-1/2} z`, shape (n, P)."""
        n = check_positive_int(n, "n")
        z = np.random.default_rng(seed).standard_normal((self.num_params, n))
        return (self.mean[:, None] + np.asarray(self._operator(-0.5).matmat(z))).T

    def _inputs(self, x: Any, batch_size: int) -> Any:
        """The inputs the curvature's model reads: the features of ``x`` for subset="last_layer"."""
        if self._extractor is None:
            return x
        return _features(self._extractor, (x, None), batch_size)[0]

    def glm_predictive(self, x: Any, *, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        r"""The linearised (GLM) predictive of f at ``x``.

        Returns the mean :math:`f(x)` (N, C) and the covariance
        :math:`J_f \Lambda^{-1} J_f^\top` (N, C, C), for any likelihood.
        """
        import tensorflow as tf

        from hessop.autodiff.engine import model_caller, output_matrix
        from hessop.stats.covariance import predictive_variance

        batch_size = check_positive_int(batch_size, "batch_size")
        inputs = self._inputs(x, batch_size)
        # J_f of a chunk is (chunk·C, P): keep it to about 2**24 numbers on large models.
        chunk_size = max(1, min(batch_size, 2**24 // max(self.num_params, 1)))
        cov = None
        if self.structure in ("kron", "ekfac"):
            try:  # per-layer products in the factors' bases, no Jacobian rows
                cov = self.curvature.output_covariance(inputs, self.posterior_covariance, batch_size=batch_size)
            except ValueError:  # an Embedding's diagonal factor: the generic route below
                cov = None
        if cov is None:
            cov = predictive_variance(self._model, inputs, self.posterior_covariance, params=self.params, batch_size=chunk_size)
        call = model_caller(self._model)

        def chunk(first: int) -> Any:
            return tf.nest.map_structure(lambda a: np.asarray(a)[first : first + batch_size], inputs)

        chunks = [chunk(first) for first in range(0, cov.shape[0], batch_size)]
        outputs = [output_matrix(call(c), len(tf.nest.flatten(c)[0])).numpy() for c in chunks]
        return np.concatenate(outputs, axis=0).astype(np.float64), cov

    def predictive(
        self, x: Any, *, link: str = "probit", num_samples: int = 1000, seed: int | None = None, batch_size: int = 256
    ) -> Any:
        r"""The predictive at inputs ``x``, by the likelihood.

        * ``likelihood=None``: the GLM predictive of f, ``(mean, covariance)``
          as from `glm_predictive`.
        * ``"regression"``: a `RegressionPredictive` ``(mean, covariance,
          function_covariance)``, the covariance of y including σ² I.
        * ``"classification"``: class probabilities (N, C) (for one logit,
          the probability of class 1, (N, 1)) by ``link``: ``"probit"``
          (MacKay's approximation), ``"bridge"`` (the Laplace bridge) or
          ``"mc"`` (``num_samples`` logit samples, seeded).
        """
        if self.likelihood == "classification" and link not in LINKS:
            msg = f"link: expected one of {LINKS}, got {link!r}."
            raise ValueError(msg)
        mean, cov = self.glm_predictive(x, batch_size=batch_size)
        if self.likelihood is None:
            return mean, cov
        if self.likelihood == "regression":
            noise = self.sigma_noise**2 * np.eye(cov.shape[-1])
            return RegressionPredictive(mean, cov + noise, cov)
        if link == "probit":
            return probit(mean, cov)
        if link == "bridge":
            return laplace_bridge(mean, cov)
        return mc_probabilities(mean, cov, check_positive_int(num_samples, "num_samples"), seed)

    # -- evidence -------------------------------------------------------------------
    def _log_likelihood(self, sigma_noise: float) -> tuple[float, float]:
        """log p(D | θ̂) and its derivative in log σ (0 unless regression)."""
        if self.likelihood != "regression":
            return -self._nll / self.temperature, 0.0
        terms = self.num_data * self.num_outputs
        value = -self._nll / (sigma_noise**2 * self.temperature) - terms * np.log(sigma_noise * np.sqrt(2 * np.pi))
        return float(value), float(2 * self._nll / (sigma_noise**2 * self.temperature) - terms)

    def _evidence(self, tau: np.ndarray, sigma_noise: float, derivatives: bool = True) -> tuple[float, np.ndarray, float]:
        """The evidence, its gradient in log τ (per group) and in log σ (NaN unless ``derivatives``)."""
        scale = self._scale(sigma_noise)
        self._check_definite(tau, scale)
        logdet, d_scale, d_tau = self._structure.logdet(scale, tau, derivatives)
        squares = np.array([float(self.mean[g] @ self.mean[g]) for g in self._groups])
        log_lik, d_sigma = self._log_likelihood(sigma_noise)
        value = log_lik - 0.5 * float(tau @ squares) + 0.5 * float(self._group_sizes @ np.log(tau)) - 0.5 * logdet
        grad_tau = -0.5 * tau * squares + 0.5 * self._group_sizes - 0.5 * tau * d_tau
        if self.likelihood == "regression":
            d_sigma += scale * d_scale  # s = N / (σ² T): ds/dlog σ = −2s
        return float(value), grad_tau, d_sigma

    def log_marginal_likelihood(
        self, prior_precision: float | Sequence[float] | None = None, sigma_noise: float | None = None
    ) -> float:
        r"""Laplace evidence, the approximate log marginal likelihood of the data.

        .. math:: \log p(D) \approx \log p(D \mid \hat\theta) - \frac12 \hat\theta^\top \mathrm{diag}(\tau) \hat\theta
                  + \frac12 \sum_i \log\tau_i - \frac12 \log\det\Lambda

        The MAP :math:`\hat\theta` is held fixed when τ or σ change (as is usual
        for Laplace evidence optimisation). With ``likelihood=None`` the loss
        must be the full negative log-likelihood, constants included. Computed
        in float64 whatever the model's dtype.
        """
        tau = self._tau(self.prior_precision if prior_precision is None else self._check_prior(prior_precision))
        sigma = self.sigma_noise if sigma_noise is None else _check_precision(sigma_noise, "sigma_noise")
        return self._evidence(tau, sigma, derivatives=False)[0]

    def optimize_prior_precision(
        self,
        *,
        prior: str = "scalar",
        sigma_noise: bool = False,
        bounds: tuple[float, float] = (1e-6, 1e6),
        max_iter: int = 500,
    ) -> float | np.ndarray:
        """Set τ (and optionally σ) to the maximiser of `log_marginal_likelihood` and return τ.

        L-BFGS-B on log τ (and log σ) with exact gradients of the evidence.
        The result, with its convergence flag and message, is kept in
        ``optimization``; a run that did not converge warns.

        Parameters
        ----------
        prior : {"scalar", "layer"}
            One τ for all weights, or one per layer (`prior_names`).
        sigma_noise : bool
            Also fit σ (regression only).
        bounds : (float, float)
            For τ, and σ (within 1e-6 … 1e6).
        max_iter : int
        """
        if prior not in PRIORS:
            msg = f"prior: expected one of {PRIORS}, got {prior!r}."
            raise ValueError(msg)
        if sigma_noise and self.likelihood != "regression":
            msg = "sigma_noise: only a regression likelihood has σ; pass likelihood='regression'."
            raise ValueError(msg)
        low, high = (_check_precision(b, "bounds") for b in bounds)
        if low >= high:
            msg = f"bounds: expected low < high, got {bounds}."
            raise ValueError(msg)
        max_iter = check_positive_int(max_iter, "max_iter")
        scale = self._scale(self.sigma_noise)
        smallest = scale * self._structure.smallest()
        low_tau = max(low, -smallest * (1 + 1e-9) + 1e-300) if smallest < 0 else low
        count = 1 if prior == "scalar" else len(self._groups)
        start = np.clip(self._tau(self.prior_precision), low_tau, high)
        x0 = [float(np.mean(np.log(start)))] if prior == "scalar" else list(np.log(start))
        box = [(np.log(low_tau), np.log(high))] * count
        if sigma_noise:
            x0.append(np.log(self.sigma_noise))
            box.append((np.log(max(low, 1e-6)), np.log(min(high, 1e6))))

        def negative(z: np.ndarray) -> tuple[float, np.ndarray]:
            tau = np.exp(z[:count]) if prior == "layer" else np.full(len(self._groups), np.exp(z[0]))
            sigma = float(np.exp(z[-1])) if sigma_noise else self.sigma_noise
            value, grad_tau, d_sigma = self._evidence(tau, sigma)
            grad = list(grad_tau) if prior == "layer" else [float(np.sum(grad_tau))]
            if sigma_noise:
                grad.append(d_sigma)
            return -value, -np.asarray(grad)

        result = scipy.optimize.minimize(
            negative,
            np.asarray(x0, dtype=np.float64),
            jac=True,
            method="L-BFGS-B",
            bounds=box,
            options={"maxiter": max_iter, "ftol": 1e-13, "gtol": 1e-9},
        )
        self.optimization = result
        # A line search that stalls at the optimum (round-off in the evidence) is not a failure.
        stalled = result.status == 2 and np.max(np.abs(result.jac)) < 1e-6 * max(1.0, abs(result.fun))
        if not (result.success or stalled):
            warn(f"optimize_prior_precision: L-BFGS-B did not converge ({result.message}); kept its last iterate.")
        self.prior_precision = float(np.exp(result.x[0])) if prior == "scalar" else np.exp(result.x[:count])
        if sigma_noise:
            self.sigma_noise = float(np.exp(result.x[-1]))
        return self.prior_precision

    def __repr__(self) -> str:
        kind = self.structure if self.k is None else f"lowrank k={self.k}"
        tau = self.prior_precision
        tau_text = f"{tau:.4g}" if np.ndim(tau) == 0 else f"{len(tau)} per layer"
        return (
            f"<Laplace {kind} likelihood={self.likelihood} curvature={type(self.curvature).__name__} "
            f"P={self.num_params} N={self.num_data} prior_precision={tau_text} subset={self.subset}>"
        )


def _check_structure(structure: str | None, k: int | None, curvature: str) -> str:
    if structure is None:
        structure = "full" if k is None else "lowrank"
    if structure not in STRUCTURES:
        msg = f"structure: expected one of {STRUCTURES}, got {structure!r}."
        raise ValueError(msg)
    if structure == "lowrank" and k is None:
        msg = "k: structure='lowrank' needs the number of eigenpairs k."
        raise ValueError(msg)
    if k is not None and structure != "lowrank":
        msg = f"k: only for structure='lowrank', got k={k} with structure={structure!r}."
        raise ValueError(msg)
    if structure in ("kron", "ekfac") and curvature != "ggn":
        msg = f"curvature: structure={structure!r} approximates the GGN; got curvature={curvature!r}."
        raise ValueError(msg)
    return structure


_REGRESSION_LOSSES = ("MeanSquaredError", "mean_squared_error", "mse")
_CLASSIFICATION_LOSSES = ("SparseCategoricalCrossentropy", "CategoricalCrossentropy", "BinaryCrossentropy")


def _likelihood_loss(likelihood: str | None, loss_fn: Any) -> Callable[[Any, Any], Any]:
    """The per-example loss: ``loss_fn`` for no likelihood; the likelihood's (at σ = 1) otherwise."""
    if likelihood is None:
        if loss_fn is None:
            msg = "loss_fn: required when likelihood=None (the per-example negative log-likelihood loss_fn(y, f))."
            raise TypeError(msg)
        return loss_fn
    if loss_fn is not None:
        name = loss_fn if isinstance(loss_fn, str) else type(loss_fn).__name__
        expected = _REGRESSION_LOSSES if likelihood == "regression" else _CLASSIFICATION_LOSSES
        config = loss_fn.get_config() if hasattr(loss_fn, "get_config") else {}
        if name not in expected or (likelihood == "classification" and not config.get("from_logits")):
            msg = (
                f"loss_fn: with likelihood={likelihood!r} the loss is built from the likelihood; got {name}. "
                f"Pass loss_fn=None (or a Keras {' / '.join(expected[:3])}"
                f"{' on logits' if likelihood == 'classification' else ''}), or likelihood=None for your own "
                "negative log-likelihood."
            )
            raise ValueError(msg)
    return _gaussian_loss if likelihood == "regression" else _categorical_loss


def _gaussian_loss(y: Any, f: Any) -> Any:
    """½‖y − f‖² per example: the Gaussian negative log-likelihood at σ = 1, without its constant."""
    import tensorflow as tf

    residual = tf.reshape(f, [tf.shape(f)[0], -1]) - tf.reshape(tf.cast(y, f.dtype), [tf.shape(f)[0], -1])
    return 0.5 * tf.reduce_sum(residual**2, axis=1)


def _categorical_loss(y: Any, f: Any) -> Any:
    """Cross-entropy on logits per example: softmax over C ≥ 2 (integer or one-hot labels), sigmoid for one logit."""
    import tensorflow as tf

    batch = tf.shape(f)[0]
    logits = tf.reshape(f, [batch, -1])
    if f.shape[-1] == 1:
        labels = tf.reshape(tf.cast(y, f.dtype), [batch, -1])
        return tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits), axis=1)
    if y.dtype.is_integer or y.shape.rank < f.shape.rank:
        labels = tf.reshape(tf.cast(y, tf.int32), [batch])
        return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    return tf.nn.softmax_cross_entropy_with_logits(labels=tf.reshape(tf.cast(y, f.dtype), [batch, -1]), logits=logits)


def _split_last_layer(model: Any) -> tuple[Any, Any]:
    """(feature extractor, head) of a Keras model whose last layer is a linear Dense."""
    import keras

    if not isinstance(model, keras.Model):
        msg = f"model: subset='last_layer' needs a Keras Sequential or functional model, got {type(model).__name__}."
        raise TypeError(msg)
    last = model.layers[-1] if model.layers else None
    if not isinstance(last, keras.layers.Dense):
        msg = f"model: subset='last_layer' needs a Dense last layer, got {type(last).__name__}."
        raise ValueError(msg)
    if last.activation is not keras.activations.linear:
        msg = (
            f"model: the last layer {last.name!r} has activation {last.activation.__name__!r}; "
            "subset='last_layer' needs linear outputs (logits), with the likelihood applying the link."
        )
        raise ValueError(msg)
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    extractor = keras.Model(inputs, last.input)
    # The features keep their dtype: a float32 Input would round float64 features.
    head = keras.Sequential([keras.Input(tuple(last.input.shape[1:]), dtype=last.input.dtype), last])
    return extractor, head


def _features(extractor: Any, data: Any, batch_size: int | None) -> tuple[Any, Any]:
    """``data`` with each input replaced by the extractor's features, as in-memory arrays (one forward pass)."""
    import tensorflow as tf

    from hessop.autodiff.data import Batches

    features, targets = [], []
    for x, y in Batches(data, batch_size):
        features.append(np.asarray(extractor(x, training=False)))
        targets.append(None if y is None else tf.nest.map_structure(np.asarray, y))
    x_all = np.concatenate(features, axis=0)
    if targets[0] is None:
        return x_all, None
    return x_all, tf.nest.map_structure(lambda *parts: np.concatenate(parts, axis=0), *targets)


def _num_outputs(model: Any, data: Any, batch_size: int | None) -> int:
    """K, the outputs per example, from the model on the first batch."""
    import tensorflow as tf

    from hessop.autodiff.data import Batches
    from hessop.autodiff.engine import model_caller, output_matrix

    x, _ = next(iter(Batches(data, batch_size)))
    return int(output_matrix(model_caller(model)(x), tf.shape(tf.nest.flatten(x)[0])[0]).shape[1])
