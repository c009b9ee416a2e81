"""trace, diagonal, row_sums and spectral_density against exact values."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg as sla
from conftest import dense_hessian, rel_err

import hessop


def known_spectrum_operator(seed=0):
    """A dense symmetric matrix with a decaying spectrum and known eigenvalues."""
    rng = np.random.default_rng(seed)
    values = np.r_[np.full(5, 20.0), np.linspace(0.0, 1.0, 195)]
    Q = np.linalg.qr(rng.normal(size=(200, 200)))[0]
    return sla.aslinearoperator(Q @ np.diag(values) @ Q.T), values


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_trace_error_shrinks_with_matvecs(method):
    A, values = known_spectrum_operator()
    exact = values.sum()
    errors = [
        np.mean([abs(hessop.trace(A, method=method, num_matvecs=m, seed=s) - exact) for s in range(5)]) for m in (12, 48, 192)
    ]
    assert errors[2] < errors[0]
    assert errors[2] / exact < 0.05


def test_hutch_plus_plus_beats_hutchinson_on_decaying_spectrum():
    A, values = known_spectrum_operator()
    exact = values.sum()
    plain = np.mean([abs(hessop.trace(A, method="hutchinson", num_matvecs=30, seed=s) - exact) for s in range(8)])
    plus = np.mean([abs(hessop.trace(A, method="hutch++", num_matvecs=30, seed=s) - exact) for s in range(8)])
    assert plus < plain


def test_exact_diagonal_and_row_sums_of_hessian(mlp):
    H = hessop.HessianOperator(mlp.model, mlp.loss_fn, (mlp.x, mlp.y), batch_size=20)
    dense = dense_hessian(mlp)
    assert rel_err(hessop.diagonal(H, block_size=16), np.diag(dense)) < 1e-10
    assert rel_err(hessop.row_sums(H), dense.sum(axis=1)) < 1e-10
    with pytest.raises(ValueError, match="max_params"):
        hessop.diagonal(H, max_params=10)


def test_hutchinson_diagonal_converges():
    A, _ = known_spectrum_operator()
    exact = np.diag(A @ np.eye(200))
    coarse = np.abs(hessop.diagonal(A, method="hutchinson", num_matvecs=20) - exact).mean()
    fine = np.abs(hessop.diagonal(A, method="hutchinson", num_matvecs=2000) - exact).mean()
    assert fine < coarse / 4


def test_spectral_density_puts_mass_on_eigenvalues():
    A, values = known_spectrum_operator()
    result = hessop.spectral_density(A, num_lanczos=30, num_probes=10, seed=1)
    assert abs(np.trapezoid(result.density, result.grid) - 1) < 1e-12
    assert np.allclose(result.weights.sum(axis=1), 1)
    outlier_mass = np.trapezoid(result.density * (result.grid > 10), result.grid)
    assert abs(outlier_mass - 5 / 200) < 0.02  # 5 of 200 eigenvalues sit at 20
    assert abs(result.nodes.max() - 20.0) < 1e-6  # Lanczos finds the extreme eigenvalue
    window = 5 * result.sigma  # the Gaussian smoothing spreads each node over a few sigma
    in_bulk = (result.grid > -window) & (result.grid < 1 + window)
    assert abs(np.trapezoid(result.density * in_bulk, result.grid) - 195 / 200) < 0.02
    mean = np.trapezoid(result.grid * result.density, result.grid)
    assert abs(mean - values.mean()) < 0.05 * values.mean()  # SLQ's trace estimate / P
    assert "spectral density" in str(result)


def test_estimators_validate_arguments():
    A, _ = known_spectrum_operator()
    with pytest.raises(ValueError, match=r"^method: expected one of .* hessop\.diagonal\(op, method='exact'\)\.sum\(\)"):
        hessop.trace(A, method="exact")
    np.testing.assert_allclose(hessop.diagonal(A, method="exact").sum(), np.trace(A @ np.eye(A.shape[1])), rtol=1e-12)
    with pytest.raises(ValueError, match="num_matvecs"):
        hessop.trace(A, num_matvecs=0)
    with pytest.raises(ValueError, match="square"):
        hessop.trace(sla.aslinearoperator(np.ones((3, 2))))
    with pytest.raises(ValueError, match="sigma"):
        hessop.spectral_density(A, sigma=-1.0)


def test_plot_spectrum(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    A, values = known_spectrum_operator()
    ax = hessop.plot_spectrum(hessop.spectral_density(A, num_lanczos=20), values[:3])
    path = tmp_path / "spectrum.png"
    ax.figure.savefig(path)
    assert path.stat().st_size > 1000
    with pytest.raises(TypeError, match="SpectralDensity"):
        hessop.plot_spectrum(np.ones(3))
