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
