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
    "HessianOperator": "hessop.hessian",
    "JacobianOperator": "hessop.jacobian",
    "OPGOperator": "hessop.opg",
    "GGNOperator": "hessop.ggn",
    "per_example_gradients": "hessop.opg",
    # low-rank and full-rank approximations
    "LowRankOperator": "hessop.lowrank",
    "FullRankOperator": "hessop.lowrank",
    "load": "hessop.lowrank",
    "low_rank": "hessop.eigenpairs",
    "full_rank": "hessop.eigenpairs",
    # spectra and estimators
    "eigen": "hessop.eigenpairs",
    "trace": "hessop.estimators",
    "diagonal": "hessop.estimators",
    "row_sums": "hessop.estimators",
    "spectral_density": "hessop.estimators",
    "SpectralDensity": "hessop.estimators",
    "plot_spectrum": "hessop.plot",
    # statistics
    "covariance": "hessop.stats",
    "standard_errors": "hessop.stats",
    "summary": "hessop.stats",
    "predictive_variance": "hessop.stats",
    "influence": "hessop.stats",
    "CovarianceOperator": "hessop.stats",
    "NotPositiveDefiniteError": "hessop.stats",
    "Laplace": "hessop.laplace",
    # parameter layout
    "flatten": "hessop._params",
    "unflatten": "hessop._params",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from hessop._params import flatten, unflatten
    from hessop.eigenpairs import eigen, full_rank, low_rank
    from hessop.estimators import SpectralDensity, diagonal, row_sums, spectral_density, trace
    from hessop.ggn import GGNOperator
    from hessop.hessian import HessianOperator
    from hessop.jacobian import JacobianOperator
    from hessop.laplace import Laplace
    from hessop.lowrank import FullRankOperator, LowRankOperator, load
    from hessop.opg import OPGOperator, per_example_gradients
    from hessop.plot import plot_spectrum
    from hessop.stats import (
        CovarianceOperator,
        NotPositiveDefiniteError,
        covariance,
        influence,
        predictive_variance,
        standard_errors,
        summary,
    )


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
