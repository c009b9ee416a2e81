"""LowRankOperator (QΛQᵀ) and FullRankOperator (QΛQᵀ + λ̃(I − QQᵀ)), with save/load."""

from __future__ import annotations

import contextlib
import os
import tempfile
import zipfile
from typing import Any, BinaryIO

import numpy as np
from scipy.sparse.linalg import LinearOperator

from hessop._validation import as_real_array, check_finite_array
from hessop.dense.columns import DEFAULT_MAX_DENSE, dense_from_operator
from hessop.lowrank import kernels as _kernels

__all__ = ["LowRankOperator", "FullRankOperator", "load"]

FORMAT_NAME = "hessop.spectral_operator"
FORMAT_VERSION = 1


class _SpectralOperator(LinearOperator):
    """A = Q diag(λ) Qᵀ + τ (I − QQᵀ): shared machinery; τ = 0 for low rank."""

    _symmetric = True  # `check_symmetric` trusts it without a product

    _kind = ""

    def __init__(self, Q: Any, eigenvalues: Any, tail: float, *, engine: str, check_orthonormal: bool) -> None:
        Q = np.asarray(Q)
        if Q.ndim != 2:
            msg = f"Q: expected a 2-D array (P, K), got shape {Q.shape}."
            raise ValueError(msg)
        if Q.dtype not in (np.float32, np.float64):
            if Q.dtype.kind in "iub":
                Q = Q.astype(np.float64)
            else:
                msg = f"Q: expected float32 or float64, got {Q.dtype}."
                raise TypeError(msg)
        num_params, rank = Q.shape
        if rank < 1 or rank > num_params:
            msg = f"Q: expected shape (P, K) with 1 <= K <= P, got {Q.shape}."
            raise ValueError(msg)
        eigenvalues = as_real_array(eigenvalues, "eigenvalues")
        if eigenvalues.shape != (rank,):
            msg = f"eigenvalues: expected shape ({rank},) to match Q's {rank} columns, got {eigenvalues.shape}."
            raise ValueError(msg)
        if engine not in _kernels.ENGINES:
            msg = f"engine: expected one of {_kernels.ENGINES}, got {engine!r}."
            raise ValueError(msg)
        tail = float(tail)
        check_finite_array(Q, "Q")
        check_finite_array(eigenvalues, "eigenvalues")
        check_finite_array(np.asarray(tail), "tail")
        self.Q = np.ascontiguousarray(Q)
        self.eigenvalues = eigenvalues
        self.tail = tail
        self.engine = engine
        self._shifted = eigenvalues - tail  # λ − τ: what the kernels apply on span(Q)
        super().__init__(dtype=self.Q.dtype, shape=(num_params, num_params))
        if check_orthonormal:
            self._check_orthonormal()

    def _check_orthonormal(self) -> None:
        """QᵀQ = I tested on a random probe: O(PK), two passes over Q, no K×K Gram matrix."""
        rank = self.Q.shape[1]
        probe = np.random.default_rng(0).standard_normal(rank)
        image = self.Q @ probe.astype(self.Q.dtype)
        back = self.Q.T.astype(np.float64, copy=False) @ image.astype(np.float64)
        error = np.linalg.norm(back - probe) / np.linalg.norm(probe)
        tolerance = 100 * np.sqrt(rank) * np.finfo(self.Q.dtype).eps
        if error > tolerance:
            msg = (
                f"Q: columns are not orthonormal (‖QᵀQz − z‖/‖z‖ = {error:.2e} for a random z, "
                f"tolerance {tolerance:.1e}); orthonormalise Q (e.g. numpy.linalg.qr) first."
            )
            raise ValueError(msg)

    # -- products ---------------------------------------------------------------
    def _checked(self, X: Any, name: str) -> np.ndarray:
        X = np.asarray(X)
        if np.iscomplexobj(X):
            msg = f"{name}: expected a real array, got dtype {X.dtype}."
            raise TypeError(msg)
        return X

    @staticmethod
    def _check_finite(squared_norms: np.ndarray, X: np.ndarray, name: str) -> None:
        # The kernels' column sums of X² are non-finite when X is (or when huge
        # finite entries overflow): only then is X itself scanned.
        if not np.all(np.isfinite(squared_norms)):
            check_finite_array(X, name)

    def _product(self, X: np.ndarray, name: str) -> np.ndarray:
        # Checked after the cast: a float64 entry beyond the float32 range
        # becomes inf there, and must not pass silently into the result.
        with np.errstate(over="ignore"):
            X = self._checked(X, name).astype(self.dtype, copy=False)
        out, squared_norms = _kernels.apply(self.engine, self.Q, self._shifted, self.tail, X)
        self._check_finite(squared_norms, X, name)
        return out

    def _matmat(self, X: np.ndarray) -> np.ndarray:
        return self._product(X, "X")

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        return self._product(np.reshape(x, (-1, 1)), "x").reshape(-1)

    def _adjoint(self) -> _SpectralOperator:
        return self

    def _transpose(self) -> _SpectralOperator:
        return self

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:
        return self._matvec(x)

    def _rmatmat(self, X: np.ndarray) -> np.ndarray:
        return self._matmat(X)

    def quadratic_form(self, x: Any) -> float | np.ndarray:
        """xᵀAx for a vector, or for each column of a (P, m) block, in one pass over Q.

        Examples
        --------
        >>> import numpy as np, hessop
        >>> A = hessop.LowRankOperator(np.eye(3)[:, :2], [2.0, 1.0])
        >>> A.quadratic_form(np.array([1.0, 1.0, 5.0]))
        3.0
        """
        x = self._checked(x, "x")
        if x.ndim not in (1, 2) or x.shape[0] != self.shape[0]:
            msg = f"x: expected shape ({self.shape[0]},) or ({self.shape[0]}, m), got {x.shape}."
            raise ValueError(msg)
        with np.errstate(over="ignore"):  # an overflow to inf is refused below
            block = x.reshape(self.shape[0], -1).astype(self.dtype, copy=False)
        values, squared_norms = _kernels.quadratic_form(self.engine, self.Q, self._shifted, self.tail, block)
        self._check_finite(squared_norms, block, "x")
        return float(values[0]) if x.ndim == 1 else values

    def diagonal(self) -> np.ndarray:
        """diag(A) = τ + Σₖ (λₖ − τ) Q²ᵢₖ, one pass over Q (float64)."""
        return _kernels.diagonal(self.engine, self.Q, self._shifted, self.tail)

    def trace(self) -> float:
        """tr(A) = Σₖ λₖ + τ (P − K)."""
        return float(self.eigenvalues.sum() + self.tail * (self.shape[0] - self.Q.shape[1]))

    def to_dense(self, *, max_params: int = DEFAULT_MAX_DENSE, block_size: int = 1024) -> np.ndarray:
        """The P×P matrix; refuses P above ``max_params`` (raise it deliberately)."""
        return dense_from_operator(self, max_params=max_params, block_size=block_size)

    def _with_eigenvalues(self, eigenvalues: np.ndarray, tail: float) -> _SpectralOperator:
        out = object.__new__(type(self))
        _SpectralOperator.__init__(out, self.Q, eigenvalues, tail, engine=self.engine, check_orthonormal=False)
        return out

    def _check_power(self, p: float, values: np.ndarray) -> float:
        p = float(p)
        if not np.isfinite(p):
            msg = f"p: expected a finite exponent, got {p}."
            raise ValueError(msg)
        if p != int(p) and np.any(values < 0):
            msg = f"p={p}: a non-integer power needs non-negative eigenvalues; the smallest is {values.min():.3g}."
            raise ValueError(msg)
        if p < 0 and np.any(values == 0):
            msg = f"p={p}: a negative power of a zero eigenvalue is undefined."
            raise ValueError(msg)
        return p

    # -- persistence --------------------------------------------------------------
    def save(self, path: str | os.PathLike | BinaryIO) -> None:
        """Write Q, eigenvalues, tail, dtype and a format version to one ``.npz`` file.

        Read it back with `hessop.load` (bit-exact round trip, no pickle).

        Parameters
        ----------
        path : str, os.PathLike or binary file object
            A file name ending in ``.npz``, written atomically: the archive
            goes to a temporary file in the same folder, which then replaces
            ``path``, so an interrupted save leaves any earlier file intact.
            Or a file object opened for binary writing.

        Raises
        ------
        ValueError
            If ``path`` is a name that does not end in ``.npz`` (numpy would
            silently add the suffix, and ``load(path)`` would not find the file).
        """
        write_archive(path, self._entries())

    def _entries(self) -> dict[str, np.ndarray]:
        return dict(
            format=np.array(FORMAT_NAME),
            version=np.array(FORMAT_VERSION),
            kind=np.array(self._kind),
            Q=self.Q,
            eigenvalues=self.eigenvalues,
            tail=np.array(self.tail),
            dtype=np.array(self.dtype.name),
        )

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} P={self.shape[0]} K={self.Q.shape[1]} dtype={self.dtype} "
            f"tail={self.tail:.4g} engine={self.engine!r}>"
        )


class LowRankOperator(_SpectralOperator):
    r"""Low-rank symmetric operator :math:`A = Q \Lambda Q^\top`, in O(PK) memory.

    Products, quadratic forms and the diagonal are numba kernels (float64
    accumulation, float32 storage allowed) that read Q at most twice.

    Parameters
    ----------
    Q : array, shape (P, K)
        Orthonormal columns (checked cheaply on a random probe).
    eigenvalues : array, shape (K,)
    engine : {"numba", "numpy"}
        Kernel implementation; "numpy" is the reference twin.
    check_orthonormal : bool
        Set False to skip the O(PK) check for a Q you know is orthonormal.

    Examples
    --------
    >>> import numpy as np, hessop
    >>> Q = np.linalg.qr(np.random.default_rng(0).normal(size=(6, 2)))[0]
    >>> A = hessop.LowRankOperator(Q, [3.0, 1.0])
    >>> bool(np.allclose(A @ np.eye(6), Q @ np.diag([3.0, 1.0]) @ Q.T))
    True
    """

    _kind = "low_rank"

    def __init__(self, Q: Any, eigenvalues: Any, *, engine: str = "numba", check_orthonormal: bool = True) -> None:
        super().__init__(Q, eigenvalues, 0.0, engine=engine, check_orthonormal=check_orthonormal)

    def pinv(self) -> LowRankOperator:
        """Moore-Penrose pseudo-inverse Q Λ⁺ Qᵀ (zero eigenvalues stay zero)."""
        inverse = np.zeros_like(self.eigenvalues)
        nonzero = self.eigenvalues != 0
        inverse[nonzero] = 1.0 / self.eigenvalues[nonzero]
        return self._with_eigenvalues(inverse, 0.0)

    def power(self, p: float) -> LowRankOperator:
        """Q Λᵖ Qᵀ on span(Q) (0 elsewhere); negative p is a pseudo-power."""
        p = float(p)
        if p < 0:
            return self.pinv().power(-p)
        p = self._check_power(p, self.eigenvalues)
        return self._with_eigenvalues(self.eigenvalues**p, 0.0)


class FullRankOperator(_SpectralOperator):
    r"""Full-rank approximation :math:`A = Q \Lambda Q^\top + \tilde\lambda (I - QQ^\top)`.

    The top-K eigenpairs are kept and the remaining P − K eigenvalues are
    replaced by :math:`\tilde\lambda` (``tail``, default the smallest kept
    eigenvalue :math:`\lambda_K`, as in Nilsen et al.). Invertible when every
    eigenvalue and the tail are non-zero; products, inverse, powers,
    log-determinant and quadratic forms cost O(PK).

    Parameters
    ----------
    Q : array, shape (P, K)
        Orthonormal columns.
    eigenvalues : array, shape (K,)
    tail : float, optional
        :math:`\tilde\lambda`; default ``min(eigenvalues)``.
    engine, check_orthonormal
        As for `LowRankOperator`.

    Examples
    --------
    >>> import numpy as np, hessop
    >>> Q = np.linalg.qr(np.random.default_rng(0).normal(size=(6, 2)))[0]
    >>> A = hessop.FullRankOperator(Q, [3.0, 2.0])
    >>> A.tail, bool(np.isclose(A.logdet(), np.log(3.0) + 5 * np.log(2.0)))
    (2.0, True)
    >>> bool(np.allclose(A @ (A.inverse() @ np.ones(6)), np.ones(6)))
    True
    """

    _kind = "full_rank"

    def __init__(
        self,
        Q: Any,
        eigenvalues: Any,
        tail: float | None = None,
        *,
        engine: str = "numba",
        check_orthonormal: bool = True,
    ) -> None:
        values = as_real_array(eigenvalues, "eigenvalues")
        if tail is None:
            if values.size == 0:
                msg = "eigenvalues: expected at least one eigenvalue."
                raise ValueError(msg)
            tail = float(values.min())
        super().__init__(Q, eigenvalues, tail, engine=engine, check_orthonormal=check_orthonormal)

    def _all_values(self) -> np.ndarray:
        has_tail = self.Q.shape[1] < self.shape[0]
        return np.append(self.eigenvalues, self.tail) if has_tail else self.eigenvalues

    def inverse(self) -> FullRankOperator:
        """The exact inverse: reciprocal eigenvalues and tail, same Q."""
        values = self._all_values()
        if np.any(values == 0):
            msg = "inverse: the operator is singular (an eigenvalue or the tail is 0)."
            raise ValueError(msg)
        return self._with_eigenvalues(1.0 / self.eigenvalues, 1.0 / self.tail)

    def power(self, p: float) -> FullRankOperator:
        """Aᵖ = Q Λᵖ Qᵀ + λ̃ᵖ (I − QQᵀ); e.g. p = −1/2 for whitening or sampling."""
        p = self._check_power(p, self._all_values())
        return self._with_eigenvalues(self.eigenvalues**p, self.tail**p)

    def logdet(self) -> float:
        """log det A = Σₖ log λₖ + (P − K) log λ̃; needs a positive definite operator."""
        values = self._all_values()
        if np.any(values <= 0):
            msg = f"logdet: the operator is not positive definite (smallest eigenvalue {values.min():.3g})."
            raise ValueError(msg)
        return float(np.sum(np.log(self.eigenvalues)) + (self.shape[0] - self.Q.shape[1]) * np.log(self.tail))


_KINDS = {"low_rank": LowRankOperator, "full_rank": FullRankOperator}


_ZIP_MAGIC = b"PK\x03\x04"  # the first bytes of a non-empty zip archive (what np.savez writes)
_NPY_MAGIC = b"\x93NUMPY"


def write_archive(path: str | os.PathLike | BinaryIO, entries: dict[str, np.ndarray]) -> None:
    """Write ``entries`` to an ``.npz`` file atomically (a temporary file, then a rename), or to a binary file object."""
    if hasattr(path, "write"):
        np.savez(path, **entries)
        return
    target = os.fspath(path)
    if not isinstance(target, str) or not target.endswith(".npz"):
        msg = f"path: expected a file name ending in '.npz', got {target!r}."
        raise ValueError(msg)
    folder = os.path.dirname(os.path.abspath(target))
    handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "wb") as file:
            np.savez(file, **entries)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise


def read_archive(path: str | os.PathLike | BinaryIO) -> tuple[dict[str, np.ndarray], str]:
    """The entries of an ``.npz`` archive (``allow_pickle=False``), and the phrase errors about it start with."""
    is_file = hasattr(path, "read")
    name = getattr(path, "name", type(path).__name__) if is_file else os.fspath(path)
    where = f"{name!r} is not a saved hessop operator"
    # A missing or unreadable file raises as open() does. Anything but a zip
    # archive is refused before numpy reads it: for other bytes np.load's
    # error suggests allow_pickle=True, which is not advice to pass on.
    if is_file:
        start = path.tell()
        magic = path.read(len(_NPY_MAGIC))
        path.seek(start)
    else:
        with open(path, "rb") as file:
            magic = file.read(len(_NPY_MAGIC))
    if not magic.startswith(_ZIP_MAGIC):
        got = "a single .npy array" if magic == _NPY_MAGIC else "a file that is not a zip archive"
        msg = f"{where}: expected an .npz archive, got {got}."
        raise ValueError(msg)
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        msg = f"{where}: {err}"
        raise ValueError(msg) from None
    try:
        with archive:
            entries = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        msg = f"{where}: {err}"
        raise ValueError(msg) from None
    return entries, where


def load(path: str | os.PathLike | BinaryIO, *, engine: str = "numba") -> Any:
    """Read an operator written by ``save``; ``allow_pickle=False``.

    Returns the `LowRankOperator`, `FullRankOperator` or `KroneckerOperator`
    (KFAC, EKFAC and their inverses) that was saved; ``engine`` applies to
    the first two.

    ``path``: a file name, or a file object opened for binary reading, as
    ``save`` takes them.

    Raises
    ------
    ValueError
        If the file is not a saved hessop operator (not an .npz archive,
        missing or foreign entries, unknown version, inconsistent shapes).
    OSError
        If the file cannot be opened (e.g. ``FileNotFoundError``).

    Examples
    --------
    >>> import numpy as np, hessop, tempfile, os
    >>> A = hessop.FullRankOperator(np.eye(4)[:, :2], [2.0, 1.0], tail=0.5)
    >>> path = os.path.join(tempfile.mkdtemp(), "A.npz"); A.save(path)
    >>> B = hessop.load(path)
    >>> type(B).__name__, B.tail, bool(np.array_equal(A.Q, B.Q))
    ('FullRankOperator', 0.5, True)
    """
    entries, where = read_archive(path)
    kind = str(entries.get("kind", ""))
    if kind.startswith("kronecker"):
        from hessop.structured.factored import from_entries  # numpy only; imported here to keep the layers apart

        return from_entries(entries, where)
    required = {"format", "version", "kind", "Q", "eigenvalues", "tail", "dtype"}
    missing = required - set(entries)
    if missing:
        msg = f"{where}: missing {sorted(missing)}."
        raise ValueError(msg)
    if entries["format"].shape != () or str(entries["format"]) != FORMAT_NAME:
        msg = f"{where}: format is {entries['format']!r}, expected {FORMAT_NAME!r}."
        raise ValueError(msg)
    if int(entries["version"]) != FORMAT_VERSION:
        msg = f"{where}: format version {int(entries['version'])} is not supported (expected {FORMAT_VERSION})."
        raise ValueError(msg)
    kind = str(entries["kind"])
    if kind not in _KINDS:
        msg = f"{where}: unknown kind {kind!r}."
        raise ValueError(msg)
    Q = entries["Q"]
    if str(entries["dtype"]) != Q.dtype.name:
        msg = f"{where}: dtype entry {str(entries['dtype'])!r} does not match Q's {Q.dtype.name}."
        raise ValueError(msg)
    try:
        if kind == "low_rank":
            return LowRankOperator(Q, entries["eigenvalues"], engine=engine, check_orthonormal=True)
        return FullRankOperator(Q, entries["eigenvalues"], float(entries["tail"]), engine=engine, check_orthonormal=True)
    except (TypeError, ValueError) as err:
        msg = f"{where}: {err}"
        raise ValueError(msg) from None
