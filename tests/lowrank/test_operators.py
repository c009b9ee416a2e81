"""LowRankOperator and FullRankOperator against dense numpy references."""

from __future__ import annotations

import io

import numpy as np
import pytest
import scipy.sparse.linalg as sla
from conftest import dense_hessian, rel_err

import hessop

P, K = 40, 6


def spectral_pair(dtype, seed=0):
    rng = np.random.default_rng(seed)
    Q = np.linalg.qr(rng.normal(size=(P, K)))[0].astype(dtype)
    values = np.sort(rng.uniform(0.5, 4.0, size=K))[::-1]
    return Q, values


def dense_low(Q, values):
    Q = Q.astype(np.float64)
    return Q @ np.diag(values) @ Q.T


def dense_full(Q, values, tail):
    Q = Q.astype(np.float64)
    return Q @ np.diag(values) @ Q.T + tail * (np.eye(len(Q)) - Q @ Q.T)


@pytest.fixture(
    params=[(np.float64, "numba"), (np.float64, "numpy"), (np.float32, "numba"), (np.float32, "numpy")],
    ids=lambda p: f"{p[0].__name__}-{p[1]}",
)
def setting(request):
    return request.param


def tolerance(dtype):
    return 1e-5 if dtype == np.float32 else 1e-12


@pytest.mark.parametrize("kind", ["low", "full"])
def test_products_and_summaries_match_dense(setting, kind):
    dtype, engine = setting
    Q, values = spectral_pair(dtype)
    if kind == "low":
        A = hessop.LowRankOperator(Q, values, engine=engine)
        dense = dense_low(Q, values)
    else:
        A = hessop.FullRankOperator(Q, values, engine=engine)
        dense = dense_full(Q, values, values.min())
        assert A.tail == values.min()
    assert A.dtype == dtype and A.shape == (P, P)
    rng = np.random.default_rng(3)
    x, X = rng.normal(size=P).astype(dtype), rng.normal(size=(P, 5)).astype(dtype)
    tol = tolerance(dtype)
    assert rel_err(A @ x, dense @ x) < tol
    assert rel_err(A @ X, dense @ X) < tol
    assert rel_err(A.H @ x, dense @ x) < tol
    assert abs(A.quadratic_form(x) - x @ dense @ x) < tol * abs(x @ dense @ x) * 10
    assert rel_err(A.quadratic_form(X), np.einsum("ij,ij->j", X, dense @ X)) < tol * 10
    assert rel_err(A.diagonal(), np.diag(dense)) < tol
    assert abs(A.trace() - np.trace(dense)) < tol * abs(np.trace(dense)) * 10
    assert rel_err(A.to_dense(), dense) < tol


def test_full_rank_inverse_logdet_power(setting):
    dtype, engine = setting
    Q, values = spectral_pair(dtype)
    A = hessop.FullRankOperator(Q, values, tail=0.3, engine=engine)
    dense = dense_full(Q, values, 0.3)
    tol = tolerance(dtype) * 10
    inverse = A.inverse()
    assert isinstance(inverse, hessop.FullRankOperator)
    assert rel_err(A @ inverse.to_dense(), np.eye(P)) < tol
    assert rel_err(inverse.to_dense(), np.linalg.inv(dense)) < tol
    assert abs(A.logdet() - np.linalg.slogdet(dense)[1]) < 1e-8 * P
    half = A.power(-0.5).to_dense()
    assert rel_err(half @ half, np.linalg.inv(dense)) < tol


def test_low_rank_pinv_and_power():
    Q, values = spectral_pair(np.float64)
    A = hessop.LowRankOperator(Q, values)
    assert rel_err(A.pinv().to_dense(), np.linalg.pinv(dense_low(Q, values))) < 1e-10
    assert rel_err(A.power(2).to_dense(), dense_low(Q, values) @ dense_low(Q, values)) < 1e-10


def test_solvers_accept_spectral_operators():
    Q, values = spectral_pair(np.float64)
    A = hessop.FullRankOperator(Q, values, tail=0.3)
    b = np.random.default_rng(4).normal(size=P)
    solution, info = sla.cg(A, b, rtol=1e-12)
    assert info == 0 and rel_err(solution, np.linalg.solve(dense_full(Q, values, 0.3), b)) < 1e-8
    assert rel_err(np.sort(sla.eigsh(A, k=2, which="LA")[0]), np.sort(values)[-2:]) < 1e-10


def test_bad_input():
    Q, values = spectral_pair(np.float64)
    with pytest.raises(ValueError, match="orthonormal"):
        hessop.LowRankOperator(Q * 2, values)
    with pytest.raises(ValueError, match=r"eigenvalues: expected shape \(6,\)"):
        hessop.LowRankOperator(Q, values[:3])
    with pytest.raises(TypeError, match="eigenvalues: expected real numbers, got complex"):
        hessop.LowRankOperator(Q, values * 1j)
    with pytest.raises(TypeError, match="eigenvalues: expected an array of real numbers, got str"):
        hessop.FullRankOperator(Q[:, :1], "2.0, 1.0", tail=0.1)
    with pytest.raises(ValueError, match="Q: expected a 2-D"):
        hessop.LowRankOperator(Q[:, 0], values[:1])
    with pytest.raises(ValueError, match="non-finite"):
        hessop.FullRankOperator(Q, np.r_[values[:-1], np.nan])
    with pytest.raises(ValueError, match="engine"):
        hessop.LowRankOperator(Q, values, engine="cuda")
    A = hessop.FullRankOperator(Q, values, tail=-1.0)
    with pytest.raises(ValueError, match="positive definite"):
        A.logdet()
    with pytest.raises(ValueError, match="non-integer power"):
        A.power(0.5)
    with pytest.raises(ValueError, match="singular"):
        hessop.FullRankOperator(Q, values, tail=0.0).inverse()
    with pytest.raises(ValueError, match="non-finite"):
        A @ np.full(P, np.nan)
    with pytest.raises(ValueError, match="max_params"):
        A.to_dense(max_params=10)


@pytest.mark.parametrize("engine", ["numba", "numpy"])
@pytest.mark.parametrize("tail", [0.0, 0.25])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_refused_without_a_separate_scan(engine, tail, bad):
    # The finiteness check rides on the kernels' column sums of X²: one bad entry
    # anywhere in a vector or a block, for low rank (tail 0) too, must be caught.
    Q, values = spectral_pair(np.float64)
    A = hessop.FullRankOperator(Q, values, tail=tail, engine=engine) if tail else hessop.LowRankOperator(Q, values, engine=engine)
    P = Q.shape[0]
    rng = np.random.default_rng(0)
    x = rng.normal(size=P)
    x[P // 3] = bad
    X = rng.normal(size=(P, 5))
    X[P - 1, 3] = bad
    with pytest.raises(ValueError, match=r"x: contains 1 non-finite"):
        A @ x
    with pytest.raises(ValueError, match=r"X: contains 1 non-finite"):
        A @ X
    with pytest.raises(ValueError, match=r"x: contains 1 non-finite"):
        A.quadratic_form(X)
    # Huge finite entries overflow the sums of squares but are not refused.
    huge = np.zeros(P)
    huge[0] = 1e200
    assert np.all(np.isfinite(A @ huge))
    # ... unless they overflow the operator's float32 storage.
    with pytest.raises(ValueError, match=r"x: contains 1 non-finite"):
        hessop.LowRankOperator(Q.astype(np.float32), values, engine=engine) @ huge
    with pytest.raises(ValueError, match=r"X: contains 1 non-finite"):
        hessop.LowRankOperator(Q.astype(np.float32), values, engine=engine) @ np.stack([huge, np.zeros(P)], axis=1)


def test_save_load_round_trip(tmp_path):
    for dtype in (np.float32, np.float64):
        Q, values = spectral_pair(dtype)
        for A in (hessop.LowRankOperator(Q, values), hessop.FullRankOperator(Q, values, tail=0.25)):
            path = tmp_path / f"{type(A).__name__}-{dtype.__name__}.npz"
            A.save(path)
            B = hessop.load(path)
            assert type(B) is type(A) and B.dtype == A.dtype
            assert np.array_equal(B.Q, A.Q) and np.array_equal(B.eigenvalues, A.eigenvalues) and B.tail == A.tail


def test_load_rejects_foreign_and_corrupted_files(tmp_path):
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, a=np.ones(3))
    with pytest.raises(ValueError, match="not a saved hessop operator.*missing"):
        hessop.load(foreign)
    Q, values = spectral_pair(np.float64)
    good = tmp_path / "good.npz"
    hessop.FullRankOperator(Q, values).save(good)
    corrupted = tmp_path / "corrupted.npz"
    corrupted.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="not a saved hessop operator"):
        hessop.load(corrupted)
    with np.load(good) as archive:
        entries = dict(archive)
    for key, value, pattern in [
        ("version", np.array(99), "version 99"),
        ("format", np.array("something.else"), "format"),
        ("kind", np.array("banded"), "unknown kind"),
        ("Q", Q[:, :2], "eigenvalues"),
    ]:
        broken = tmp_path / f"broken-{key}.npz"
        np.savez(broken, **{**entries, key: value})
        with pytest.raises(ValueError, match=pattern):
            hessop.load(broken)
    bare = tmp_path / "bare.npy"
    np.save(bare, np.ones(3))
    with pytest.raises(ValueError, match=r"got a single \.npy array"):
        hessop.load(bare)
    text = tmp_path / "text.npz"
    text.write_text("not an archive")
    # numpy's own error for these bytes suggests allow_pickle=True.
    with pytest.raises(
        ValueError, match="not a saved hessop operator: expected an .npz archive, got a file that is not a zip"
    ) as caught:
        hessop.load(text)
    assert "pickle" not in str(caught.value)
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="not a zip archive"):
        hessop.load(empty)
    with pytest.raises(FileNotFoundError):
        hessop.load(tmp_path / "missing.npz")
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, **{**entries, "Q": np.array([object()], dtype=object)})
    with pytest.raises(ValueError, match="not a saved hessop operator"):
        hessop.load(pickled)


@pytest.mark.parametrize("method", ["lanczos", "randomized"])
def test_low_rank_of_mlp_hessian(mlp, method):
    H = hessop.HessianOperator(mlp.model, mlp.loss_fn, (mlp.x, mlp.y))
    dense = dense_hessian(mlp)
    values, vectors = np.linalg.eigh(dense)
    top = np.argsort(values)[::-1][:3]
    if method == "lanczos":
        A = hessop.low_rank(H, 3)
    else:
        # The randomized method finds the largest |λ|; compare with those.
        top = np.argsort(np.abs(values))[::-1][:3]
        A = hessop.low_rank(H, 3, method="randomized", oversample=20, power_iterations=6)
    expected = np.sort(values[top])[::-1]
    assert np.allclose(A.eigenvalues, expected, rtol=1e-6)
    ref = vectors[:, top]
    assert np.linalg.svd(ref.T @ A.Q, compute_uv=False).min() > 1 - 1e-6


@pytest.mark.parametrize("constructor", ["low_rank", "full_rank"])
def test_k_equal_p_reproduces_h(mlp, constructor):
    H = hessop.HessianOperator(mlp.model, mlp.loss_fn, (mlp.x, mlp.y))
    A = getattr(hessop, constructor)(H, H.shape[0])
    assert A.Q.shape == (H.shape[0], H.shape[0])
    assert rel_err(A.to_dense(), dense_hessian(mlp)) < 1e-10


def test_save_is_atomic_exact_and_takes_file_objects(tmp_path, monkeypatch):
    Q, values = spectral_pair(np.float64)
    A = hessop.FullRankOperator(Q, values, tail=0.25)
    path = tmp_path / "approx.npz"
    A.save(path)
    good = path.read_bytes()

    # An interrupted save leaves the previous file as it was, and no temporary file behind.
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", interrupted)
    with pytest.raises(KeyboardInterrupt):
        hessop.LowRankOperator(Q, values).save(path)
    monkeypatch.undo()
    assert path.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["approx.npz"]
    # Exactly the path given: no silent ".npz" appended.
    with pytest.raises(ValueError, match=r"path: expected a file name ending in '\.npz', got '.*approx\.bin'"):
        A.save(tmp_path / "approx.bin")
    assert not (tmp_path / "approx.bin.npz").exists()
    # load takes what save takes: paths and binary file objects.
    buffer = io.BytesIO()
    A.save(buffer)
    buffer.seek(0)
    assert np.array_equal(hessop.load(buffer).Q, A.Q)
    with open(path, "rb") as file:
        assert hessop.load(file).tail == 0.25
