"""The shared validation helpers every stage and optimizer uses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_snr.common import validation


@pytest.mark.parametrize("value", [0.0, 0.5, np.float32(0.9), jnp.asarray(0.99), np.asarray(0.0)])
def test_valid_decays_pass(value):
    validation.check_hyperparameter("b1", value, low=0.0, high=1.0)


@pytest.mark.parametrize("value", [1.0, -1e-9, float("nan"), jnp.asarray(1.5), np.float64(-2)])
def test_invalid_decays_name_the_argument_and_range(value):
    with pytest.raises(ValueError, match=r"^b1 must be in \[0, 1\), got"):
        validation.check_hyperparameter("b1", value, low=0.0, high=1.0)


def test_inclusive_upper_bound():
    validation.check_hyperparameter("x", 1.0, low=0.0, high=1.0, high_inclusive=True)
    with pytest.raises(ValueError, match=r"x must be in \[0, 1\]"):
        validation.check_hyperparameter("x", 1.01, low=0.0, high=1.0, high_inclusive=True)


@pytest.mark.parametrize("value", ["0.9", None, True, [0.9], jnp.ones(2), jnp.asarray(1 + 1j)])
def test_non_scalars_are_type_errors(value):
    with pytest.raises(TypeError, match="b1 must be a"):
        validation.check_hyperparameter("b1", value, low=0.0, high=1.0)


def test_tracers_pass_unchecked():
    @jax.jit
    def f(b1):
        validation.check_hyperparameter("b1", b1, low=0.0, high=1.0)
        return b1

    assert float(f(jnp.float32(5.0))) == 5.0  # out of range, but not inspectable when traced


def test_learning_rate_schedule_passes_and_infinity_fails():
    validation.check_learning_rate(lambda count: -1.0)
    with pytest.raises(ValueError, match=r"learning_rate must be in \[0, inf\), got inf"):
        validation.check_learning_rate(float("inf"))


def test_dtype_check():
    assert validation.check_dtype("mu_dtype", None) is None
    assert validation.check_dtype("mu_dtype", "bfloat16") == jnp.bfloat16
    with pytest.raises(TypeError, match="nu_dtype must be a floating or complex dtype"):
        validation.check_dtype("nu_dtype", jnp.int8)
    with pytest.raises(TypeError, match="nu_dtype must be a floating dtype"):
        validation.check_dtype("nu_dtype", "not-a-dtype")


def test_float_leaves_names_the_path():
    tree = {"a": [jnp.ones(2), jnp.zeros(2, jnp.uint8)]}
    with pytest.raises(TypeError, match=r"stage: params leaf \['a'\]\[1\] has dtype uint8"):
        validation.check_float_leaves(tree, "params", "stage")
    validation.check_float_leaves({"z": jnp.ones(2, jnp.complex64), "n": None}, "params", "s")


def test_matching_trees():
    ref = {"a": jnp.ones(2), "b": {"c": jnp.ones((2, 3))}}
    validation.check_matching_trees({"a": None, "b": {"c": jnp.ones((2, 3))}}, ref, "s")
    with pytest.raises(ValueError, match=r"Only in updates: \['x'\]; only in the state: \['a'\]"):
        validation.check_matching_trees({"x": jnp.ones(2), "b": {"c": jnp.ones((2, 3))}}, ref, "s")
    with pytest.raises(ValueError, match=r"\['b'\]\['c'\] has shape \(3, 2\) but .* \(2, 3\)"):
        validation.check_matching_trees({"a": jnp.ones(2), "b": {"c": jnp.ones((3, 2))}}, ref, "s")
    with pytest.raises(ValueError, match=r"\['n'\] is an array of shape \(2,\), but .* None"):
        validation.check_matching_trees({**ref, "n": jnp.ones(2)}, {**ref, "n": None}, "s")
    validation.check_matching_trees({**ref, "n": None}, {**ref, "n": None}, "s")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, True),
        (False, False),
        (np.True_, True),
        (jnp.array(True), True),
        (np.array(False), False),
    ],
)
def test_check_bool_returns_a_python_bool(value, expected):
    got = validation.check_bool("flag", value)
    assert type(got) is bool and got is expected


@pytest.mark.parametrize(
    "value", [1, 0.0, np.int8(1), jnp.ones(2, bool), jnp.array(1), None, "True"]
)
def test_check_bool_refuses_what_is_not_a_bool(value):
    with pytest.raises(TypeError, match="flag must be a bool"):
        validation.check_bool("flag", value)


def test_float_leaves_names_python_and_string_leaves():
    validation.check_float_leaves({"w": 1.0, "n": None}, "updates", "s")
    for bad in (1, "1.0", object()):
        with pytest.raises(TypeError, match=r"s: updates leaf \['w'\] has dtype"):
            validation.check_float_leaves({"w": bad}, "updates", "s")


def test_array_leaves():
    tree = validation.array_leaves({"f": 1.0, "n": np.float32(2.0), "a": jnp.ones(2), "none": None})
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(tree))
    assert tree["none"] is None and tree["f"].dtype == jnp.float32
