"""tf.distribute: MirroredStrategy over two logical CPUs, MultiWorkerMirroredStrategy over two processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import scipy.sparse.linalg as sla
import tensorflow as tf
from conftest import compiled_with_xla, rel_err

import hessop

OPERATORS = [hessop.HessianOperator, hessop.OPGOperator, hessop.GGNOperator]


def build_mlp():
    keras.utils.set_random_seed(2)
    return keras.Sequential(
        [
            keras.Input((5,), dtype="float64"),
            keras.layers.Dense(4, activation="tanh", dtype="float64"),
            keras.layers.Dense(3, dtype="float64"),
        ]
    )


LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None, dtype="float64")


@pytest.fixture(scope="module")
def mirrored():
    if len(tf.config.list_logical_devices("CPU")) < 2:
        pytest.skip("two logical CPU devices could not be configured")
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    # 49 examples in batches of 16: the last batch has 1 example, so one replica gets none.
    return rng.normal(size=(49, 5)), rng.integers(0, 3, size=49)


@pytest.mark.parametrize("operator", OPERATORS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("batch_size", [16, 13])
def test_mirrored_equals_single_device(mirrored, data, operator, batch_size):
    x, y = data
    single = operator(build_mlp(), LOSS, (x, y), batch_size=batch_size)
    with mirrored.scope():
        model = build_mlp()
    distributed = operator(model, LOSS, (x, y), batch_size=batch_size, strategy=mirrored)
    assert "MirroredStrategy(2 replicas)" in repr(distributed)
    rng = np.random.default_rng(3)
    v, V = rng.normal(size=single.shape[0]), rng.normal(size=(single.shape[0], 4))
    assert rel_err(distributed @ v, single @ v) < 1e-12
    assert rel_err(distributed @ V, single @ V) < 1e-12
    top_single = np.sort(sla.eigsh(single, k=3, which="LA", tol=1e-10, v0=np.ones(single.shape[0]))[0])
    top_distributed = np.sort(sla.eigsh(distributed, k=3, which="LA", tol=1e-10, v0=np.ones(single.shape[0]))[0])
    assert np.allclose(top_distributed, top_single, rtol=1e-8)


def test_mirrored_to_dense_by_parts_equals_single_device(mirrored, data, parts_per_variable):
    # The restricted products of to_dense return fewer rows than they take
    # columns: the zeros of a replica without examples must have their shape.
    # (G and the GGN take the same path through the replicas.)
    x, y = data
    single = hessop.HessianOperator(build_mlp(), LOSS, (x, y), batch_size=16)
    with mirrored.scope():
        model = build_mlp()
    distributed = hessop.HessianOperator(model, LOSS, (x, y), batch_size=16, strategy=mirrored)
    assert len(distributed._dense_parts) == 4
    assert rel_err(distributed.to_dense(block_size=5), single.matmat(np.eye(single.shape[0]))) < 1e-12


def test_mirrored_with_xla_equals_single_device(mirrored, data):
    # The replica functions call the XLA-compiled per-batch products inline;
    # with batches of 16 the last one (1 example) leaves one replica empty.
    x, y = data
    single = hessop.HessianOperator(build_mlp(), LOSS, (x, y), batch_size=16)
    with mirrored.scope():
        model = build_mlp()
    distributed = hessop.HessianOperator(model, LOSS, (x, y), batch_size=16, strategy=mirrored, jit_compile=True)
    rng = np.random.default_rng(4)
    v, V = rng.normal(size=single.shape[0]), rng.normal(size=(single.shape[0], 3))
    assert rel_err(distributed @ v, single @ v) < 1e-12
    assert rel_err(distributed @ V, single @ V) < 1e-12
    assert compiled_with_xla(distributed)


def test_mirrored_jacobian_and_its_adjoint(mirrored, data):
    x, y = data
    single = hessop.JacobianOperator(build_mlp(), LOSS, (x, y), batch_size=16)
    with mirrored.scope():
        model = build_mlp()
    distributed = hessop.JacobianOperator(model, LOSS, (x, y), batch_size=16, strategy=mirrored)
    rng = np.random.default_rng(4)
    v, u = rng.normal(size=single.shape[1]), rng.normal(size=single.shape[0])
    assert rel_err(distributed @ v, single @ v) < 1e-12
    assert rel_err(distributed.rmatvec(u), single.rmatvec(u)) < 1e-12


def test_strategy_in_scope_is_picked_up(mirrored, data):
    x, y = data
    with mirrored.scope():
        model = build_mlp()
    H = hessop.HessianOperator(model, LOSS, (x, y))  # no strategy= : taken from the variables
    assert H.strategy is mirrored
    with mirrored.scope():
        assert hessop.HessianOperator(model, LOSS, (x, y)).strategy is mirrored
    v = np.ones(H.shape[0])
    assert rel_err(H @ v, hessop.HessianOperator(build_mlp(), LOSS, (x, y)) @ v) < 1e-12


def test_bad_strategy_and_mixed_precision(data):
    x, y = data
    with pytest.raises(TypeError, match="strategy"):
        hessop.HessianOperator(build_mlp(), LOSS, (x, y), strategy="mirrored")
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3, dtype="mixed_float16")])
    with pytest.raises(ValueError, match="mixed-precision"):
        hessop.HessianOperator(model, LOSS, (x, y))


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def test_multi_worker_mirrored_equals_single_process(tmp_path):
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    worker = Path(__file__).with_name("_multiworker_worker.py")
    processes = []
    try:
        for index in range(2):
            env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}))
            env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
            processes.append(
                subprocess.Popen(
                    [sys.executable, str(worker), str(tmp_path / f"worker{index}.npz")],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        for process in processes:
            _, stderr = process.communicate(timeout=180)
            assert process.returncode == 0, stderr[-3000:]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    for index in range(2):
        result = np.load(tmp_path / f"worker{index}.npz")
        assert int(result["replicas"]) == 2
        assert rel_err(result["distributed"], result["reference"]) < 1e-12
