r"""Influence of every training example on test losses at the scale of real networks (EK-FAC inverse-HVPs).

For each test query q and training example n,

.. math:: \mathcal I_{qn} = -\nabla\ell_q^\top (C + \delta I)^{-1} \nabla\ell_n,

with C the curvature of the mean training loss (EK-FAC, KFAC, or any
symmetric operator, solved by CG). Upweighting n by ε changes the test loss
by about ε 𝓘; removing it changes it by about −𝓘 / N. The test gradients
are solved once (Q × P), and the scores of all training examples are
Jacobian-vector products of the per-example losses with those Q solutions,
streamed batch by batch: no N × P matrix, nor a B × P one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.sparse.linalg import LinearOperator

from hessop._validation import check_positive_int

__all__ = ["InfluenceScores", "influence_scores"]

CURVATURES = ("ekfac", "kfac")


@dataclass
class InfluenceScores:
    """Influence scores of N training examples on Q test losses, with each query's top examples."""

    scores: np.ndarray
    """(Q, N): 𝓘, the change of each test loss per unit upweighting of each training example."""
    helpful: np.ndarray
    """(Q, top_k): the training examples whose upweighting lowers the test loss most (most negative 𝓘)."""
    harmful: np.ndarray
    """(Q, top_k): those whose upweighting raises it most (most positive 𝓘)."""
    curvature: Any
    """The curvature operator used."""


def influence_scores(
    model: Any,
    loss_fn: Callable[[Any, Any], Any],
    train_data: Any,
    test_data: Any,
    *,
    curvature: str | LinearOperator = "ekfac",
    damping: float = 1e-3,
    top_k: int = 5,
    params: Sequence[Any] | None = None,
    batch_size: int | None = None,
    rtol: float = 1e-8,
) -> InfluenceScores:
    r"""Influence of every training example on each test example's loss.

    Parameters
    ----------
    model : keras.Model or callable
        At its trained parameters.
    loss_fn : callable
        Per-example training loss ``loss_fn(y, f)``; the test losses use it too.
    train_data, test_data : arrays ``(x, y)``, `tf.data.Dataset` or batches
        N training and Q test examples.
    curvature : {"ekfac", "kfac"} or LinearOperator
        ``"ekfac"`` (default; `EKFACOperator`, two passes over the training
        data) or ``"kfac"`` (`KFACOperator`, one pass) of the mean training
        loss's GGN, inverted exactly through its factors' eigenvectors; or any
        symmetric P × P operator of the mean training loss (e.g. a
        `GGNOperator`), solved by CG to ``rtol``.
    damping : float
        δ ≥ 0 added to C (an L2 penalty's λ when the model was trained with one).
    top_k : int
        How many helpful and harmful examples to report per query.
    params, batch_size
        As for the operators.

    Returns
    -------
    InfluenceScores

    Examples
    --------
    >>> import numpy as np, keras, hessop
    >>> rng = np.random.default_rng(0)
    >>> x, y = rng.normal(size=(32, 3)), rng.integers(0, 2, 32)
    >>> model = keras.Sequential(
    ...     [keras.Input((3,), dtype="float64"), keras.layers.Dense(2, dtype="float64")]
    ... )
    >>> loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64")
    >>> result = hessop.influence_scores(model, loss, (x, y), (x[:2], y[:2]), top_k=3)
    >>> result.scores.shape, result.helpful.shape
    ((2, 32), (2, 3))
    """
    from hessop.operators.jacobian import JacobianOperator
    from hessop.operators.kfac import EKFACOperator, KFACOperator
    from hessop.operators.opg import per_example_gradients
    from hessop.stats.covariance import _inverse
    from hessop.structured.factored import _check_damping

    damping = _check_damping(damping)
    top_k = check_positive_int(top_k, "top_k")
    if isinstance(curvature, str):
        if curvature not in CURVATURES:
            msg = f"curvature: expected one of {CURVATURES} or a LinearOperator, got {curvature!r}."
            raise ValueError(msg)
        operator_class = EKFACOperator if curvature == "ekfac" else KFACOperator
        curvature = operator_class(model, loss_fn, train_data, params=params, batch_size=batch_size, reduction="mean")
        inverse = curvature.inverse(damping, heuristic="exact")
    elif isinstance(curvature, LinearOperator):
        inverse = _inverse(curvature, None, 1.0, damping, "cg", None, rtol, 0)
    else:
        msg = f"curvature: expected 'ekfac', 'kfac' or a LinearOperator, got {type(curvature).__name__}."
        raise TypeError(msg)
    train = JacobianOperator(model, loss_fn, train_data, params=params, batch_size=batch_size, target="loss")
    if curvature.shape != (train.shape[1], train.shape[1]):
        msg = f"curvature: shape {curvature.shape} does not match the model's P = {train.shape[1]}."
        raise ValueError(msg)
    test = np.asarray(
        per_example_gradients(model, loss_fn, test_data, params=params, batch_size=batch_size, concatenate=True),
        dtype=np.float64,
    )  # (Q, P)
    solved = np.asarray(inverse.matmat(test.T.astype(inverse.dtype)), dtype=np.float64)  # (P, Q)
    scores = -np.asarray(train.matmat(solved.astype(train.dtype)), dtype=np.float64).T  # (Q, N)
    if not np.all(np.isfinite(scores)):
        msg = "influence: non-finite scores (NaN or inf in the gradients or the curvature); check the data and damping."
        raise ValueError(msg)
    k = min(top_k, scores.shape[1])
    order = np.argsort(scores, axis=1, kind="stable")
    return InfluenceScores(scores=scores, helpful=order[:, :k], harmful=order[:, ::-1][:, :k], curvature=curvature)
