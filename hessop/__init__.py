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
    # operators
    "HessianOperator": "hessop.hessian",
    # parameter layout
    "flatten": "hessop._params",
    "unflatten": "hessop._params",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from hessop._params import flatten, unflatten
    from hessop.hessian import HessianOperator


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
