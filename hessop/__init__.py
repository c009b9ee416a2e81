"""hessop: curvature of TensorFlow models as scipy LinearOperators.

Operators never form a P×P matrix unless asked; pass them to
``scipy.sparse.linalg`` solvers (``eigsh``, ``lobpcg``, ``cg``, ``minres``, ...).
"""

from hessop._params import flatten, unflatten
from hessop.hessian import HessianOperator

__version__ = "0.1.0"

__all__ = [
    # operators
    "HessianOperator",
    # parameter layout
    "flatten",
    "unflatten",
]
