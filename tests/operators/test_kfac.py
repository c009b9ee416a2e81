"""KFACOperator and EKFACOperator against block-diagonal GGNs and OPGs built from first-order pieces only.

The truths here never use hessop's engine or second derivatives of the model:
J comes from `GradientTape.jacobian` of the outputs (first order), the
loss's Hessian in the outputs is written in closed form (squared error,
softmax and sigmoid cross-entropy), and GGN = scale Σ Jₙᵀ Mₙ Jₙ.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy.sparse.linalg import LinearOperator, cg

import hessop
from hessop.operators.kfac import EKFACOperator, KFACOperator

F64 = "float64"


def _jacobian(model: keras.Model, x: object) -> np.ndarray:
    """(N, K, P): the model outputs' Jacobian, first order, in hessop's flat order."""
    params = model.trainable_variables
    with tf.GradientTape() as tape:
        f = model(x, training=False)
        f = tf.concat([tf.reshape(leaf, (tf.shape(leaf)[0], -1)) for leaf in tf.nest.flatten(f)], axis=1)
    pieces = tape.jacobian(f, params, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    n, k = f.shape
    return np.concatenate([np.reshape(p, (n, k, -1)) for p in pieces], axis=2), f.numpy()


def _mse_hessian(f: np.ndarray) -> np.ndarray:
    """Keras's mean squared error averages over all K outputs of an example: M = 2/K · I."""
    n, k = f.shape
    return np.broadcast_to(2.0 / k * np.eye(k), (n, k, k))


def _softmax_hessian(f: np.ndarray) -> np.ndarray:
    p = np.exp(f - f.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return np.stack([np.diag(q) - np.outer(q, q) for q in p])


def _sigmoid_hessian(f: np.ndarray) -> np.ndarray:
    """Keras's binary cross-entropy averages over the K labels."""
    p = 1 / (1 + np.exp(-f))
    return np.stack([np.diag(q * (1 - q)) for q in p]) / f.shape[1]


def _ggn(model: keras.Model, x: object, hessian, scale: float) -> np.ndarray:
    J, f = _jacobian(model, x)
    M = hessian(f)
    return scale * np.einsum("nkp,nkl,nlq->pq", J, M, J)


def _on_blocks(K: KFACOperator, dense: np.ndarray) -> np.ndarray:
    """``dense`` with every entry outside K's blocks set to zero."""
    out = np.zeros_like(dense)
    for index in K._indices:
        index = np.arange(index.start, index.stop) if isinstance(index, slice) else index
        out[np.ix_(index, index)] = dense[np.ix_(index, index)]
    return out


def _close(a: np.ndarray, b: np.ndarray, rtol: float = 1e-10) -> None:
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())


def _deep_linear(d_in: int = 3, seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((d_in,)),
            keras.layers.Dense(4, dtype=F64),
            keras.layers.Dense(3, dtype=F64),
            keras.layers.Dense(2, dtype=F64),
        ]
    )


def _mse() -> keras.losses.Loss:
    return keras.losses.MeanSquaredError(dtype=F64)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("separate_bias", [True, False])
def test_type2_is_the_block_ggn_of_a_deep_linear_network(reduction: str, separate_bias: bool) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(13, 3)), rng.normal(size=(13, 2))
    model = _deep_linear()
    # Unequal batches: 5, 5 and 3 examples.
    K = KFACOperator(model, _mse(), (x, y), batch_size=5, reduction=reduction, separate_bias=separate_bias)
    exact = _ggn(model, x, _mse_hessian, 1 / 13 if reduction == "mean" else 1.0)
    _close(K.to_dense(), _on_blocks(K, exact))
    assert len(K.blocks) == (6 if separate_bias else 3)
    assert K.num_passes == 1


def test_type2_with_dict_inputs() -> None:
    rng = np.random.default_rng(1)
    inputs = {"a": keras.Input((2,), name="a", dtype=F64), "b": keras.Input((3,), name="b", dtype=F64)}
    h = keras.layers.Concatenate(dtype=F64)([inputs["a"], inputs["b"]])
    h = keras.layers.Dense(4, dtype=F64)(h)
    model = keras.Model(inputs, keras.layers.Dense(2, dtype=F64)(h))
    x = {"a": rng.normal(size=(9, 2)), "b": rng.normal(size=(9, 3))}
    y = rng.normal(size=(9, 2))
    K = KFACOperator(model, _mse(), (x, y), batch_size=4)
    _close(K.to_dense(), _on_blocks(K, _ggn(model, x, _mse_hessian, 1 / 9)))


def test_expand_on_a_sequence_with_per_position_targets() -> None:
    rng = np.random.default_rng(2)
    keras.utils.set_random_seed(2)
    model = keras.Sequential([keras.Input((4, 3)), keras.layers.Dense(5, dtype=F64), keras.layers.Dense(2, dtype=F64)])
    x, y = rng.normal(size=(7, 4, 3)), rng.normal(size=(7, 4, 2))
    K = KFACOperator(model, _mse(), (x, y), kfac_approx="expand")
    _close(K.to_dense(), _on_blocks(K, _ggn(model, x, _mse_hessian, 1 / 7)))


def test_reduce_on_a_sequence_with_pooled_outputs() -> None:
    rng = np.random.default_rng(3)
    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [
            keras.Input((4, 3)),
            keras.layers.Dense(5, dtype=F64),
            keras.layers.GlobalAveragePooling1D(dtype=F64),
            keras.layers.Dense(2, dtype=F64),
        ]
    )
    x, y = rng.normal(size=(7, 4, 3)), rng.normal(size=(7, 2))
    K = KFACOperator(model, _mse(), (x, y), kfac_approx="reduce", separate_bias=False)
    _close(K.to_dense(), _on_blocks(K, _ggn(model, x, _mse_hessian, 1 / 7)))
    # "expand" is not exact here: it treats the positions as independent rows.
    expand = KFACOperator(model, _mse(), (x, y), kfac_approx="expand", separate_bias=False)
    assert not np.allclose(expand.to_dense(), K.to_dense(), rtol=1e-3)


def _tanh_classifier(outputs: int, seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4, activation="tanh", dtype=F64), keras.layers.Dense(outputs, dtype=F64)]
    )


@pytest.mark.parametrize("loss", ["ce", "bce"])
def test_type2_is_exact_on_one_example(loss: str) -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(size=(1, 3))
    if loss == "ce":
        model, y = _tanh_classifier(3, 4), np.array([2])
        loss_fn, hessian = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype=F64), _softmax_hessian
    else:
        model, y = _tanh_classifier(2, 5), np.array([[1.0, 0.0]])
        loss_fn, hessian = keras.losses.BinaryCrossentropy(from_logits=True, dtype=F64), _sigmoid_hessian
    K = KFACOperator(model, loss_fn, (x, y), separate_bias=False)
    _close(K.to_dense(), _on_blocks(K, _ggn(model, x, hessian, 1.0)))


def test_empirical_is_the_block_opg_of_one_example() -> None:
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(1, 3)), np.array([1])
    model = _tanh_classifier(3, 6)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype=F64)
    K = KFACOperator(model, loss_fn, (x, y), fisher_type="empirical")
    J, f = _jacobian(model, x)
    p = np.exp(f) / np.exp(f).sum()
    gradient = J[0].T @ (p[0] - np.eye(3)[1])
    _close(K.to_dense(), _on_blocks(K, np.outer(gradient, gradient)))


@pytest.mark.parametrize("loss", ["sparse_ce", "ce_per_position", "bce", "mse", "custom"])
def test_mc_converges_to_type2_and_is_seeded(loss: str) -> None:
    """Sampled labels (Keras CE, BCE, MSE) or sampled square-root columns (any other loss) average to type2."""
    rng = np.random.default_rng(6)
    x = rng.normal(size=(8, 3))
    model = _tanh_classifier(3, 7)
    if loss == "sparse_ce":
        y, loss_fn = rng.integers(0, 3, 8), keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype=F64)
    elif loss == "ce_per_position":
        keras.utils.set_random_seed(8)
        model = keras.Sequential(
            [keras.Input((2, 3)), keras.layers.Dense(4, activation="tanh", dtype=F64), keras.layers.Dense(3, dtype=F64)]
        )
        x = rng.normal(size=(8, 2, 3))
        y = np.eye(3)[rng.integers(0, 3, (8, 2))]
        loss_fn = keras.losses.CategoricalCrossentropy(from_logits=True, dtype=F64)
    elif loss == "bce":
        y, loss_fn = rng.integers(0, 2, (8, 3)).astype(float), keras.losses.BinaryCrossentropy(from_logits=True, dtype=F64)
    elif loss == "mse":
        y, loss_fn = rng.normal(size=(8, 3)), _mse()
    else:  # not a Keras loss: hessop samples S ε from the output Hessian instead of labels
        y = rng.normal(size=(8, 3))

        def loss_fn(y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
            return tf.reduce_sum(tf.math.softplus(y_pred - y_true) ** 2, axis=-1)

    type2 = KFACOperator(model, loss_fn, (x, y)).to_dense()

    def error(samples: int, seed: int) -> float:
        mc = KFACOperator(model, loss_fn, (x, y), fisher_type="mc", mc_samples=samples, seed=seed).to_dense()
        return np.linalg.norm(mc - type2) / np.linalg.norm(type2)

    # Monte Carlo's error shrinks as 1/√samples: about 22× from 4 to 2,000 samples. One draw
    # at 4 samples varies too much to compare with, so take the mean of three; ask for 5×.
    few, many = np.mean([error(4, seed) for seed in range(3)]), error(2000, 0)
    assert many < few / 5
    assert many < 0.05
    again = KFACOperator(model, loss_fn, (x, y), fisher_type="mc", mc_samples=4, seed=0).to_dense()
    other = KFACOperator(model, loss_fn, (x, y), fisher_type="mc", mc_samples=4, seed=1).to_dense()
    np.testing.assert_array_equal(again, KFACOperator(model, loss_fn, (x, y), fisher_type="mc", mc_samples=4, seed=0).to_dense())
    assert not np.allclose(again, other)


def test_conv2d_patches_follow_the_kernel_layout() -> None:
    """A Conv2D that sees its whole input once is a Dense on the flattened input: KFAC is exact there."""
    rng = np.random.default_rng(7)
    keras.utils.set_random_seed(7)
    model = keras.Sequential(
        [
            keras.Input((3, 3, 2)),
            keras.layers.Conv2D(4, (3, 3), padding="valid", dtype=F64),
            keras.layers.Flatten(dtype=F64),
            keras.layers.Dense(2, dtype=F64),
        ]
    )
    x, y = rng.normal(size=(6, 3, 3, 2)), rng.normal(size=(6, 2))
    K = KFACOperator(model, _mse(), (x, y), separate_bias=False)
    _close(K.to_dense(), _on_blocks(K, _ggn(model, x, _mse_hessian, 1 / 6)))


@pytest.mark.parametrize(("padding", "strides", "dilation"), [("same", 1, 1), ("valid", 2, 1), ("same", 2, 1), ("valid", 1, 2)])
def test_conv2d_patches_times_the_kernel_are_the_convolution(padding: str, strides: int, dilation: int) -> None:
    rng = np.random.default_rng(8)
    conv = keras.layers.Conv2D(3, (3, 2), strides=strides, dilation_rate=dilation, padding=padding, use_bias=False, dtype=F64)
    model = keras.Sequential([keras.Input((6, 5, 2)), conv, keras.layers.Flatten(dtype=F64)])
    x, y = rng.normal(size=(2, 6, 5, 2)), rng.normal(size=(2, int(np.prod(model.output_shape[1:]))))
    K = KFACOperator(model, _mse(), (x, y))
    item = K._layers[0]
    patches = K._work._layer_inputs(item, tf.constant(x)).numpy()
    expected = conv(x).numpy()
    np.testing.assert_allclose(patches @ conv.kernel.numpy().reshape(-1, 3), expected, rtol=1e-12, atol=1e-12)


def test_embedding_has_a_diagonal_factor_and_is_exact_for_one_token() -> None:
    rng = np.random.default_rng(9)
    keras.utils.set_random_seed(9)
    model = keras.Sequential(
        [
            keras.Input((1,), dtype="int32"),
            keras.layers.Embedding(5, 3, dtype=F64),
            keras.layers.Flatten(dtype=F64),
            keras.layers.Dense(2, dtype=F64),
        ]
    )
    x, y = rng.integers(0, 5, size=(11, 1)), rng.normal(size=(11, 2))
    K = KFACOperator(model, _mse(), (x, y))
    assert K.blocks[0].A.ndim == 1
    np.testing.assert_allclose(K.blocks[0].A, np.bincount(x[:, 0], minlength=5) / 11)
    _close(K.to_dense(), _on_blocks(K, _ggn(model, x, _mse_hessian, 1 / 11)))


@pytest.mark.parametrize("norm", ["layer", "batch"])
def test_normalisation_blocks_are_exact(norm: str) -> None:
    rng = np.random.default_rng(10)
    keras.utils.set_random_seed(10)
    layer = keras.layers.LayerNormalization(dtype=F64) if norm == "layer" else keras.layers.BatchNormalization(dtype=F64)
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4, activation="tanh", dtype=F64), layer, keras.layers.Dense(3, dtype=F64)]
    )
    if norm == "batch":
        layer.moving_mean.assign(rng.normal(size=4))
        layer.moving_variance.assign(rng.uniform(0.5, 2, size=4))
    layer.gamma.assign(rng.uniform(0.5, 2, size=4))
    layer.beta.assign(rng.normal(size=4))
    x, y = rng.normal(size=(10, 3)), rng.integers(0, 3, 10)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype=F64)
    K = KFACOperator(model, loss_fn, (x, y))
    exact = _ggn(model, x, _softmax_hessian, 1 / 10)
    norm_index = [i for name, i in zip(K.names, K._indices) if name == layer.name][0]
    _close(K.to_dense()[norm_index, norm_index], exact[norm_index, norm_index])


def test_ekfac_is_exact_where_kfac_is_and_closer_elsewhere() -> None:
    rng = np.random.default_rng(11)
    x, y = rng.normal(size=(9, 3)), rng.normal(size=(9, 2))
    model = _deep_linear()
    E = EKFACOperator(model, _mse(), (x, y), batch_size=4)
    _close(E.to_dense(), _on_blocks(E, _ggn(model, x, _mse_hessian, 1 / 9)))
    assert E.num_passes == 2
    x, y = rng.normal(size=(16, 3)), rng.integers(0, 3, 16)
    model = _tanh_classifier(3, 12)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype=F64)
    exact = _ggn(model, x, _softmax_hessian, 1 / 16)
    K, E = KFACOperator(model, loss_fn, (x, y)), EKFACOperator(model, loss_fn, (x, y))
    for index in K._indices:
        block = exact[index, index]
        kfac_error = np.linalg.norm(K.to_dense()[index, index] - block)
        ekfac_error = np.linalg.norm(E.to_dense()[index, index] - block)
        assert ekfac_error <= kfac_error + 1e-12 * np.linalg.norm(block)
    assert np.linalg.norm(E.to_dense() - _on_blocks(E, exact)) < 0.9 * np.linalg.norm(K.to_dense() - _on_blocks(K, exact))


def test_ekfac_sequence_and_embedding_refits_match_per_example_gradients() -> None:
    """With one example, EKFAC's refit is exact for any block: Λ holds the rotated gradient's squares."""
    rng = np.random.default_rng(12)
    keras.utils.set_random_seed(12)
    model = keras.Sequential(
        [
            keras.Input((4,), dtype="int32"),
            keras.layers.Embedding(6, 3, dtype=F64),
            keras.layers.Dense(2, activation="tanh", dtype=F64),
            keras.layers.Dense(2, dtype=F64),
        ]
    )
    x, y = rng.integers(0, 6, size=(1, 4)), rng.normal(size=(1, 4, 2))
    E = EKFACOperator(model, _mse(), (x, y), fisher_type="empirical")
    J, f = _jacobian(model, x)
    gradient = J[0].T @ (2 / f.shape[1] * (f[0] - y.reshape(-1)))
    # Rank one: EKFAC's eigenbasis diagonal is not the whole block, but its diagonal in that basis is.
    for block, index in zip(E.blocks, E._indices):
        Ua = np.eye(block.values.shape[0]) if block.Ua is None else block.Ua
        U = np.kron(Ua, block.Ug)
        rotated = U.T @ gradient[index]
        np.testing.assert_allclose(block.values.ravel(), rotated**2, rtol=1e-9, atol=1e-12 * np.max(rotated**2))


def test_refusals() -> None:
    rng = np.random.default_rng(13)
    x, y = rng.normal(size=(4, 3, 2)), rng.normal(size=(4, 2))
    lstm = keras.layers.LSTM(2, dtype=F64)
    model = keras.Sequential([keras.Input((3, 2)), lstm, keras.layers.Dense(2, dtype=F64)])
    with pytest.raises(ValueError, match="lstm"):
        KFACOperator(model, _mse(), (x, y))
    # Left out through params, the rest is factored.
    K = KFACOperator(model, _mse(), (x, y), params=model.layers[-1].trainable_variables)
    assert K.shape == (6, 6)
    with pytest.raises(TypeError, match="Keras model"):
        w = tf.Variable(np.ones(2))
        KFACOperator(lambda x: x * w, _mse(), (np.ones((2, 2)), np.ones((2, 2))), params=[w])
    shared = keras.layers.Dense(2, dtype=F64)
    inputs = keras.Input((2,))
    twice = keras.Model(inputs, shared(shared(inputs)))
    with pytest.raises(ValueError, match="called 2 times"):
        KFACOperator(twice, _mse(), (np.ones((3, 2)), np.ones((3, 2))))
    small = _deep_linear()
    data = (np.ones((3, 3)), np.ones((3, 2)))
    for kwargs, error in [
        ({"fisher_type": "fisher"}, ValueError),
        ({"kfac_approx": "mean"}, ValueError),
        ({"mc_samples": 0}, ValueError),
        ({"seed": -1}, TypeError),
        ({"separate_bias": "yes"}, TypeError),
        ({"reduction": "none"}, ValueError),
    ]:
        with pytest.raises(error, match=next(iter(kwargs))):
            KFACOperator(small, _mse(), data, **kwargs)
    with pytest.raises(ValueError, match="not finite"):
        KFACOperator(small, _mse(), (np.full((3, 3), np.nan), np.ones((3, 2))))


def test_kfac_operator_works_with_scipy_and_round_trips(tmp_path) -> None:
    rng = np.random.default_rng(14)
    x, y = rng.normal(size=(12, 3)), rng.integers(0, 3, 12)
    model = _tanh_classifier(3, 15)
    K = hessop.KFACOperator(model, keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype=F64), (x, y))
    b = rng.normal(size=K.shape[0])
    inverse = K.inverse(1e-2, heuristic="exact")
    shifted = LinearOperator(K.shape, matvec=lambda v: K @ v + 1e-2 * v, dtype=np.float64)
    solution, _ = cg(shifted, b, rtol=1e-12, maxiter=1000)
    np.testing.assert_allclose(inverse @ b, solution, rtol=1e-6)
    K.save(tmp_path / "kfac.npz")
    loaded = hessop.load(tmp_path / "kfac.npz")
    np.testing.assert_array_equal(loaded.to_dense(), K.to_dense())
    assert "fisher_type='type2'" in repr(K)


def _output_covariance_models() -> dict[str, tuple[keras.Model, np.ndarray]]:
    rng = np.random.default_rng(20)
    keras.utils.set_random_seed(20)
    conv = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(3, 3, strides=2, padding="same", activation="tanh", dtype=F64),
            keras.layers.Flatten(dtype=F64),
            keras.layers.Dense(2, dtype=F64),
        ]
    )
    sequence = keras.Sequential(
        [keras.Input((4, 3)), keras.layers.Dense(5, activation="tanh", dtype=F64), keras.layers.Dense(2, dtype=F64)]
    )
    norm = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, activation="tanh", dtype=F64),
            keras.layers.LayerNormalization(dtype=F64),
            keras.layers.Dense(3, dtype=F64),
        ]
    )
    return {
        "conv": (conv, rng.normal(size=(5, 6, 6, 2))),
        "sequence": (sequence, rng.normal(size=(5, 4, 3))),
        "norm": (norm, rng.normal(size=(5, 3))),
    }


@pytest.mark.parametrize("name", ["conv", "sequence", "norm"])
@pytest.mark.parametrize("separate_bias", [True, False])
def test_output_covariance_is_the_jacobian_sandwich(name: str, separate_bias: bool) -> None:
    """Against predictive_variance: first-order Jacobian rows times the covariance's dense products."""
    model, x = _output_covariance_models()[name]
    f = np.asarray(model(x))
    y = np.zeros(f.shape)
    K = KFACOperator(model, _mse(), (x, y), separate_bias=separate_bias)
    cov = K.inverse(0.1, heuristic="exact")
    expected = hessop.predictive_variance(model, x, cov)
    _close(K.output_covariance(x, cov, batch_size=2), expected, rtol=1e-9)
    with pytest.raises(ValueError, match="cov: expected a KroneckerOperator"):
        K.output_covariance(x, np.eye(K.shape[0]))
