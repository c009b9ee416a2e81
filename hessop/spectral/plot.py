"""plot_spectrum: the spectral density and top eigenvalues (matplotlib, optional extra)."""

from __future__ import annotations

from typing import Any

import numpy as np

from hessop.spectral.estimators import SpectralDensity

__all__ = ["plot_spectrum"]


def plot_spectrum(
    density: SpectralDensity,
    eigenvalues: Any = None,
    *,
    ax: Any = None,
    log: bool = True,
    title: str | None = None,
) -> Any:
    """Draw a spectral density (from `spectral_density`) and mark the top eigenvalues.

    Parameters
    ----------
    density : SpectralDensity
    eigenvalues : array-like, optional
        E.g. from `eigen`; drawn as vertical lines (sharpness).
    ax : matplotlib.axes.Axes, optional
        Axes to draw on; default a new figure.
    log : bool
        Logarithmic density axis (the spectrum's bulk and outliers differ by
        orders of magnitude).
    title : str, optional

    Returns
    -------
    matplotlib.axes.Axes

    Raises
    ------
    ImportError
        If matplotlib is not installed (``pip install "hessop[plot]"``).

    Examples
    --------
    >>> import numpy as np, scipy.sparse.linalg as sla, hessop
    >>> A = sla.aslinearoperator(np.diag(np.linspace(0.0, 1.0, 30)))
    >>> density = hessop.spectral_density(A, num_lanczos=10)
    >>> ax = hessop.plot_spectrum(density, [1.0])  # doctest: +SKIP
    """
    try:
        import matplotlib

        if ax is None:
            matplotlib.use(matplotlib.get_backend() if _has_display() else "Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        msg = 'plot_spectrum needs matplotlib: pip install "hessop[plot]"'
        raise ImportError(msg) from err
    if not isinstance(density, SpectralDensity):
        msg = f"density: expected a SpectralDensity from hessop.spectral_density, got {type(density).__name__}."
        raise TypeError(msg)
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    floor = max(float(density.density.max()) * 1e-8, np.finfo(float).tiny)
    ax.plot(density.grid, np.maximum(density.density, floor) if log else density.density, color="C0", label="density (SLQ)")
    if log:
        ax.set_yscale("log")
    if eigenvalues is not None:
        for i, value in enumerate(np.atleast_1d(np.asarray(eigenvalues, dtype=float))):
            ax.axvline(value, color="C3", lw=0.8, ls="--", label="top eigenvalues" if i == 0 else None)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(title or "Spectral density")
    ax.legend(loc="upper right")
    return ax


def _has_display() -> bool:
    import os

    return bool(os.environ.get("DISPLAY") or os.environ.get("MPLBACKEND"))
