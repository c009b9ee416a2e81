"""FisherOperator: the Monte-Carlo Fisher (GGN) of sampled output directions, matrix-free."""

from __future__ import annotations

from typing import Any, Unpack

import numpy as np
import tensorflow as tf

from hessop._validation import check_positive_int
from hessop.autodiff.engine import Engine, output_matrix
from hessop.operators.base import CurvatureOptions, SymmetricDataPassOperator, with_options
from hessop.operators.ggn import _unflatten_outputs, loss_output_vectors

__all__ = ["FisherOperator"]

# Weights that fold a batch's per-example fingerprints (8 bytes each) into one number.
_BYTE_WEIGHTS = tf.constant([1, 1 << 8, 1 << 16, 1 << 24, 3, 3 << 8, 3 << 16, 3 << 24], dtype=tf.int64)


def _batch_seed(x: Any, seed: int) -> tf.Tensor:
    """A stateless seed from the operator's seed and the batch's contents: the same batch draws the same samples."""
    leaf = tf.convert_to_tensor(tf.nest.flatten(x)[0])
    prints = tf.cast(tf.fingerprint(tf.reshape(leaf, [tf.shape(leaf)[0], -1])), tf.int64)  # (B, 8)
    folded = tf.reduce_sum(prints * _BYTE_WEIGHTS * tf.range(1, tf.shape(prints, out_type=tf.int64)[0] + 1)[:, None])
    return tf.stack([tf.constant(seed, tf.int64), folded % (2**31 - 1)])


def _fisher_product(samples: int, seed: int) -> Any:
    def fisher(engine: Engine, x: Any, y: Any, v: tf.Tensor, part: tuple[int, ...] | None = None) -> tf.Tensor:
        """Jᵀ S ε εᵀ Sᵀ J v / R on one batch (traced): a JVP, R sampled output directions, a VJP."""
        with tf.GradientTape() as tape:
            predictions, jv = engine.linearize(lambda: engine.call_model(x), v, part)
        batch = tf.shape(tf.nest.flatten(x)[0])[0]
        vectors = loss_output_vectors(engine, x, y, predictions, "mc", samples, _batch_seed(x, seed))  # (B, K, R)
        coefficients = tf.einsum("bkr,bk->br", vectors, tf.stop_gradient(output_matrix(jv, batch)))
        back = _unflatten_outputs(tf.einsum("bkr,br->bk", vectors, coefficients), predictions)
        rows = engine.part_variables(part)[1]
        return engine.concat(engine.gradients(tape, predictions, back, rows))

    fisher.__name__ = "fisher"
    return fisher


@with_options(CurvatureOptions)
class FisherOperator(SymmetricDataPassOperator):
    r"""Monte-Carlo Fisher :math:`\frac1N \sum_n \frac1R \sum_r J_n^\top s_{nr} s_{nr}^\top J_n`, matrix-free.

    :math:`s_{nr} = S_n \varepsilon_{nr}` with :math:`S_n S_n^\top` the loss's
    Hessian in example n's outputs and :math:`\varepsilon \sim N(0, I)`: in
    expectation the GGN (the Fisher, for exponential-family losses on their
    natural parameters), at the cost of R output directions instead of
    the output-space Hessian-vector product. The samples are fixed per
    operator: drawn from ``seed`` and each batch's contents, so repeated
    products (and solvers) see one matrix, as long as the batches come in the
    same composition (no reshuffling between passes).

    Parameters
    ----------
    model, loss_fn, data
        As for `GGNOperator`; the loss must give per-example values.
    fisher_type : {"mc"}
        The only sampled form; ``"type2"`` is `GGNOperator`, ``"empirical"`` `OPGOperator`.
    mc_samples : int
        R, directions per example.
    seed : int
        Of the samples.

    Other Parameters
    ----------------
    params, batch_size, reduction, dtype, progress, check_deterministic, strategy, jit_compile : optional
        As for `HessianOperator`.

    Examples
    --------
    >>> import numpy as np, keras, hessop
    >>> rng = np.random.default_rng(0)
    >>> x, y = rng.normal(size=(20, 3)), rng.integers(0, 2, 20)
    >>> model = keras.Sequential(
    ...     [keras.Input((3,)), keras.layers.Dense(2, dtype="float64")]
    ... )
    >>> loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64")
    >>> F = hessop.FisherOperator(model, loss, (x, y), mc_samples=2000, seed=0)
    >>> G = hessop.GGNOperator(model, loss, (x, y))
    >>> v = rng.normal(size=F.shape[0])
    >>> error = np.linalg.norm(F @ v - G @ v) / np.linalg.norm(G @ v)
    >>> bool(np.allclose(F @ v, F @ v)), bool(error < 0.1)
    (True, True)
    """

    def __init__(
        self,
        model: Any,
        loss_fn: Any,
        data: Any,
        *,
        fisher_type: str = "mc",
        mc_samples: int = 1,
        seed: int = 0,
        **options: Unpack[CurvatureOptions],
    ) -> None:
        if fisher_type != "mc":
            msg = (
                f"fisher_type: FisherOperator samples ('mc'), got {fisher_type!r}; the exact 'type2' Fisher is "
                "GGNOperator and the 'empirical' one OPGOperator."
            )
            raise ValueError(msg)
        self.mc_samples = check_positive_int(mc_samples, "mc_samples")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            msg = f"seed: expected a non-negative int, got {seed!r}."
            raise TypeError(msg)
        self.seed = int(seed)
        self._product = _fisher_product(self.mc_samples, self.seed)
        self._setup(model, loss_fn, data, **options)
