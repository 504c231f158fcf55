"""Hostile input: every optimizer and stage answers bad input with a clear error.

Each error must name what is wrong (the argument, or the path of the leaf) so a
user can fix it without reading the library. All optimizers validate through
the shared helpers of ``optax_snr/validation.py``, so the same list of checks is
run over every factory in :data:`OPTIMIZERS`.
"""

from __future__ import annotations

import inspect
import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest
from absl.testing import parameterized

import optax_snr

# Every ready-made optimizer; each takes ``learning_rate`` first, as in Optax.
OPTIMIZERS = [
    optax_snr.adam,
    optax_snr.adamw,
    optax_snr.amsgrad,
    optax_snr.nadam,
    optax_snr.nadamw,
    optax_snr.adabelief,
    optax_snr.adopt,
    optax_snr.ademamix,
]
# The stages and the learning-rate-free chain, checked for their hyperparameters.
STAGES = [
    optax_snr.ema_moments,
    optax_snr.bias_correction,
    optax_snr.scale_by_snr,
    optax_snr.scale_by_adam,
]

# Invalid values of each hyperparameter: (value, exception).
BAD_VALUES = {
    "learning_rate": [
        (math.nan, ValueError),
        (-1e-3, ValueError),
        (math.inf, ValueError),
        ("1e-3", TypeError),
        (None, TypeError),
        (jnp.ones(2), TypeError),
    ],
    "b1": [(-0.1, ValueError), (1.0, ValueError), (1.5, ValueError), (math.nan, ValueError)],
    "b2": [(-0.1, ValueError), (1.0, ValueError), (math.nan, ValueError)],
    "eps": [(-1e-8, ValueError), (math.nan, ValueError)],
    "eps_root": [(-1e-8, ValueError), (math.nan, ValueError)],
}
for _name in ("b1", "b2", "eps", "eps_root"):
    BAD_VALUES[_name] += [("0.9", TypeError), (None, TypeError), (True, TypeError)]


def _hyperparameter_cases():
    cases = []
    for factory in OPTIMIZERS + STAGES:
        accepted = inspect.signature(factory).parameters
        for name, bad in BAD_VALUES.items():
            if name not in accepted:
                continue
            for value, error in bad:
                label = f"{factory.__name__}-{name}={value!r}"
                cases.append(pytest.param(factory, name, value, error, id=label))
    return cases


@pytest.mark.parametrize("factory,name,value,error", _hyperparameter_cases())
def test_bad_hyperparameter_is_rejected_naming_it(factory, name, value, error):
    kwargs = {name: value}
    if factory in OPTIMIZERS and name != "learning_rate":
        kwargs["learning_rate"] = 1e-3
    with pytest.raises(error, match=rf"\b{name}\b"):
        factory(**kwargs)


@pytest.mark.parametrize("factory", OPTIMIZERS, ids=lambda f: f.__name__)
def test_every_optimizer_checks_the_core_hyperparameters(factory):
    # The list above must not silently lose a check: each optimizer takes at
    # least learning_rate, b1, b2 and eps.
    assert {"learning_rate", "b1", "b2", "eps"} <= set(inspect.signature(factory).parameters)


def test_valid_edge_values_are_accepted():
    for factory in OPTIMIZERS:
        factory(learning_rate=0.0, b1=0.0, b2=0.0, eps=0.0)
        factory(learning_rate=np.float32(1e-3), b1=jnp.asarray(0.5), b2=0.99)


def _params():
    return {
        "dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)},
        "out": [jnp.ones((2, 1)), jnp.ones(())],
    }


_NAMED = [(f.__name__, f) for f in OPTIMIZERS]


class TreeMismatchTest(chex.TestCase):
    """Gradients that do not fit the state built from params."""

    def _update(self, factory, grads, params=None):
        params = _params() if params is None else params
        tx = factory(learning_rate=1e-3)
        state = tx.init(params)
        return self.variant(tx.update)(grads, state, params)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*_NAMED)
    def test_misnamed_leaf_is_named(self, factory):
        grads = _params()
        grads["dense"]["bais"] = grads["dense"].pop("bias")
        with pytest.raises(ValueError, match=re.escape("['dense']['bais']")) as info:
            self._update(factory, grads)
        assert "['dense']['bias']" in str(info.value)
        assert "structure" in str(info.value)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*_NAMED)
    def test_extra_and_missing_leaves_are_named(self, factory):
        grads = _params()
        grads["extra"] = jnp.ones(2)
        with pytest.raises(ValueError, match=re.escape("['extra']")):
            self._update(factory, grads)
        grads = _params()
        del grads["out"]
        with pytest.raises(ValueError, match=re.escape("['out'][0]")):
            self._update(factory, grads)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*_NAMED)
    def test_wrong_shape_is_named_with_both_shapes(self, factory):
        grads = _params()
        grads["dense"]["kernel"] = jnp.ones((2, 3))
        with pytest.raises(ValueError, match=re.escape("['dense']['kernel']")) as info:
            self._update(factory, grads)
        assert "(2, 3)" in str(info.value) and "(3, 2)" in str(info.value)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*_NAMED)
    def test_integer_gradient_is_named(self, factory):
        grads = _params()
        grads["out"][1] = jnp.ones((), jnp.int32)
        with pytest.raises(TypeError, match=re.escape("['out'][1]")) as info:
            self._update(factory, grads)
        assert "int32" in str(info.value)

    @parameterized.named_parameters(*_NAMED)
    def test_integer_params_are_rejected_at_init(self, factory):
        params = _params()
        params["step"] = jnp.zeros((), jnp.int32)
        with pytest.raises(TypeError, match=re.escape("['step']")):
            factory(learning_rate=1e-3).init(params)

    @parameterized.named_parameters(*_NAMED)
    def test_boolean_params_are_rejected_at_init(self, factory):
        with pytest.raises(TypeError, match="bool"):
            factory(learning_rate=1e-3).init({"mask": jnp.ones(3, bool)})


def test_stage_chained_without_moments_says_how_to_chain():
    for stage in (optax_snr.bias_correction(), optax_snr.scale_by_snr()):
        with pytest.raises(TypeError, match="ema_moments"):
            stage.update(jnp.ones(2), stage.init(jnp.ones(2)))


def test_checks_are_static_and_cost_nothing_in_the_compiled_step():
    # A mismatch is found while tracing: the compiled step holds no check.
    tx = optax_snr.adam(1e-3)
    params = _params()
    lowered = jax.jit(tx.update).lower(params, tx.init(params)).as_text()
    assert "custom_call" not in lowered and "callback" not in lowered


class NoneAndPythonLeavesTest(chex.TestCase):
    """Leaves that are None in the state, and gradients given as Python numbers."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*_NAMED)
    def test_array_gradient_for_a_none_param_is_named(self, factory):
        params = {**_params(), "frozen": None}
        tx = factory(learning_rate=1e-3)
        grads = {**_params(), "frozen": jnp.ones(3)}
        # Optax fails here with "unsupported operand type(s) for *: 'float' and 'NoneType'".
        with pytest.raises(ValueError, match=re.escape("['frozen']")) as info:
            self.variant(tx.update)(grads, tx.init(params), params)
        assert "None" in str(info.value) and "(3,)" in str(info.value)

    @parameterized.named_parameters(*_NAMED)
    def test_python_float_gradients_are_taken_as_optax_takes_them(self, factory):
        # optax.adam accepts {"w": 1.0} eagerly (a float32 update); so do we.
        reference = {
            "adam": optax.adam,
            "adamw": optax.adamw,
            "amsgrad": optax.amsgrad,
            "nadam": optax.nadam,
            "nadamw": optax.nadamw,
            "adabelief": optax.adabelief,
            "adopt": optax.contrib.adopt,
            "ademamix": optax.contrib.ademamix,
        }[factory.__name__]
        for params in ({"w": jnp.ones(()), "b": jnp.ones(())}, {"w": 1.0, "b": 2.0}):
            tx = factory(learning_rate=1e-1)
            state = tx.init(params)
            with jax.numpy_dtype_promotion("standard"):
                ref = reference(learning_rate=1e-1)
                ref_state = ref.init(params)
            for g in (1.0, -0.5):
                grads = {"w": g, "b": np.float32(g)}
                updates, state = tx.update(grads, state, params)
                with jax.numpy_dtype_promotion("standard"):
                    expected, ref_state = ref.update(grads, ref_state, params)
                chex.assert_trees_all_close(updates, expected, rtol=1e-6)
                chex.assert_trees_all_equal_dtypes(updates, expected)

    def test_python_int_and_string_gradients_are_named(self):
        tx = optax_snr.adam(1e-3)
        state = tx.init({"w": jnp.ones(())})
        for bad in (1, "1.0"):
            with pytest.raises(TypeError, match=re.escape("['w']")):
                tx.update({"w": bad}, state)


@pytest.mark.parametrize("flag", [np.True_, np.False_, jnp.array(True), np.array(False)])
def test_numpy_and_jax_bools_are_flags_as_in_optax(flag):
    params = {"w": jnp.array([1.0, -2.0])}
    expected_tx = optax_snr.adam(1e-2, nesterov=bool(flag))
    for factory in (optax_snr.adam, optax_snr.adamw, optax_snr.adabelief, optax_snr.adopt):
        factory(1e-2, nesterov=flag)
    optax_snr.amsgrad(1e-2, bias_correction_mu=flag, bias_correction_nu=flag)
    optax_snr.adopt(1e-2, use_clipping=flag)
    tx = optax_snr.adam(1e-2, nesterov=flag)
    got, _ = tx.update(params, tx.init(params))
    expected, _ = expected_tx.update(params, expected_tx.init(params))
    chex.assert_trees_all_equal(got, expected)


@pytest.mark.parametrize("flag", [1, np.int32(1), jnp.array([True]), "yes", None])
def test_other_flags_are_refused(flag):
    with pytest.raises(TypeError, match="nesterov must be a bool"):
        optax_snr.adam(1e-2, nesterov=flag)


def test_a_traced_flag_is_a_clear_error():
    @jax.jit
    def build(flag):
        return optax_snr.adam(1e-2, nesterov=flag)

    with pytest.raises(TypeError, match="nesterov must be a concrete bool"):
        build(jnp.array(True))
