"""hessop: curvature of TensorFlow models as scipy LinearOperators.

Operators never form a P×P matrix unless asked; pass them to
``scipy.sparse.linalg`` solvers (``eigsh``, ``lobpcg``, ``cg``, ``minres``, ...).

Public names are imported lazily (PEP 562), so ``import hessop`` does not
import TensorFlow until an operator is used; ``python -m hessop`` relies on it
to configure TensorFlow's logging first.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    # data-pass operators
    "HessianOperator": "hessop.operators.hessian",
    "JacobianOperator": "hessop.operators.jacobian",
    "OPGOperator": "hessop.operators.opg",
    "GGNOperator": "hessop.operators.ggn",
    "per_example_gradients": "hessop.operators.opg",
    # structured curvature
    "KFACOperator": "hessop.operators.kfac",
    "EKFACOperator": "hessop.operators.kfac",
    "FisherOperator": "hessop.operators.fisher",
    "KroneckerOperator": "hessop.structured.factored",
    # low-rank and full-rank approximations
    "LowRankOperator": "hessop.lowrank.operators",
    "FullRankOperator": "hessop.lowrank.operators",
    "load": "hessop.lowrank.operators",
    "low_rank": "hessop.spectral.eigen",
    "full_rank": "hessop.spectral.eigen",
    # spectra and estimators
    "eigen": "hessop.spectral.eigen",
    "trace": "hessop.spectral.estimators",
    "diagonal": "hessop.spectral.estimators",
    "row_sums": "hessop.spectral.estimators",
    "spectral_density": "hessop.spectral.estimators",
    "SpectralDensity": "hessop.spectral.estimators",
    "plot_spectrum": "hessop.spectral.plot",
    "block_diagonal": "hessop.spectral.block_diagonal",
    "BlockDiagonalOperator": "hessop.spectral.block_diagonal",
    # statistics
    "covariance": "hessop.stats.covariance",
    "standard_errors": "hessop.stats.covariance",
    "summary": "hessop.stats.covariance",
    "predictive_variance": "hessop.stats.covariance",
    "influence": "hessop.stats.covariance",
    "CovarianceOperator": "hessop.stats.covariance",
    "NotPositiveDefiniteError": "hessop.stats.covariance",
    "Laplace": "hessop.stats.laplace",
    "influence_scores": "hessop.stats.influence",
    "InfluenceScores": "hessop.stats.influence",
    "RegressionPredictive": "hessop.stats.laplace",
    # training
    "EvidenceCallback": "hessop.training.callbacks",
    "PriorRegularizer": "hessop.training.callbacks",
    # parameter layout
    "flatten": "hessop.autodiff.params",
    "unflatten": "hessop.autodiff.params",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from hessop.autodiff.params import flatten, unflatten
    from hessop.lowrank.operators import FullRankOperator, LowRankOperator, load
    from hessop.operators.fisher import FisherOperator
    from hessop.operators.ggn import GGNOperator
    from hessop.operators.hessian import HessianOperator
    from hessop.operators.jacobian import JacobianOperator
    from hessop.operators.kfac import EKFACOperator, KFACOperator
    from hessop.operators.opg import OPGOperator, per_example_gradients
    from hessop.spectral.block_diagonal import BlockDiagonalOperator, block_diagonal
    from hessop.spectral.eigen import eigen, full_rank, low_rank
    from hessop.spectral.estimators import SpectralDensity, diagonal, row_sums, spectral_density, trace
    from hessop.spectral.plot import plot_spectrum
    from hessop.stats.covariance import (
        CovarianceOperator,
        NotPositiveDefiniteError,
        covariance,
        influence,
        predictive_variance,
        standard_errors,
        summary,
    )
    from hessop.stats.influence import InfluenceScores, influence_scores
    from hessop.stats.laplace import Laplace, RegressionPredictive
    from hessop.structured.factored import KroneckerOperator
    from hessop.training.callbacks import EvidenceCallback, PriorRegularizer


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        msg = f"module 'hessop' has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
