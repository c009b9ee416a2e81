r"""Statistical uncertainty from curvature: covariances, standard errors, influence.

Conventions: operators are built on the mean loss
:math:`L(\theta) = \frac1N\sum_n \ell_n(\theta)` with :math:`\ell_n` the
negative log-likelihood of example n, so the observed information is
:math:`N H` and the OPG "meat" is :math:`N G`. Then

* model-based covariance: :math:`\mathrm{Cov}(\hat\theta) = (N H)^{-1}`;
* sandwich (robust, HC0): :math:`H^{-1} G H^{-1} / N`.

An operator with ``reduction="sum"`` already is the information (N·H), so no
factor N is applied to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg
import scipy.sparse
import scipy.stats
from scipy.sparse.linalg import LinearOperator, aslinearoperator

from hessop._validation import (
    as_real_array,
    check_finite_array,
    check_positive_int,
    check_symmetric,
    non_finite_rows,
    warn,
)
from hessop.dense.columns import DEFAULT_MAX_DENSE, dense_from_operator
from hessop.spectral.estimators import diagonal
from hessop.stats.solve import NotPositiveDefiniteError, block_cg, smallest_eigenvalue

__all__ = [
    "CovarianceOperator",
    "NotPositiveDefiniteError",
    "Summary",
    "covariance",
    "influence",
    "predictive_variance",
    "standard_errors",
    "summary",
]

METHODS = ("auto", "dense", "cg", "low_rank")
AUTO_DENSE_LIMIT = 2_000


def _information_scale(op: Any, num_data: int | None, name: str) -> float:
    """Factor turning the operator into information: N for a mean loss, 1 for a sum."""
    if getattr(op, "reduction", "mean") == "sum":
        return 1.0
    n = num_data if num_data is not None else getattr(op, "num_data", None)
    if n is None:
        msg = f"num_data: {name} does not carry num_data (not a hessop data-pass operator); pass num_data=N."
        raise ValueError(msg)
    n = check_positive_int(n, "num_data")
    op_n = getattr(op, "num_data", None)
    if op_n is not None and num_data is not None and op_n != num_data:
        msg = f"num_data={num_data} differs from {name}.num_data={op_n}."
        raise ValueError(msg)
    return float(n)


def _check_square(op: Any, name: str) -> int:
    shape = getattr(op, "shape", None)
    if shape is None or len(shape) != 2 or shape[0] != shape[1]:
        msg = f"{name}: expected a square (P, P) operator, got shape {shape}."
        raise ValueError(msg)
    return int(shape[0])


def _damped(op: Any, damping: float) -> Any:
    if damping == 0.0:
        return op
    identity = aslinearoperator(scipy.sparse.identity(op.shape[0], dtype=op.dtype, format="dia"))
    return aslinearoperator(op) + damping * identity


def _dense_cholesky(op: Any, damping: float, name: str, max_params: int) -> tuple[np.ndarray, Any]:
    dense = np.asarray(dense_from_operator(op, max_params=max_params, block_size=None), dtype=np.float64)
    dense = (dense + dense.T) / 2 + damping * np.eye(dense.shape[0])
    try:
        return dense, scipy.linalg.cho_factor(dense, lower=True)
    except np.linalg.LinAlgError:
        raise NotPositiveDefiniteError.found(name, float(np.linalg.eigvalsh(dense).min())) from None


class CovarianceOperator(LinearOperator):
    """Cov(θ̂) as a symmetric LinearOperator, returned by `covariance`.

    Attributes
    ----------
    method : str
        "dense", "cg" or "low_rank".
    sandwich : bool
        Whether this is the robust sandwich H⁻¹GH⁻¹/N.
    """

    _symmetric = True  # `check_symmetric` trusts it without a product

    def __init__(self, shape: tuple[int, int], dtype: Any, method: str, sandwich: bool) -> None:
        super().__init__(dtype=np.dtype(dtype), shape=shape)
        self.method = method
        self.sandwich = sandwich

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        return self._matmat(np.reshape(x, (-1, 1))).reshape(-1)

    def _adjoint(self) -> CovarianceOperator:
        return self

    def _transpose(self) -> CovarianceOperator:
        return self

    def diagonal(self, *, num_probes: int | None = None, seed: int = 0, block_size: int = 64) -> np.ndarray:
        """Variances (the diagonal), exact unless ``num_probes`` asks for a Hutchinson estimate.

        Exact costs one product per block of ``block_size`` unit vectors (for
        ``"cg"``: solves), except where a closed form exists (dense, low rank).
        """
        if num_probes is not None:
            return diagonal(self, method="hutchinson", num_matvecs=num_probes, seed=seed, block_size=block_size)
        closed_form = self._closed_form_diagonal()
        if closed_form is not None:
            return closed_form
        return diagonal(self, method="exact", block_size=block_size, max_params=self.shape[0])

    def _closed_form_diagonal(self) -> np.ndarray | None:
        return None

    def to_dense(self, *, max_params: int = DEFAULT_MAX_DENSE) -> np.ndarray:
        """The P×P covariance matrix (guarded like every hessop ``to_dense``)."""
        return dense_from_operator(self, max_params=max_params, block_size=256)

    def __repr__(self) -> str:
        kind = "sandwich" if self.sandwich else "model-based"
        return f"<CovarianceOperator {kind} method={self.method!r} shape={self.shape}>"


class _DenseCovariance(CovarianceOperator):
    def __init__(self, matrix: np.ndarray, dtype: Any, sandwich: bool) -> None:
        super().__init__(matrix.shape, dtype, "dense", sandwich)
        self.matrix = matrix

    def _matmat(self, X: np.ndarray) -> np.ndarray:
        return (self.matrix @ np.asarray(X, dtype=np.float64)).astype(self.dtype, copy=False)

    def _closed_form_diagonal(self) -> np.ndarray:
        return np.diag(self.matrix).copy()

    def to_dense(self, *, max_params: int = DEFAULT_MAX_DENSE) -> np.ndarray:
        return self.matrix.copy()


class _SolveCovariance(CovarianceOperator):
    """Every product solves with (H + δI) by CG: Cov v = (H+δI)⁻¹ v / s, or the sandwich."""

    def __init__(self, hessian: Any, opg: Any, scale: float, damping: float, rtol: float) -> None:
        super().__init__(hessian.shape, hessian.dtype, "cg", opg is not None)
        self.hessian = _damped(hessian, damping)
        self.opg, self.scale, self.rtol = opg, scale, rtol

    def _solve(self, X: np.ndarray) -> np.ndarray:
        return block_cg(self.hessian, X, rtol=self.rtol, name="hessian")

    def _matmat(self, X: np.ndarray) -> np.ndarray:
        Z = self._solve(np.asarray(X, dtype=np.float64))
        if self.opg is not None:
            Z = self._solve(np.asarray(self.opg.matmat(Z.astype(self.opg.dtype)), dtype=np.float64))
        return (Z / self.scale).astype(self.dtype, copy=False)


class _LowRankCovariance(CovarianceOperator):
    def __init__(self, inverse: Any, opg: Any, scale: float) -> None:
        super().__init__(inverse.shape, inverse.dtype, "low_rank", opg is not None)
        self.inverse, self.opg, self.scale = inverse, opg, scale

    def _matmat(self, X: np.ndarray) -> np.ndarray:
        Z = self.inverse.matmat(np.asarray(X, dtype=self.inverse.dtype))
        if self.opg is not None:
            Z = self.inverse.matmat(np.asarray(self.opg.matmat(Z), dtype=self.inverse.dtype))
        return (np.asarray(Z, dtype=np.float64) / self.scale).astype(self.dtype, copy=False)

    def _closed_form_diagonal(self) -> np.ndarray | None:
        return self.inverse.diagonal() / self.scale if self.opg is None else None


def covariance(
    hessian: Any,
    *,
    opg: Any = None,
    num_data: int | None = None,
    damping: float = 0.0,
    method: str = "auto",
    k: int | None = None,
    rtol: float = 1e-10,
    max_params: int = DEFAULT_MAX_DENSE,
) -> CovarianceOperator:
    r"""Covariance of the estimate :math:`\hat\theta` as a LinearOperator.

    Parameters
    ----------
    hessian : LinearOperator
        Curvature of the *mean* negative log-likelihood at the estimate, e.g.
        `HessianOperator` (or `GGNOperator`/`OPGOperator` as approximations).
    opg : LinearOperator, optional
        `OPGOperator` G of the same data: gives the robust sandwich
        :math:`H^{-1} G H^{-1} / N` (HC0) instead of :math:`(NH)^{-1}`.
    num_data : int, optional
        N; default ``hessian.num_data``.
    damping : float
        δ ≥ 0 added to H (:math:`H + \delta I`), e.g. a ridge penalty's curvature.
    method : {"auto", "dense", "cg", "low_rank"}
        ``"dense"``: Cholesky of the dense matrix (small P). ``"cg"``: every
        product solves with conjugate gradients on the operator (any P).
        ``"low_rank"``: through `full_rank` (k eigenpairs, tail = λ_k).
        ``"auto"``: dense for P ≤ 2,000, else low_rank when ``k`` is given,
        else cg.
    k : int, optional
        Eigenpairs for ``"low_rank"`` (default min(P, 100)); k = P is exact.
    rtol : float
        CG tolerance for ``"cg"``.
    max_params : int
        Size guard for ``"dense"``.

    Returns
    -------
    CovarianceOperator

    Raises
    ------
    NotPositiveDefiniteError (a ValueError)
        If H (+ δI) is not positive definite; the message gives the smallest
        eigenvalue. With ``"cg"`` nothing is solved at construction, so this
        comes from the first product whose CG run meets non-positive curvature.
    ValueError
        Bad method, negative damping, an ``opg`` of another shape or data size.

    Examples
    --------
    >>> import numpy as np, scipy.sparse.linalg as sla, hessop
    >>> H = sla.aslinearoperator(np.array([[2.0, 0.5], [0.5, 1.0]]))
    >>> cov = hessop.covariance(H, num_data=10)
    >>> bool(np.allclose(cov.to_dense(), np.linalg.inv(10 * H @ np.eye(2))))
    True
    """
    if method not in METHODS:
        msg = f"method: expected one of {METHODS}, got {method!r}."
        raise ValueError(msg)
    size = _check_square(hessian, "hessian")
    scale = _information_scale(hessian, num_data, "hessian")
    check_symmetric(hessian, "hessian")
    if opg is not None:
        if _check_square(opg, "opg") != size:
            msg = f"opg: shape {opg.shape} does not match the hessian's {hessian.shape}."
            raise ValueError(msg)
        check_symmetric(opg, "opg")
        h_n, g_n = getattr(hessian, "num_data", None), getattr(opg, "num_data", None)
        if h_n is not None and g_n is not None and h_n != g_n:
            msg = f"opg: built on {g_n} examples, the hessian on {h_n}; use the same data."
            raise ValueError(msg)
        if getattr(opg, "reduction", "mean") != getattr(hessian, "reduction", "mean"):
            msg = "opg: its reduction differs from the hessian's; use the same reduction for both."
            raise ValueError(msg)
    return _inverse(hessian, opg, scale, damping, method, k, rtol, max_params)


def _inverse(
    hessian: Any, opg: Any, scale: float, damping: float, method: str, k: int | None, rtol: float, max_params: int
) -> CovarianceOperator:
    """(H + δI)⁻¹ / scale, or the sandwich (H + δI)⁻¹ G (H + δI)⁻¹ / scale."""
    damping = float(damping)
    if not np.isfinite(damping) or damping < 0:
        msg = f"damping: expected a finite value >= 0, got {damping}."
        raise ValueError(msg)
    size = hessian.shape[0]
    if method == "auto":
        method = "dense" if size <= AUTO_DENSE_LIMIT else ("low_rank" if k is not None else "cg")
    if method == "dense":
        _, factor = _dense_cholesky(hessian, damping, "hessian", max_params)
        h_inv = scipy.linalg.cho_solve(factor, np.eye(size))
        if opg is None:
            matrix = h_inv / scale
        else:
            g = np.asarray(dense_from_operator(opg, max_params=max_params, block_size=None), dtype=np.float64)
            matrix = h_inv @ ((g + g.T) / 2) @ h_inv / scale
        return _DenseCovariance((matrix + matrix.T) / 2, hessian.dtype, opg is not None)
    if method == "cg":
        return _SolveCovariance(hessian, opg, scale, damping, rtol)
    from hessop.spectral.eigen import full_rank

    k = min(size, 100) if k is None else check_positive_int(k, "k")
    if k > size:
        msg = f"k={k} exceeds P={size}."
        raise ValueError(msg)
    damped = _damped(hessian, damping)
    approx = full_rank(damped, k)
    values = np.append(approx.eigenvalues, approx.tail)
    if k < size:
        # The top-k eigenpairs (and a tail λ_k > 0) would hide negative
        # eigenvalues below them: look for the smallest one too (one Lanczos run).
        values = np.append(values, smallest_eigenvalue(damped))
    if np.any(values <= 0):
        raise NotPositiveDefiniteError.found("hessian", float(values.min()), "smallest eigenvalue found")
    return _LowRankCovariance(approx.inverse(), opg, scale)


def standard_errors(hessian: Any, *, num_probes: int | None = None, seed: int = 0, **options: Any) -> np.ndarray:
    r"""Standard errors :math:`\sqrt{\mathrm{diag}\,\mathrm{Cov}(\hat\theta)}` in flat-parameter order.

    Takes the arguments of `covariance`. Exact for every method by default
    (``"cg"``: P solves in blocks of unit vectors, one data pass per CG
    iteration per block); with ``num_probes`` the diagonal is a Hutchinson
    estimate from that many random probes instead (for large P with ``"cg"``);
    an estimate that comes out negative (probe noise, where off-diagonal
    covariances dwarf a variance) gives NaN and a `RuntimeWarning`, not 0.

    Examples
    --------
    >>> import numpy as np, scipy.sparse.linalg as sla, hessop
    >>> H = sla.aslinearoperator(np.diag([4.0, 1.0]))
    >>> hessop.standard_errors(H, num_data=100)
    array([0.05, 0.1 ])
    """
    cov = covariance(hessian, **options)
    variances = cov.diagonal(num_probes=num_probes, seed=seed)
    negative = variances < 0
    if np.any(negative):
        if num_probes is None:
            msg = f"standard_errors: negative variance {variances.min():.3g}; the covariance is not PSD."
            raise ValueError(msg)
        # Hutchinson noise, not a property of the model: a standard error of 0 there would be a false certainty.
        warn(
            f"standard_errors: {int(negative.sum())} of {variances.size} Hutchinson estimates of the variance "
            f"are negative (noise of num_probes={num_probes} probes); their standard errors are NaN. Use more "
            "probes, or num_probes=None for the exact diagonal.",
            RuntimeWarning,
        )
    return np.sqrt(np.where(negative, np.nan, variances))


@dataclass(frozen=True)
class Summary:
    """Per-parameter table from `summary`; ``str()`` prints it."""

    names: list[str]
    estimate: np.ndarray
    std_error: np.ndarray
    z: np.ndarray
    p_value: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    level: float

    def __str__(self) -> str:
        pct = f"{self.level:.0%}"
        header = ("parameter", "estimate", "std.err", "z", "p-value", f"{pct} lower", f"{pct} upper")
        rows = [
            (n, f"{e:.5g}", f"{s:.4g}", f"{z:.3f}", f"{p:.3g}", f"{lo:.5g}", f"{hi:.5g}")
            for n, e, s, z, p, lo, hi in zip(
                self.names, self.estimate, self.std_error, self.z, self.p_value, self.lower, self.upper
            )
        ]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
        return "\n".join([line(header), "-" * (sum(widths) + 2 * (len(widths) - 1)), *map(line, rows)])


def _parameter_names(params: list) -> list[str]:
    names = []
    for i, p in enumerate(params):
        base = getattr(p, "path", None) or getattr(p, "name", None) or f"param{i}"
        base = str(base).split(":")[0]
        shape = tuple(int(d) for d in p.shape)
        if not shape:
            names.append(base)
            continue
        names += [f"{base}[{','.join(map(str, idx))}]" for idx in np.ndindex(*shape)]
    return names


def summary(model_or_params: Any, cov: Any, names: list[str] | None = None, *, level: float = 0.95) -> Summary:
    """Estimate, standard error, z, two-sided p-value and Wald interval per parameter.

    Parameters
    ----------
    model_or_params : keras.Model or list of variables
        Supplies the estimates (flat order) and, by default, the names.
    cov : CovarianceOperator, LinearOperator or (P, P) array
        From `covariance`; its diagonal gives the variances.
    names : list of str, optional
        One name per scalar parameter.
    level : float
        Interval coverage (default 0.95).

    Returns
    -------
    Summary
        Print it for the table.

    Examples
    --------
    >>> import numpy as np, tensorflow as tf, hessop
    >>> beta = tf.Variable([1.0, -0.2], name="beta")
    >>> table = hessop.summary([beta], np.diag([0.04, 0.04]))
    >>> print(table)  # doctest: +NORMALIZE_WHITESPACE
    parameter  estimate  std.err       z   p-value  95% lower  95% upper
    --------------------------------------------------------------------
    beta[0]           1      0.2   5.000  5.73e-07    0.60801      1.392
    beta[1]        -0.2      0.2  -1.000     0.317   -0.59199    0.19199
    """
    from hessop.autodiff.params import flatten

    params = list(getattr(model_or_params, "trainable_variables", model_or_params))
    estimate = np.asarray(flatten(params), dtype=np.float64)
    if isinstance(cov, np.ndarray):
        if cov.shape != (estimate.size, estimate.size):
            msg = f"cov: expected shape ({estimate.size}, {estimate.size}), got {cov.shape}."
            raise ValueError(msg)
        variances = np.diag(cov)
    elif hasattr(cov, "diagonal"):
        variances = np.asarray(cov.diagonal(), dtype=np.float64)
    else:
        variances = diagonal(cov, method="exact", max_params=int(cov.shape[0]))
    if variances.shape != estimate.shape:
        msg = f"cov: covers {variances.size} parameters, the model has {estimate.size}."
        raise ValueError(msg)
    check_finite_array(variances, "cov diagonal")
    if np.any(variances < 0):
        # As standard_errors: a standard error of 0 (z = ±inf, p = 0) would be a false certainty.
        msg = (
            f"cov: negative variance {variances.min():.3g} on its diagonal ({int(np.sum(variances < 0))} of "
            f"{variances.size}); the covariance is not PSD."
        )
        raise ValueError(msg)
    if not 0 < level < 1:
        msg = f"level: expected a probability in (0, 1), got {level}."
        raise ValueError(msg)
    names = _parameter_names(params) if names is None else list(names)
    if len(names) != estimate.size:
        msg = f"names: expected {estimate.size} names, got {len(names)}."
        raise ValueError(msg)
    se = np.sqrt(variances)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = estimate / se
    p = 2 * scipy.stats.norm.sf(np.abs(z))
    q = scipy.stats.norm.ppf(0.5 + level / 2)
    return Summary(names, estimate, se, z, p, estimate - q * se, estimate + q * se, level)


def predictive_variance(
    model: Any,
    x: Any,
    cov: Any,
    *,
    params: Any = None,
    batch_size: int = 256,
) -> np.ndarray:
    r"""Delta-method covariance of model outputs, :math:`J_f(x)\,\Sigma\,J_f(x)^\top` per example.

    Parameters
    ----------
    model : keras.Model or callable
    x : array-like or structure of arrays
        Inputs (N examples).
    cov : LinearOperator
        Parameter covariance (P×P), e.g. from `covariance` or `Laplace`.
    params : list of variables, optional
        Default ``model.trainable_variables``; must match ``cov``'s order.
    batch_size : int
        Examples per chunk: memory is O(batch_size·C·P), never N·C·P.

    Returns
    -------
    numpy.ndarray, shape (N, C, C)
        Output covariance per example (C outputs per example; several
        heads side by side, as for ``JacobianOperator(target="outputs")``);
        its diagonal gives the variances.

    Examples
    --------
    >>> import numpy as np, tensorflow as tf, hessop
    >>> w = tf.Variable([1.0, 2.0], dtype=tf.float64)
    >>> x = np.array([[1.0, 0.0], [1.0, 1.0]])
    >>> def model(x):
    ...     return tf.linalg.matvec(x, w)[:, None]
    >>> hessop.predictive_variance(model, x, np.diag([0.5, 0.25]), params=[w])[:, 0, 0]
    array([0.5 , 0.75])
    """
    import tensorflow as tf

    from hessop.operators.jacobian import JacobianOperator

    batch_size = check_positive_int(batch_size, "batch_size")
    if isinstance(x, LinearOperator):
        msg = "x: expected input arrays, got a LinearOperator; the order is predictive_variance(model, x, cov)."
        raise TypeError(msg)
    leaves = tf.nest.flatten(x)
    if not leaves or np.ndim(leaves[0]) == 0:
        msg = f"x: expected input arrays with a leading example dimension, got {type(x).__name__}."
        raise ValueError(msg)
    num_examples = int(np.shape(leaves[0])[0])
    if num_examples == 0:
        msg = "x: empty input (0 examples)."
        raise ValueError(msg)
    for leaf in leaves:
        values = np.asarray(leaf)
        if not values.ndim or not np.issubdtype(values.dtype, np.inexact):
            continue
        bad = non_finite_rows(values)
        if bad.size:
            msg = f"x: {bad.size} of {num_examples} examples have non-finite inputs (NaN or inf)."
            raise ValueError(msg)
    cov_op = cov if hasattr(cov, "matmat") else _as_operator(cov)
    # One operator for all of x: its per-example Jacobians are traced once, not once per chunk.
    jf = JacobianOperator(
        model, None, (x, None), params=params, target="outputs", batch_size=batch_size, check_deterministic=False
    )
    if cov_op.shape != (jf.shape[1], jf.shape[1]):
        msg = f"cov: shape {cov_op.shape} does not match the model's P = {jf.shape[1]}."
        raise ValueError(msg)
    outputs, num_params = jf.num_outputs, jf.shape[1]
    blocks = []
    for rows in jf.row_blocks():  # J_f of a chunk, (B·C, P)
        sj = np.asarray(cov_op.matmat(rows.T.astype(cov_op.dtype, copy=False)), dtype=np.float64)  # Σ J_fᵀ, (P, B·C)
        # Per example n, J_n (Σ J_nᵀ): one batched matmul over views, no transposed copies
        # (np.einsum was several times slower).
        jf3 = rows.astype(np.float64, copy=False).reshape(-1, outputs, num_params)  # (B, C, P)
        blocks.append(np.matmul(jf3, sj.reshape(num_params, -1, outputs).transpose(1, 0, 2)))
    result = np.concatenate(blocks, axis=0)
    variances = np.diagonal(result, axis1=1, axis2=2)
    # Round-off of a PSD covariance gives at most a tiny negative variance; more means cov is indefinite.
    floor = -np.sqrt(np.finfo(np.dtype(cov_op.dtype) if np.dtype(cov_op.dtype).kind == "f" else np.float64).eps)
    negative = variances < floor * np.max(np.abs(variances), initial=0.0)
    if np.any(negative):
        bad = int(np.sum(np.any(negative, axis=1)))
        msg = (
            f"cov: the predictive variance is negative for {bad} of {num_examples} examples "
            f"(min {variances.min():.3g}), so cov is not positive semi-definite (an indefinite Hessian's "
            "inverse?); use a PSD covariance, e.g. from the GGN or with damping."
        )
        raise ValueError(msg)
    return result


def _as_operator(cov: Any) -> LinearOperator:
    array = np.asarray(cov)
    if array.ndim != 2 or array.shape[0] != array.shape[1]:
        msg = f"cov: expected a (P, P) array or LinearOperator, got shape {array.shape}."
        raise ValueError(msg)
    return aslinearoperator(array)


def influence(
    hessian: Any,
    train_gradients: Any,
    test_gradient: Any,
    *,
    damping: float = 0.0,
    method: str = "cg",
    k: int | None = None,
    rtol: float = 1e-10,
) -> np.ndarray:
    r"""Influence of up-weighting each training example on a test loss (Koh & Liang 2017).

    :math:`\mathcal I_n = -\nabla\ell_{\text{test}}^\top (H + \delta I)^{-1} \nabla\ell_n`,
    with H the Hessian of the mean training loss. One solve with H (its
    symmetry lets the test gradient be solved once), then one product with
    the training gradients, vectorised over examples. Removing example n
    changes the test loss by about :math:`-\mathcal I_n / N`.

    Parameters
    ----------
    hessian : LinearOperator
        P×P, positive definite (after damping).
    train_gradients : (N, P) array or LinearOperator
        Per-example gradients, e.g. `JacobianOperator` (one data pass) or
        `per_example_gradients(..., concatenate=True)`.
    test_gradient : (P,) array
        Gradient of the test loss.
    damping : float
        δ ≥ 0.
    method : {"cg", "low_rank", "dense"}
        How to solve with H: conjugate gradients, a `full_rank` approximation
        with ``k`` eigenpairs, or a dense Cholesky.

    Returns
    -------
    numpy.ndarray, shape (N,)

    Examples
    --------
    >>> import numpy as np, scipy.sparse.linalg as sla, hessop
    >>> H = sla.aslinearoperator(np.diag([2.0, 4.0]))
    >>> hessop.influence(H, np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([2.0, 4.0]))
    array([-1., -1.])
    """
    size = _check_square(hessian, "hessian")
    test_gradient = as_real_array(test_gradient, "test_gradient")
    if test_gradient.shape != (size,):
        msg = f"test_gradient: expected shape ({size},), got {test_gradient.shape}."
        raise ValueError(msg)
    check_finite_array(test_gradient, "test_gradient")
    train_shape = getattr(train_gradients, "shape", None)
    if train_shape is None or len(train_shape) != 2 or train_shape[1] != size:
        msg = f"train_gradients: expected shape (N, {size}), got {train_shape}."
        raise ValueError(msg)
    if method not in ("cg", "low_rank", "dense"):
        msg = f"method: expected 'cg', 'low_rank' or 'dense', got {method!r}."
        raise ValueError(msg)
    inverse = _inverse(hessian, None, 1.0, damping, method, k, rtol, DEFAULT_MAX_DENSE)
    solved = np.asarray(inverse.matvec(test_gradient), dtype=np.float64)
    if isinstance(train_gradients, np.ndarray):
        check_finite_array(train_gradients, "train_gradients")
        return -(train_gradients.astype(np.float64) @ solved)
    return -np.asarray(train_gradients.matvec(solved.astype(train_gradients.dtype)), dtype=np.float64)
