"""flatten / unflatten: the flat parameter order."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

import hessop
from hessop.autodiff.params import resolve_params

shapes = st.lists(st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple), min_size=1, max_size=4)


@settings(max_examples=40, deadline=None)
@given(shapes)
def test_unflatten_inverts_flatten(shape_list):
    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=s) for s in shape_list]
    flat = hessop.flatten(arrays)
    assert flat.shape == (sum(a.size for a in arrays),)
    for original, restored in zip(arrays, hessop.unflatten(flat, like=arrays)):
        assert restored.shape == original.shape
        assert np.array_equal(restored, original)


def test_flatten_is_row_major_in_list_order():
    a = tf.Variable([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    b = tf.Variable([7.0, 8.0])
    assert np.array_equal(hessop.flatten([a, b]), np.arange(1.0, 9.0))


def test_unflatten_wrong_length():
    with pytest.raises(ValueError, match=r"expected shape \(3,\)"):
        hessop.unflatten(np.ones(4), like=[np.zeros(3)])
    with pytest.raises(TypeError, match="list of tensors"):
        hessop.flatten(np.ones(3))


def test_resolve_params_errors():
    with pytest.raises(TypeError, match="single variable"):
        resolve_params(None, tf.Variable([1.0]))
    with pytest.raises(TypeError, match=r"params\[0\]"):
        resolve_params(None, [np.ones(3)])
    with pytest.raises(TypeError, match="floating"):
        resolve_params(None, [tf.Variable([1, 2])])
    with pytest.raises(TypeError, match="one dtype"):
        resolve_params(None, [tf.Variable([1.0]), tf.Variable([1.0], dtype=tf.float64)])
    v = tf.Variable([1.0])
    with pytest.raises(ValueError, match="more than once"):
        resolve_params(None, [v, v])
    with pytest.raises(TypeError, match="trainable_variables"):
        resolve_params(lambda x: x, None)


def test_public_names_do_not_collide_with_submodules():
    # hessop's namespace is lazy: a submodule named like a public function
    # (hessop.eigen) would replace the function once anything imports it.
    import pkgutil

    submodules = {m.name for m in pkgutil.iter_modules(hessop.__path__)}
    assert not submodules & set(hessop.__all__)
    for name in hessop.__all__:
        assert not isinstance(getattr(hessop, name), type(hessop)), name
