"""HessianOperator against closed forms and autodiff dense Hessians (float64)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import scipy.sparse.linalg as sla
import tensorflow as tf
from conftest import CASES, compiled_with_xla, dense_hessian, logistic_case, mlp_case, rel_err

import hessop
from hessop.autodiff import engine as _engine
from hessop.dense.columns import TRIAL_BLOCK_SIZES


def operator(case, **kwargs):
    return hessop.HessianOperator(case.model, case.loss_fn, (case.x, case.y), params=case.params, **kwargs)


def logistic_closed_form(case) -> np.ndarray:
    """X^T diag(p(1-p)) X / N with the bias column (weights first, then bias)."""
    kernel, bias = (v.numpy() for v in case.variables)
    design = np.column_stack([case.x, np.ones(len(case.x))])
    p = 1.0 / (1.0 + np.exp(-(case.x @ kernel[:, 0] + bias[0])))
    return design.T @ (design * (p * (1 - p))[:, None]) / len(case.x)


# -- closed forms -----------------------------------------------------------------
def test_logistic_matches_closed_form(logistic):
    H = operator(logistic, batch_size=128)
    expected = logistic_closed_form(logistic)
    assert H.shape == (5, 5) and H.num_data == 1003 and H.dtype == np.float64
    assert rel_err(H @ np.eye(5), expected) < 1e-10


def test_example_weights_carried_in_y_give_the_weighted_closed_form(logistic):
    # The recipe the error for (x, y, sample_weight) batches gives:
    # H = X^T diag(w p(1-p)) X / N.
    weights = np.random.default_rng(3).uniform(0.0, 2.0, size=logistic.num_data)

    def weighted_loss(y_and_weights, prediction):
        y, w = y_and_weights
        return w * logistic.loss_fn(y, prediction)

    H = hessop.HessianOperator(logistic.model, weighted_loss, (logistic.x, (logistic.y, weights)), batch_size=128)
    kernel, bias = (v.numpy() for v in logistic.variables)
    design = np.column_stack([logistic.x, np.ones(logistic.num_data)])
    p = 1.0 / (1.0 + np.exp(-(logistic.x @ kernel[:, 0] + bias[0])))
    expected = design.T @ (design * (weights * p * (1 - p))[:, None]) / logistic.num_data
    assert rel_err(H @ np.eye(5), expected) < 1e-10
    # Keras's (x, y, sample_weight) batches give the same operator.
    triples = tf.data.Dataset.from_tensor_slices((logistic.x, logistic.y, weights)).batch(128)
    assert rel_err(hessop.HessianOperator(logistic.model, logistic.loss_fn, triples) @ np.eye(5), expected) < 1e-10
    quadruples = tf.data.Dataset.from_tensor_slices((logistic.x, logistic.y, weights, weights)).batch(128)
    with pytest.raises(
        TypeError,
        match=r"^data \(batch 0\): each batch must be a pair \(x, y\) or a triple \(x, y, sample_weight\), got a tuple of 4",
    ):
        hessop.HessianOperator(logistic.model, logistic.loss_fn, quadruples)
    records = tf.data.Dataset.from_tensor_slices({"label": logistic.y, "x": logistic.x}).batch(128)
    with pytest.raises(TypeError, match=r"got a dict with keys \['label', 'x'\]; map it to pairs"):
        hessop.HessianOperator(logistic.model, logistic.loss_fn, records)


def test_regularisation_penalties_only_through_loss_fn():
    # model.losses (kernel_regularizer) are not part of loss_fn; the recipe in
    # the docs adds them to every example's loss: H gains 2λ on the kernel.
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 3)), rng.normal(size=(50, 1))
    penalty = 0.1
    dense = keras.layers.Dense(1, dtype="float64", kernel_regularizer=keras.regularizers.L2(penalty))
    model = keras.Sequential([keras.Input((3,), dtype="float64"), dense])
    loss = keras.losses.MeanSquaredError(reduction=None, dtype="float64")
    design = np.column_stack([x, np.ones(len(x))])
    data_term = 2 * design.T @ design / len(x)  # of the mean squared error
    plain = hessop.HessianOperator(model, loss, (x, y), batch_size=16)
    assert rel_err(plain.to_dense(), data_term) < 1e-12
    regularised = hessop.HessianOperator(model, lambda t, f: loss(t, f) + tf.add_n(model.losses), (x, y), batch_size=16)
    # 1e-8: Keras keeps L2's factor as a float32 (0.1 + 1.5e-9).
    assert rel_err(regularised.to_dense(), data_term + np.diag([2 * penalty] * 3 + [0.0])) < 1e-8


def test_logistic_from_dataset_and_sum_reduction(logistic):
    expected = logistic_closed_form(logistic)
    dataset = tf.data.Dataset.from_tensor_slices((logistic.x, logistic.y)).batch(128)
    H = hessop.HessianOperator(logistic.model, logistic.loss_fn, dataset)
    assert H.num_data == 1003
    assert rel_err(H @ np.eye(5), expected) < 1e-10
    H_sum = operator(logistic, batch_size=128, reduction="sum")
    assert rel_err(H_sum @ np.eye(5), 1003 * expected) < 1e-10


def test_poisson_plain_variable_model():
    from conftest import poisson_case

    case = poisson_case()
    beta = case.params[0].numpy()
    H = operator(case, batch_size=64)
    expected = case.x.T @ (case.x * np.exp(case.x @ beta)[:, None]) / case.num_data
    assert rel_err(H.to_dense(), expected) < 1e-10


def test_scalar_mean_loss_equals_per_example_loss(logistic):
    mean_loss = keras.losses.BinaryCrossentropy(from_logits=True, dtype="float64")  # batch mean
    H_mean = hessop.HessianOperator(logistic.model, mean_loss, (logistic.x, logistic.y), batch_size=100)
    assert rel_err(H_mean.to_dense(), logistic_closed_form(logistic)) < 1e-10


# -- dense autodiff references ------------------------------------------------------
def test_to_dense_matches_autodiff_reference(case):
    H = operator(case, batch_size=16)
    expected = dense_hessian(case)
    dense = H.to_dense(block_size=7)  # several blocks, uneven last block
    assert dense.shape == (H.num_params, H.num_params)
    assert rel_err(dense, expected) < 1e-10


def test_default_to_dense_times_block_widths_and_matches_autodiff():
    # P = 805 in two parts: the first layer's kernel and bias (550 columns),
    # then the second's (255). Trials of three blocks each of 16, 32 and 64
    # columns take 336; 128 runs on to the end of the first part (128, then
    # 86) and into the second.
    from conftest import Case

    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(40, 10)), rng.integers(0, 5, size=40)
    keras.utils.set_random_seed(5)
    model = keras.Sequential(
        [
            keras.Input((10,), dtype="float64"),
            keras.layers.Dense(50, activation="tanh", dtype="float64"),
            keras.layers.Dense(5, dtype="float64"),
        ]
    )
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None, dtype="float64")
    case = Case("wide_mlp", model, loss, x, y)
    H = operator(case, batch_size=16)
    assert H._dense_parts == ((0, 550), (550, 805))
    blocks = []
    lower_block_rows = H._lower_block_rows
    H._lower_block_rows = lambda first, stop: blocks.append((first, stop)) or lower_block_rows(first, stop)
    dense = H.to_dense(method="hvp")  # every column from products (test_kronecker.py: the kernel's block in closed form)
    widths = [stop - first for first, stop in blocks]
    # Growth stops early only if a width is 10 % slower than the best so far.
    tried = [w for w in TRIAL_BLOCK_SIZES[:3] if w in widths]
    assert widths[: 3 * len(tried)] == [w for w in tried for _ in range(3)]
    assert all(stop <= 550 or first >= 550 for first, stop in blocks)  # no block crosses a part
    assert [first for first, _ in blocks] == [0, *np.cumsum(widths)[:-1]]
    assert sum(widths) == 805
    assert rel_err(dense, dense_hessian(case)) < 1e-10
    assert np.array_equal(dense[:550, 550:], dense[550:, :550].T)  # the rows above a part mirror its columns


@pytest.mark.parametrize(
    ("case_name", "hvp_mode"),
    # Forward mode on two cases only: a part per variable is a graph per
    # variable to trace (20 s for the multi-input case's forward mode).
    [(name, "reverse") for name in sorted(CASES)] + [("mlp", "forward"), ("conv", "forward")],
)
def test_to_dense_by_parts_of_single_variables_matches_autodiff(case_name, hvp_mode, parts_per_variable):
    case = CASES[case_name]()
    H = operator(case, batch_size=16, hvp_mode=hvp_mode)
    assert len(H._dense_parts) == len(case.variables)
    expected = dense_hessian(case)
    assert rel_err(H.to_dense(block_size=3), expected) < 1e-10
    assert rel_err(hessop.diagonal(H, method="exact", block_size=3), np.diag(expected)) < 1e-10


def test_mlp_off_diagonal_blocks_are_present(mlp):
    H = operator(mlp)
    dense = H.to_dense()
    first = int(np.prod(mlp.variables[0].shape))  # first-layer kernel vs the rest
    off_block = dense[:first, first:]
    assert np.max(np.abs(off_block)) > 1e-3  # tf.hessians would leave these out
    assert rel_err(off_block, dense_hessian(mlp)[:first, first:]) < 1e-10


@pytest.mark.parametrize("batch_size", [1, 7, 16, 63, 64, 1000])
def test_minibatch_equals_full_batch(mlp, batch_size):
    rng = np.random.default_rng(0)
    block = rng.normal(size=(operator(mlp).shape[0], 3))
    full = operator(mlp) @ block
    assert rel_err(operator(mlp, batch_size=batch_size) @ block, full) < 1e-12


def test_list_of_batches_with_uneven_sizes(mlp):
    cuts = [0, 5, 30, 31, 64]
    batches = [(mlp.x[a:b], mlp.y[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    H = hessop.HessianOperator(mlp.model, mlp.loss_fn, batches)
    assert H.num_data == 64
    assert rel_err(H.to_dense(), dense_hessian(mlp)) < 1e-10


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_hvp_modes_agree(mlp, mode):
    H = operator(mlp, batch_size=20, hvp_mode=mode)
    v = np.random.default_rng(1).normal(size=H.shape[0])
    assert rel_err(H @ v, dense_hessian(mlp) @ v) < 1e-10
    assert rel_err(H @ np.column_stack([v, 2 * v]), dense_hessian(mlp) @ np.column_stack([v, 2 * v])) < 1e-10


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_xla_compiled_products_match_autodiff(mlp, mode):
    # jit_compile=True: the same products through XLA, with a short last batch
    # (64 = 3 × 20 + 4), so XLA compiles for two batch shapes.
    H = operator(mlp, batch_size=20, hvp_mode=mode, jit_compile=True)
    dense = dense_hessian(mlp)
    block = np.random.default_rng(4).normal(size=(H.shape[0], 3))
    assert rel_err(H @ block[:, 0], dense @ block[:, 0]) < 1e-10
    assert rel_err(H @ block, dense @ block) < 1e-10
    assert H._engine.traced_products() == {(f"hvp_{mode}", "single", None), (f"hvp_{mode}", "block", None)}
    assert compiled_with_xla(H)


def test_to_dense_of_a_tiny_operator_traces_no_block(logistic):
    # P = 5: single products trace faster than a vectorised block.
    H = hessop.HessianOperator(logistic.model, logistic.loss_fn, (logistic.x, logistic.y), hvp_mode="reverse")
    assert rel_err(H.to_dense(), dense_hessian(logistic)) < 1e-10
    assert rel_err(H.to_dense(method="hvp"), dense_hessian(logistic)) < 1e-10
    assert {kind for _, kind, _ in H._engine.traced_products()} == {"single"}


def test_jit_compile_must_be_a_bool(mlp):
    with pytest.raises(TypeError, match="jit_compile: expected True or False, got 'yes'"):
        operator(mlp, jit_compile="yes")


def test_each_product_is_traced_once_for_all_batch_sizes_and_block_widths(mlp):
    # batch_size 20 leaves a short last batch (64 = 3 × 20 + 4); blocks of 2 and 5.
    H = operator(mlp, batch_size=20, hvp_mode="reverse")
    rng = np.random.default_rng(2)
    dense = dense_hessian(mlp)
    for width in (1, 2, 5, 1, 2):
        block = rng.normal(size=(H.shape[0], width))
        assert rel_err(H @ block, dense @ block) < 1e-10
    compiled = H._engine._compiled
    assert H._engine.traced_products() == {("hvp_reverse", "single", None), ("hvp_reverse", "block", None)}
    assert [compiled[key].tracing_count for key in sorted(compiled)] == [1, 1]


def test_auto_mode_starts_reverse_and_searches_once_the_products_paid_for_it(mlp):
    # A short computation does not trace forward mode at all; once reverse
    # products of a kind have taken _MODE_SEARCH_AFTER × their trace time, the
    # next product of that kind (only) times both modes and keeps the faster.
    H = operator(mlp, batch_size=32)
    engine = H._engine
    dense = dense_hessian(mlp)
    vector, block = np.ones(H.shape[0]), np.ones((H.shape[0], 3))
    assert rel_err(H @ vector, dense @ vector) < 1e-10
    assert rel_err(H @ block, dense @ block) < 1e-10
    assert engine.traced_products() == {("hvp_reverse", "single", None), ("hvp_reverse", "block", None)}
    assert engine._chosen_mode == {} and engine.timings == {}
    assert 0 < engine._provisional_seconds["single"] < _engine._MODE_SEARCH_AFTER * engine._reverse_trace_seconds["single"]

    engine.record_hvp_seconds("single", _engine._MODE_SEARCH_AFTER * engine._reverse_trace_seconds["single"])
    assert rel_err(H @ vector, dense @ vector) < 1e-10
    assert engine._chosen_mode["single"] in ("forward", "reverse")
    assert set(engine.timings) == {"single"} and set(engine.timings["single"]) == {"forward", "reverse"}
    assert ("hvp_forward", "block", None) not in engine.traced_products()

    chosen = engine._chosen_mode["single"]
    engine.record_hvp_seconds("single", 1e9)  # no second search
    assert rel_err(H @ vector, dense @ vector) < 1e-10
    assert engine._chosen_mode["single"] == chosen


def test_fixed_mode_never_searches(mlp):
    H = operator(mlp, batch_size=32, hvp_mode="forward")
    H._engine.record_hvp_seconds("single", 1e9)
    H @ np.ones(H.shape[0])
    assert H._engine.traced_products() == {("hvp_forward", "single", None)}
    assert H._engine.timings == {}


@pytest.mark.parametrize(("seconds", "rounds"), [(0.0, 5), (1e9, 15)])
def test_auto_mode_times_alternating_rounds_within_bounds(mlp, monkeypatch, seconds, rounds):
    # With no time budget the search stops at its minimum of rounds, with an
    # unreachable one at its maximum; either way each round runs both modes,
    # and the mode that runs first alternates.
    monkeypatch.setattr(_engine, "_MODE_TIMING_SECONDS", seconds)
    monkeypatch.setattr(_engine, "_MODE_SEARCH_AFTER", 0.0)  # search on the first product
    H = operator(mlp, batch_size=32)
    engine = H._engine
    calls = []
    function = engine.function

    def recording(product, kind, part=None, **options):
        fn = function(product, kind, part, **options)
        return lambda *args: calls.append(product.__name__) or fn(*args)

    monkeypatch.setattr(engine, "function", recording)
    H @ np.ones(H.shape[0])
    # The reverse trace, then a run and a warm-up call of each mode.
    assert calls[:5] == ["hvp_reverse"] * 3 + ["hvp_forward"] * 2
    timed = calls[5 : 5 + 2 * rounds]
    assert len(calls) > 5 + 2 * rounds  # then the product itself, with the chosen mode
    assert set(calls[5 + 2 * rounds :]) == {"hvp_" + engine._chosen_mode["single"]}
    firsts = [timed[2 * r] for r in range(rounds)]
    assert all(firsts[r] != firsts[r + 1] for r in range(rounds - 1))
    assert all({timed[2 * r], timed[2 * r + 1]} == {"hvp_reverse", "hvp_forward"} for r in range(rounds))


# -- linear algebra through scipy -----------------------------------------------------
def test_eigsh_matches_eigh(mlp):
    H = operator(mlp, batch_size=20)
    top = np.sort(sla.eigsh(H, k=3, which="LA", tol=1e-12)[0])
    assert np.allclose(top, np.linalg.eigvalsh(dense_hessian(mlp))[-3:], rtol=1e-8, atol=1e-12)


def test_cg_on_damped_hessian_converges(mlp):
    H = operator(mlp)
    P = H.shape[0]
    # An untrained MLP's Hessian is indefinite; shift it to positive definite for CG.
    damping = 0.5 - min(np.linalg.eigvalsh(dense_hessian(mlp)).min(), 0.0)
    g = np.random.default_rng(2).normal(size=P)
    damped = H + damping * sla.aslinearoperator(np.eye(P))
    step, info = sla.cg(damped, g, rtol=1e-10, maxiter=500)
    assert info == 0
    assert rel_err(step, np.linalg.solve(dense_hessian(mlp) + damping * np.eye(P), g)) < 1e-6


def test_matmat_equals_columnwise_matvec_and_symmetry(mlp):
    H = operator(mlp, batch_size=25)
    rng = np.random.default_rng(3)
    block = rng.normal(size=(H.shape[0], 4))
    columns = np.column_stack([H @ block[:, j] for j in range(4)])
    assert rel_err(H @ block, columns) < 1e-12
    # A block in Fortran order reaches TensorFlow without the transpose.
    assert np.array_equal(H @ np.asfortranarray(block), H @ block)
    u, v = rng.normal(size=(2, H.shape[0]))
    assert abs(u @ (H @ v) - v @ (H @ u)) < 1e-12 * np.linalg.norm(u) * np.linalg.norm(v) * 10
    assert H.H is H and H.T is H
    assert rel_err(H.rmatvec(u), H.matvec(u)) < 1e-15


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # np.matrix, on purpose
def test_empty_blocks_and_np_matrix_as_scipy_operators_do(mlp):
    H = operator(mlp)
    P = H.shape[0]
    reference = sla.aslinearoperator(dense_hessian(mlp))
    for product in ("matmat", "rmatmat"):
        out = getattr(H, product)(np.ones((P, 0)))
        assert out.shape == getattr(reference, product)(np.ones((P, 0))).shape == (P, 0) and out.dtype == H.dtype
    assert H.tf_matmat(tf.zeros((P, 0), tf.float64)).shape == (P, 0)
    column = np.matrix(np.linspace(-1.0, 1.0, P)).T
    for product in ("matvec", "rmatvec"):
        out = getattr(H, product)(column)
        assert type(out) is type(getattr(reference, product)(column)) is np.matrix
        assert rel_err(np.asarray(out), reference @ np.asarray(column)) < 1e-10


def test_float32_model_end_to_end_with_eigsh():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(200, 6)).astype("float32")
    y = rng.integers(0, 3, size=200)
    keras.utils.set_random_seed(4)
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(5, activation="tanh", dtype="float32"), keras.layers.Dense(3, dtype="float32")]
    )
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    H = hessop.HessianOperator(model, loss, (x, y), batch_size=64)
    assert H.dtype == np.float32
    values = np.sort(sla.eigsh(H, k=2, which="LA")[0])
    H64 = hessop.HessianOperator(model, loss, (x, y), batch_size=64, dtype="float64")
    reference = np.linalg.eigvalsh(H64.to_dense())[-2:]
    assert np.allclose(values, reference, rtol=1e-3)


def test_tf_matvec_stays_a_tensor(mlp):
    H = operator(mlp)
    v = tf.ones(H.shape[0], dtype=tf.float64)
    out = H.tf_matvec(v)
    assert isinstance(out, tf.Tensor) and out.shape == (H.shape[0],)
    assert rel_err(out.numpy(), dense_hessian(mlp) @ np.ones(H.shape[0])) < 1e-10
    block = H.tf_matmat(tf.eye(H.shape[0], 3, dtype=tf.float64))
    assert block.shape == (H.shape[0], 3)


def test_construction_costs_no_product(mlp):
    calls = []
    H = operator(mlp)
    original = H._apply
    H._apply = lambda rows: calls.append(1) or original(rows)
    assert calls == []  # scipy did not probe with a matvec (dtype is explicit)
    H @ np.ones(H.shape[0])
    assert calls == [1]


def test_progress_bar_does_not_change_results(mlp, capsys):
    H = operator(mlp, batch_size=10, progress=True)
    v = np.ones(H.shape[0])
    assert rel_err(H @ v, dense_hessian(mlp) @ v) < 1e-10


# -- bad input ---------------------------------------------------------------------------
def test_wrong_vectors_are_refused(mlp):
    H = operator(mlp)
    with pytest.raises(ValueError, match="dimension mismatch"):
        H.matvec(np.ones(5))
    with pytest.raises(ValueError, match="dimension mismatch"):
        H.matmat(np.ones((5, 2)))
    with pytest.raises(TypeError, match="real"):
        H.matvec(np.ones(H.shape[0], dtype=complex))
    with pytest.raises(ValueError, match="non-finite"):
        H.matvec(np.full(H.shape[0], np.nan))


@pytest.mark.parametrize(
    "make",
    [
        lambda c, x, y: hessop.HessianOperator(c.model, c.loss_fn, (x, y), batch_size=16),
        lambda c, x, y: hessop.OPGOperator(c.model, c.loss_fn, (x, y), batch_size=16),
        lambda c, x, y: hessop.JacobianOperator(c.model, None, (x, None), batch_size=16, target="outputs"),
    ],
    ids=["hessian", "opg", "jacobian-outputs"],
)
def test_data_the_model_cannot_take_is_named_with_keras_message(mlp, make):
    # Keras's message came last, after autograph's "in user code:" stack.
    with pytest.raises(
        ValueError,
        match=r"^data \(batch 0\): the model or loss_fn failed on this batch \(x \(16, 4\), y (\(16,\)|None)\): "
        r"ValueError: .*\b5\b.*\(16, 4\)$",  # Keras's: "... expected axis -1 ... value 5, but received ... (16, 4)"
    ) as caught:
        make(mlp, mlp.x[:, :4], mlp.y)
    assert "in user code" not in str(caught.value) and "\n" not in str(caught.value)
    assert isinstance(caught.value.__cause__, ValueError)  # the original, with its stack


def test_a_label_out_of_range_is_named_with_its_batch(mlp):
    # A TF InvalidArgumentError from graph execution before.
    y = mlp.y.copy()
    y[40] = 7
    with pytest.raises(
        ValueError,
        match=r"^data \(batch 2\): .*\(x \(16, 5\), y \(16,\)\): InvalidArgumentError: Received a label value of 7 "
        r"which is outside the valid range of \[0, 3\)\.",
    ):
        hessop.HessianOperator(mlp.model, mlp.loss_fn, (mlp.x, y), batch_size=16)


def test_mismatched_lengths_and_empty_data(mlp):
    with pytest.raises(ValueError, match=f"different lengths: x has {mlp.num_data} examples, y has {mlp.num_data - 1}\\."):
        hessop.HessianOperator(mlp.model, mlp.loss_fn, (mlp.x, mlp.y[:-1]))
    with pytest.raises(ValueError, match="empty"):
        hessop.HessianOperator(mlp.model, mlp.loss_fn, (mlp.x[:0], mlp.y[:0]))
    with pytest.raises(ValueError, match="empty"):
        hessop.HessianOperator(mlp.model, mlp.loss_fn, [])


def test_loss_that_is_not_per_example_or_scalar(mlp):
    def bad_loss(y_true, y_pred):
        return y_pred  # shape [B, 3]

    # Raised while tracing, the message comes first (not after autograph's "in user code:" stack).
    with pytest.raises(ValueError, match=r"^loss_fn: expected per-example losses of shape \[B\]"):
        hessop.HessianOperator(mlp.model, bad_loss, (mlp.x, mlp.y))
    with pytest.raises(TypeError, match=r"^loss_fn: expected a floating-point loss, got dtype int32\.$"):
        hessop.HessianOperator(mlp.model, lambda y, f: tf.ones(tf.shape(f)[:1], tf.int32), (mlp.x, mlp.y))


def test_model_without_trainable_variables():
    frozen = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, trainable=False)])
    with pytest.raises(
        ValueError, match=r"^params: the model has no trainable variables \(P = 0\): all its variables are frozen"
    ):
        hessop.HessianOperator(frozen, keras.losses.MeanSquaredError(), (np.ones((4, 3)), np.ones((4, 1))))
    with pytest.raises(ValueError, match=r"^params: expected at least one variable, got none\.$"):
        hessop.HessianOperator(frozen, keras.losses.MeanSquaredError(), (np.ones((4, 3)), np.ones((4, 1))), params=[])
    unbuilt = keras.Sequential([keras.layers.Dense(1)])
    with pytest.raises(ValueError, match=r"^params: the model has no trainable variables \(P = 0\); build the model"):
        hessop.HessianOperator(unbuilt, keras.losses.MeanSquaredError(), (np.ones((4, 3)), np.ones((4, 1))))


def test_non_finite_loss_is_refused(mlp):
    # The data's own NaN is named (it was "the loss is not finite"), with its rows.
    x = mlp.x.copy()
    x[[19, 23], 0] = [np.nan, np.inf]
    with pytest.raises(
        ValueError,
        match=r"^data \(batch 1\): x has non-finite values \(NaN or inf\) in 2 of its 16 examples \(rows 3, 7 of the batch\)",
    ):
        hessop.HessianOperator(mlp.model, mlp.loss_fn, (x, mlp.y), batch_size=16)
    # Finite data: the model or loss makes the NaN.
    with pytest.raises(ValueError, match=r"^loss_fn: the loss is not finite \(nan\) on batch 0"):
        hessop.HessianOperator(mlp.model, lambda y, f: tf.math.log(-tf.ones_like(f[:, 0])), (mlp.x, mlp.y))


def test_non_finite_hvp_is_refused():
    # sqrt(w) at w = 0: finite loss, infinite curvature.
    w = tf.Variable([0.0, 1.0], dtype=tf.float64)
    x = np.ones((3, 2))

    def model(x):
        return tf.linalg.matvec(x, tf.sqrt(w))

    H = hessop.HessianOperator(model, lambda y, f: (f - y) ** 2, (x, np.zeros(3)), params=[w])
    with pytest.raises(ValueError, match="not finite"):
        H @ np.ones(2)
    with pytest.raises(ValueError, match="not finite"):
        H.to_dense()


def test_to_dense_over_the_limit(mlp):
    H = operator(mlp)
    with pytest.raises(ValueError, match="max_params=10"):
        H.to_dense(max_params=10)
    assert H.to_dense(max_params=H.shape[0]).shape == (H.shape[0],) * 2


def test_shuffled_dataset_is_detected(mlp):
    dataset = tf.data.Dataset.from_tensor_slices((mlp.x, mlp.y)).shuffle(64, seed=None).batch(16)
    with pytest.raises(ValueError, match="different"):
        hessop.HessianOperator(mlp.model, mlp.loss_fn, dataset)
    H = hessop.HessianOperator(mlp.model, mlp.loss_fn, dataset, check_deterministic=False)
    assert H.num_data == 64


def test_infinite_unbatched_and_scalar_data_are_refused(mlp):
    examples = tf.data.Dataset.from_tensor_slices((mlp.x, mlp.y))
    # repeat() would make every product a pass that never ends.
    with pytest.raises(ValueError, match=r"infinite \(Dataset.repeat\(\) without a count\?\)"):
        hessop.HessianOperator(mlp.model, mlp.loss_fn, examples.batch(16).repeat())
    assert hessop.HessianOperator(mlp.model, mlp.loss_fn, examples.batch(16).repeat(2)).num_data == 2 * mlp.num_data
    with pytest.raises(ValueError, match=r"yields single examples .*dataset.batch\(batch_size\)"):
        hessop.HessianOperator(mlp.model, mlp.loss_fn, examples)
    # One-hot targets leave no scalar in the spec: x (5,), y (3,).
    one_hot = tf.data.Dataset.from_tensor_slices((mlp.x, np.eye(3)[mlp.y]))
    with pytest.raises(ValueError, match=r"leading axes of different lengths \[5, 3\] .* yields single examples; batch it"):
        hessop.HessianOperator(mlp.model, mlp.loss_fn, one_hot)
    exact = one_hot.batch(16, drop_remainder=True)  # leading axes known and equal: batches
    categorical = keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None, dtype="float64")
    assert hessop.HessianOperator(mlp.model, categorical, exact).num_data == 64
    with pytest.raises(ValueError, match=r"data \(batch 0\): .*got a scalar in y\."):
        hessop.HessianOperator(mlp.model, mlp.loss_fn, [(mlp.x[:1], mlp.y[0])])
    # A list for x is one array per model input: nested Python lists are scalars there.
    with pytest.raises(ValueError, match=r"scalar in x\. \(A list for x holds one array per model input"):
        hessop.HessianOperator(mlp.model, mlp.loss_fn, (mlp.x.tolist(), mlp.y))


def test_a_tuple_of_arrays_other_than_x_y_is_named(mlp):
    # Was read as a tuple of batches: "each batch must be a pair (x, y), got ndarray".
    weights = np.ones(len(mlp.x))
    with pytest.raises(TypeError, match=r"^data: expected \(x, y\) or \(x, y, sample_weight\) arrays, got a tuple of 4 arrays\."):
        hessop.HessianOperator(mlp.model, mlp.loss_fn, (mlp.x, mlp.y, weights, weights))
    with pytest.raises(TypeError, match=r"got a tuple of 1 array\. .*pass \(x, None\)"):
        hessop.JacobianOperator(mlp.model, None, (mlp.x,), target="outputs")


def test_generator_and_wrong_types_are_refused(mlp):
    with pytest.raises(TypeError, match="one-shot"):
        hessop.HessianOperator(mlp.model, mlp.loss_fn, ((mlp.x, mlp.y) for _ in range(2)))
    with pytest.raises(TypeError, match="data: expected"):
        hessop.HessianOperator(mlp.model, mlp.loss_fn, 3.0)
    with pytest.raises(ValueError, match="reduction"):
        hessop.HessianOperator(mlp.model, mlp.loss_fn, (mlp.x, mlp.y), reduction="avg")
    with pytest.raises(ValueError, match="hvp_mode"):
        hessop.HessianOperator(mlp.model, mlp.loss_fn, (mlp.x, mlp.y), hvp_mode="sideways")
    with pytest.raises(ValueError, match="batch_size"):
        hessop.HessianOperator(mlp.model, mlp.loss_fn, (mlp.x, mlp.y), batch_size=0)
    with pytest.raises(TypeError, match="loss_fn"):
        hessop.HessianOperator(mlp.model, 3, (mlp.x, mlp.y))
    with pytest.raises(ValueError, match="loss_fn: 'squared' is not the name of a Keras loss"):
        hessop.HessianOperator(mlp.model, "squared", (mlp.x, mlp.y))
    with pytest.raises(ValueError, match="loss_fn"):
        hessop.HessianOperator(mlp.model, None, (mlp.x, mlp.y))
    with pytest.raises(TypeError, match="dtype"):
        hessop.HessianOperator(mlp.model, mlp.loss_fn, (mlp.x, mlp.y), dtype="int32")


def test_float32_loss_on_float64_model_warns():
    case = logistic_case(num_data=50)
    loss32 = keras.losses.BinaryCrossentropy(from_logits=True, reduction=None, dtype="float32")
    with pytest.warns(UserWarning, match="precision") as record:
        H = hessop.HessianOperator(case.model, loss32, (case.x, case.y))
        H @ np.ones(H.shape[1])
    # Once, and reported at the user's line rather than in hessop or autograph's generated code.
    assert len(record) == 1
    assert record[0].filename == __file__, record[0].filename


def test_mlp_case_is_not_at_a_stationary_point():
    # Guards the other tests: a non-trivial Hessian with both signs of curvature terms.
    assert np.linalg.norm(dense_hessian(mlp_case())) > 1e-2


def test_batches_whose_non_batch_axes_change_size():
    # Padded sequence batches: the time axis differs from batch to batch. The
    # first trace leaves only the batch axis unknown; a traced graph may rely
    # on its static shapes, so batches of other lengths must be traced again
    # (once, with the length relaxed), not fed to the first graph.
    keras.utils.set_random_seed(3)
    model = keras.Sequential(
        [
            keras.Input((None, 3), dtype="float64"),
            keras.layers.GlobalAveragePooling1D(dtype="float64"),
            keras.layers.Dense(2, activation="tanh", dtype="float64"),
            keras.layers.Dense(1, dtype="float64"),
        ]
    )
    rng = np.random.default_rng(3)
    batches = [(rng.normal(size=(4, length, 3)), rng.normal(size=(4, 1))) for length in (5, 7, 2)]
    loss_fn = keras.losses.MeanSquaredError(reduction=None, dtype="float64")
    variables = model.trainable_variables
    with tf.GradientTape(persistent=True) as outer:
        with tf.GradientTape() as inner:
            loss = tf.add_n([tf.reduce_sum(loss_fn(y, model(x))) for x, y in batches]) / 12.0
        grad = tf.concat([tf.reshape(g, [-1]) for g in inner.gradient(loss, variables)], 0)
    blocks = outer.jacobian(grad, variables)
    dense = np.concatenate([np.reshape(b.numpy(), (int(grad.shape[0]), -1)) for b in blocks], axis=1)
    H = hessop.HessianOperator(model, loss_fn, batches, hvp_mode="reverse")
    block = rng.normal(size=(H.shape[0], 3))
    assert rel_err(H @ block[:, 0], dense @ block[:, 0]) < 1e-10
    assert rel_err(H @ block, dense @ block) < 1e-10
    compiled = H._engine._compiled
    assert [compiled[key].tracing_count for key in sorted(compiled)] == [2, 2]  # lengths 5, then 7 and 2
