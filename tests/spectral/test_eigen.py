"""hessop.eigen: Lanczos for any operator, uncentred incremental SVD for OPG."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg as sla
from conftest import dense_per_example_gradients, rel_err
from sklearn.decomposition import IncrementalPCA

import hessop


def opg(case, batch_size):
    return hessop.OPGOperator(case.model, case.loss_fn, (case.x, case.y), batch_size=batch_size)


def dense_opg_eigh(case):
    J = dense_per_example_gradients(case)
    values, vectors = np.linalg.eigh(J.T @ J / case.num_data)
    return values[::-1], vectors[:, ::-1], J


def subspace_error(vectors, reference):
    """Largest principal-angle sine between column spaces."""
    cosines = np.linalg.svd(reference.T @ vectors, compute_uv=False)
    return float(np.sqrt(max(0.0, 1 - cosines.min() ** 2)))


def test_lanczos_matches_eigh(mlp):
    G = opg(mlp, 20)
    values, vectors = hessop.eigen(G, k=4)
    ref_values, ref_vectors, _ = dense_opg_eigh(mlp)
    assert np.all(np.diff(values) <= 0)
    assert np.allclose(values, ref_values[:4], rtol=1e-8)
    assert subspace_error(vectors, ref_vectors[:, :4]) < 1e-6


@pytest.mark.parametrize("batch_size", [3, 32])  # below and above k
def test_ipca_converges_with_oversample(mlp, batch_size):
    k = 4
    G = opg(mlp, batch_size)
    ref_values, ref_vectors, _ = dense_opg_eigh(mlp)
    errors = []
    for oversample in (0, 5, 40):
        values, vectors = hessop.eigen(G, k=k, method="ipca", oversample=oversample)
        errors.append(np.max(np.abs(values - ref_values[:k]) / ref_values[:k]))
    assert errors[2] < 1e-10  # k + oversample >= rank(J) = P: exact
    assert errors[2] <= errors[1] <= errors[0] + 1e-15
    values, vectors = hessop.eigen(G, k=k, method="ipca", oversample=40)
    assert subspace_error(vectors, ref_vectors[:, :k]) < 1e-6


def test_centred_pca_of_j_is_visibly_off(mlp):
    ref_values, _, J = dense_opg_eigh(mlp)
    pca = IncrementalPCA(n_components=4, batch_size=16).fit(J)
    centred = pca.singular_values_**2 / mlp.num_data
    ours = hessop.eigen(opg(mlp, 16), k=4, method="ipca", oversample=40)[0]
    assert rel_err(ours, ref_values[:4]) < 1e-10
    assert rel_err(centred, ref_values[:4]) > 1e-2


def test_svds_of_j_squared_over_n_is_g_spectrum(mlp):
    J = hessop.JacobianOperator(mlp.model, mlp.loss_fn, (mlp.x, mlp.y), batch_size=20)
    singular = np.sort(sla.svds(J, k=3, tol=1e-12, random_state=0)[1])[::-1]
    assert np.allclose(singular**2 / 64, dense_opg_eigh(mlp)[0][:3], rtol=1e-8)


def test_bad_arguments(mlp):
    G = opg(mlp, 16)
    for method in ("lanczos", "ipca", "randomized"):
        with pytest.raises(ValueError, match="k=39"):  # k = P
            hessop.eigen(G, k=39, method=method)
    with pytest.raises(ValueError, match="k=40"):
        hessop.low_rank(G, k=40)
    with pytest.raises(ValueError, match="k=0"):
        hessop.eigen(G, k=0)
    with pytest.raises(TypeError, match="int"):
        hessop.eigen(G, k=2.0)
    with pytest.raises(ValueError, match="method"):
        hessop.eigen(G, k=2, method="power")
    H = hessop.HessianOperator(mlp.model, mlp.loss_fn, (mlp.x, mlp.y))
    with pytest.raises(ValueError, match="needs an OPGOperator"):
        hessop.eigen(H, k=2, method="ipca")
    with pytest.raises(ValueError, match="which"):
        hessop.eigen(G, k=2, method="ipca", which="SA")
    with pytest.raises(ValueError, match=r"^which: expected one of \('LA', 'LM', 'SA', 'SM', 'BE'\), got 'largest'\.$"):
        hessop.eigen(G, k=2, which="largest")
    # The range finder would have returned the largest-magnitude ones instead.
    with pytest.raises(ValueError, match=r"^which: method='randomized' gives the largest-magnitude eigenvalues"):
        hessop.eigen(G, k=2, method="randomized", which="SA")
