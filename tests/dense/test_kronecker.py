"""to_dense's closed-form Dense-layer kernel block (hessop/dense/kronecker.py) against autodiff dense Hessians."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import Case, dense_ggn, dense_hessian, rel_err

import hessop
from hessop.dense import kronecker as _kronecker
from hessop.dense.columns import dense_from_operator
from hessop.dense.kronecker import find_dense_kernel

F64 = "float64"
# The cases whose largest eligible Dense kernel has this many entries; the
# Poisson case is a plain variable, no Keras layer.
KERNEL_SIZES = {"logistic": 4, "mlp": 20, "conv": 16, "multi_input": 24, "poisson": None}


def operator(case, **kwargs):
    return hessop.HessianOperator(case.model, case.loss_fn, (case.x, case.y), params=case.params, **kwargs)


def columns_by_products(H) -> list[tuple[int, int]]:
    """Record the column ranges `to_dense` builds from products."""
    built: list[tuple[int, int]] = []
    lower_block_rows = H._lower_block_rows

    def recorded(first, stop, **kwargs):
        built.append((first, stop))
        return lower_block_rows(first, stop, **kwargs)

    H._lower_block_rows = recorded
    return built


def sparse_ce():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None, dtype=F64)


def test_closed_form_block_matches_autodiff_and_replaces_its_columns(case):
    H = operator(case, batch_size=16)
    built = columns_by_products(H)
    dense = H.to_dense(block_size=5)
    assert rel_err(dense, dense_hessian(case)) < 1e-10
    kernel_size = KERNEL_SIZES[case.name]
    assert sum(stop - first for first, stop in built) == H.shape[0] - (kernel_size or 0)
    assert (H._dense_kernel is None) == (kernel_size is None)
    if kernel_size is not None:
        assert H._dense_kernel.size == kernel_size


def test_block_summed_in_pieces_and_chunks(mlp, monkeypatch):
    # Pieces of 5 examples for the per-example curvatures (d_out = 4) and
    # GEMMs of 3 examples: both bounds cut batches of 24 (and the last of 16).
    monkeypatch.setattr(_kronecker, "_TANGENTS_AT_ONCE", 20)
    monkeypatch.setattr(_kronecker, "_CHUNK_BYTES", 3 * (5 * 5 + 4 * 4) * 8)
    sums = []
    kronecker_sum = _kronecker._kronecker_sum
    monkeypatch.setattr(_kronecker, "_kronecker_sum", lambda x, m: sums.append(int(x.shape[0])) or kronecker_sum(x, m))
    H = operator(mlp, batch_size=24)
    assert rel_err(H.to_dense(), dense_hessian(mlp)) < 1e-10
    assert max(sums) == 3 and sum(sums) == mlp.num_data


@pytest.mark.parametrize("method", ["auto", "hvp"])
def test_methods_agree_over_uneven_batches_and_sum_reduction(mlp, method):
    H = operator(mlp, batch_size=24, reduction="sum")  # batches of 24, 24 and 16
    expected = dense_hessian(mlp) * mlp.num_data
    assert rel_err(H.to_dense(method=method), expected) < 1e-10


def test_kernel_in_the_middle_by_parts_of_single_variables(parts_per_variable):
    # The largest kernel is the second layer's: the parts before it return its
    # rows as theirs, the parts after it return its rows besides their own.
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(30, 3)), rng.integers(0, 2, size=30)
    keras.utils.set_random_seed(7)
    model = keras.Sequential(
        [
            keras.Input((3,), dtype=F64),
            keras.layers.Dense(4, activation="tanh", dtype=F64),
            keras.layers.Dense(12, activation="softplus", dtype=F64),
            keras.layers.Dense(2, dtype=F64),
        ]
    )
    case = Case("middle", model, sparse_ce(), x, y)
    H = operator(case, batch_size=8)
    dense = H.to_dense(block_size=4)
    assert H._dense_kernel.kernel == 2
    assert rel_err(dense, dense_hessian(case)) < 1e-10


def test_a_scalar_batch_mean_loss_gives_the_same_block(mlp):
    mean_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype=F64)
    H = hessop.HessianOperator(mlp.model, mean_loss, (mlp.x, mlp.y), batch_size=16)
    assert rel_err(H.to_dense(), dense_hessian(mlp)) < 1e-10
    assert H._dense_kernel is not None


def test_dict_inputs_and_a_tf_data_pipeline():
    rng = np.random.default_rng(8)
    a, b, y = rng.normal(size=(50, 4)), rng.normal(size=(50, 2)), rng.integers(0, 3, size=50)
    keras.utils.set_random_seed(8)
    in_a, in_b = keras.Input((4,), name="a", dtype=F64), keras.Input((2,), name="b", dtype=F64)
    hidden = keras.layers.Dense(5, activation="tanh", dtype=F64)(keras.layers.Concatenate(dtype=F64)([in_a, in_b]))
    model = keras.Model({"a": in_a, "b": in_b}, keras.layers.Dense(3, dtype=F64)(hidden))
    case = Case("dict", model, sparse_ce(), {"a": a, "b": b}, y)
    data = tf.data.Dataset.from_tensor_slices(({"a": a, "b": b}, y)).batch(20)
    H = hessop.HessianOperator(model, sparse_ce(), data)
    assert rel_err(H.to_dense(), dense_hessian(case)) < 1e-10
    assert H._dense_kernel.size == 30


def test_a_layer_called_twice_is_not_used():
    shared = keras.layers.Dense(5, activation="tanh", dtype=F64)
    inputs = keras.Input((5,), dtype=F64)
    model = keras.Model(inputs, keras.layers.Dense(2, dtype=F64)(shared(shared(inputs))))
    rng = np.random.default_rng(9)
    case = Case("shared", model, sparse_ce(), rng.normal(size=(30, 5)), rng.integers(0, 2, size=30))
    H = operator(case)
    assert find_dense_kernel(H._engine).size == 10  # the last layer's, not the shared one's 25
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert rel_err(H.to_dense(), dense_hessian(case)) < 1e-10


class TiedDecoder(keras.layers.Layer):
    """Reuses a Dense layer's kernel (transposed), as tied autoencoders do: invisible to find_dense_kernel."""

    def __init__(self, dense, **kwargs):
        super().__init__(**kwargs)
        self.dense = dense

    def call(self, hidden):
        return hidden @ tf.transpose(self.dense.kernel)


def test_a_kernel_reused_elsewhere_fails_the_check_and_falls_back_to_products():
    encoder = keras.layers.Dense(8, activation="tanh", dtype=F64)
    inputs = keras.Input((5,), dtype=F64)
    hidden = encoder(inputs)
    decoded = TiedDecoder(encoder, dtype=F64)(hidden)
    outputs = keras.layers.Dense(2, dtype=F64)(keras.layers.Concatenate(dtype=F64)([decoded, hidden]))
    rng = np.random.default_rng(10)
    case = Case("tied", keras.Model(inputs, outputs), sparse_ce(), rng.normal(size=(30, 5)), rng.integers(0, 2, size=30))
    H = operator(case)
    assert find_dense_kernel(H._engine).size == 40  # the encoder's
    with pytest.warns(
        RuntimeWarning, match=r"Dense layer .*closed form of its kernel's block differs from the HessianOperator's own products"
    ):
        dense = H.to_dense()
    assert rel_err(dense, dense_hessian(case)) < 1e-10
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the next call builds from HVPs without trying again
        assert np.array_equal(H.to_dense(), dense)


def test_kernel_or_bias_left_out_of_params_is_not_used(mlp):
    first, second = mlp.model.layers
    H = hessop.HessianOperator(mlp.model, mlp.loss_fn, (mlp.x, mlp.y), params=[first.kernel, second.kernel, second.bias])
    assert find_dense_kernel(H._engine).size == 12  # the second layer's: the first has no bias among the params
    H = hessop.HessianOperator(mlp.model, mlp.loss_fn, (mlp.x, mlp.y), params=[first.kernel, second.kernel])
    assert find_dense_kernel(H._engine) is None
    case = Case("kernels", mlp.model, mlp.loss_fn, mlp.x, mlp.y, params=[first.kernel, second.kernel])
    assert rel_err(H.to_dense(), dense_hessian(case)) < 1e-10


def test_a_layer_with_a_regularizer_in_the_loss_is_not_used():
    # The docs' recipe adds model.losses to every example's loss: the penalty
    # then reaches the kernel directly, not through z = xW + b alone.
    rng = np.random.default_rng(12)
    x, y = rng.normal(size=(40, 3)), rng.integers(0, 2, size=40)
    keras.utils.set_random_seed(12)
    model = keras.Sequential(
        [
            keras.Input((3,), dtype=F64),
            keras.layers.Dense(6, activation="tanh", kernel_regularizer=keras.regularizers.L2(0.1), dtype=F64),
            keras.layers.Dense(2, dtype=F64),
        ]
    )
    loss = sparse_ce()
    penalised = Case("penalised", model, lambda t, f: loss(t, f) + tf.add_n(model.losses), x, y)
    H = operator(penalised)
    assert find_dense_kernel(H._engine).size == 12  # the second layer's, not the regularised 18
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert rel_err(H.to_dense(), dense_hessian(penalised)) < 1e-10


def test_a_plain_callable_model_has_no_dense_kernel(logistic):
    kernel, bias = logistic.variables
    H = hessop.HessianOperator(lambda x: x @ kernel + bias, logistic.loss_fn, (logistic.x, logistic.y), params=[kernel, bias])
    assert find_dense_kernel(H._engine) is None
    assert rel_err(H.to_dense(), dense_hessian(logistic)) < 1e-10


def test_method_is_validated(mlp):
    with pytest.raises(ValueError, match=r"method: expected one of \('auto', 'hvp'\), got 'kronecker'"):
        operator(mlp).to_dense(method="kronecker")


def test_float32_block_agrees_with_products():
    rng = np.random.default_rng(11)
    x, y = rng.normal(size=(200, 16)).astype("float32"), rng.integers(0, 4, size=200)
    keras.utils.set_random_seed(11)
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(4)])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    H = hessop.HessianOperator(model, loss, (x, y), batch_size=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the check passes in float32 too
        dense = H.to_dense()
    assert H._dense_kernel.size == 256
    assert rel_err(dense, H.to_dense(method="hvp")) < 1e-5


def test_ggn_closed_form_block_matches_autodiff_and_its_products(case):
    GGN = hessop.GGNOperator(case.model, case.loss_fn, (case.x, case.y), params=case.params, batch_size=16)
    built = columns_by_products(GGN)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        dense = GGN.to_dense(block_size=5)
    assert rel_err(dense, dense_ggn(case)) < 1e-10
    kernel_size = KERNEL_SIZES[case.name] or 0
    assert sum(stop - first for first, stop in built) == GGN.shape[0] - kernel_size
    products = dense_from_operator(GGN, max_params=10_000, block_size=5, closed_form=False)
    assert rel_err(products, dense) < 1e-10


def test_ggn_of_a_two_headed_model():
    # The heads' outputs are one output in tf.nest.flatten order, and the loss's Hessian couples them.
    rng = np.random.default_rng(13)
    x, y = rng.normal(size=(30, 4)), rng.normal(size=(30, 3))
    keras.utils.set_random_seed(13)
    inputs = keras.Input((4,), dtype=F64)
    hidden = keras.layers.Dense(5, activation="tanh", dtype=F64)(inputs)
    model = keras.Model(inputs, {"a": keras.layers.Dense(1, dtype=F64)(hidden), "b": keras.layers.Dense(2, dtype=F64)(hidden)})

    def loss(targets, outputs):
        both = tf.concat([outputs["a"], outputs["b"]], axis=1)
        return tf.reduce_sum((both - targets) ** 2, axis=1) + tf.reduce_prod(both, axis=1) ** 2

    GGN = hessop.GGNOperator(model, loss, (x, y), batch_size=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        dense = GGN.to_dense()
    assert GGN._dense_kernel.size == 20
    products = dense_from_operator(GGN, max_params=10_000, block_size=7, closed_form=False)
    assert rel_err(dense, products) < 1e-10
