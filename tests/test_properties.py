"""Property tests: random pytrees and hyperparameters (hypothesis, bounded).

Valid input: ``optax_snr.adam`` agrees with ``optax.adam`` and stays finite.
float32 runs against ``optax.adam`` on the same values; 16-bit runs against
``optax.adam`` on the same values upcast to float32 (what the 16-bit result
approximates), with a tolerance set by the dtype's precision. Invalid input:
every optimizer factory of ``test_hostile_input.OPTIMIZERS`` raises
``ValueError`` naming the argument.
"""

from __future__ import annotations

import inspect
import math

import chex
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_hostile_input import OPTIMIZERS

import optax_snr

NUM_STEPS = 3
# Largest |ours - reference| allowed, in units of the learning rate (the steps
# are at most ~3 learning rates): float32 agrees to rounding; the 16-bit dtypes
# round the moments and the step to 8 (bfloat16) or 11 (float16) bits.
TOLERANCE = {"float32": 2e-6, "bfloat16": 5e-2, "float16": 5e-3}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
SETTINGS = settings(max_examples=15, deadline=None, derandomize=True, database=None)


@st.composite
def pytrees(draw):
    """A dict of 1-4 leaves of random shapes and 16/32-bit dtypes, or ``None``."""
    n = draw(st.integers(1, 4))
    shapes = st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple)
    leaves = {}
    for i in range(n):
        if i > 0 and draw(st.booleans()) and draw(st.booleans()):
            leaves[f"leaf{i}"] = None  # A frozen leaf: no state, no update.
        else:
            leaves[f"leaf{i}"] = (draw(shapes), draw(st.sampled_from(sorted(DTYPES))))
    nested = draw(st.booleans())
    return {"outer": {"inner": leaves}} if nested else leaves


def _materialize(spec, rng, scale=1.0):
    """Random arrays for a tree spec: |g| in [0.3, 3], so every dtype holds g^2."""

    def leaf(s):
        if s is None:
            return None
        shape, dtype = s
        x = rng.uniform(0.3, 3.0, shape) * rng.choice([-1.0, 1.0], shape) * scale
        return jnp.asarray(x, DTYPES[dtype])

    return jax.tree.map(leaf, spec, is_leaf=lambda x: x is None or isinstance(x, tuple))


valid_hyperparameters = st.fixed_dictionaries(
    {
        "learning_rate": st.floats(1e-4, 1.0),
        "b1": st.floats(0.0, 0.99),
        "b2": st.floats(0.0, 0.999),
        "eps": st.floats(0.0, 1e-3),
        "eps_root": st.floats(0.0, 1e-6),
        "nesterov": st.booleans(),
    }
)


@SETTINGS
@given(spec=pytrees(), hyper=valid_hyperparameters, seed=st.integers(0, 2**16))
def test_random_trees_and_hyperparameters_match_optax(spec, hyper, seed):
    rng = np.random.default_rng(seed)
    params = _materialize(spec, rng)
    grads = [_materialize(spec, rng) for _ in range(NUM_STEPS)]
    upcast = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)

    tx = optax_snr.adam(**hyper)
    state = tx.init(params)
    with helpers.standard_promotion():
        ref = optax.adam(**hyper)
        ref_state = ref.init(upcast(params))
    lr = hyper["learning_rate"]
    for g in grads:
        updates, state = tx.update(g, state, params)
        with helpers.standard_promotion():
            ref_updates, ref_state = ref.update(upcast(g), ref_state)
        chex.assert_trees_all_equal_dtypes(updates, g)  # Same dtypes, None kept.
        chex.assert_tree_all_finite(updates)
        chex.assert_tree_all_finite(state)
        for (path, u), r in zip(
            jax.tree_util.tree_flatten_with_path(updates)[0],
            jax.tree.leaves(ref_updates),
            strict=True,
        ):
            diff = float(np.max(np.abs(np.asarray(u, np.float64) - np.asarray(r, np.float64))))
            tol = TOLERANCE[jnp.dtype(u.dtype).name] * lr
            assert diff <= tol, f"{jax.tree_util.keystr(path)} {u.dtype}: {diff} > {tol}"
    assert int(optax.tree.get(state, "count")) == NUM_STEPS


def _out_of_range(low, high):
    """Floats outside [low, high), NaN included."""
    below = st.floats(max_value=low, exclude_max=True, allow_nan=False)
    above = st.floats(min_value=high, allow_nan=False) if math.isfinite(high) else st.nothing()
    return st.one_of(below, above, st.just(math.nan))


invalid_hyperparameter = st.one_of(
    st.tuples(st.just("learning_rate"), _out_of_range(0.0, math.inf) | st.just(math.inf)),
    st.tuples(st.just("b1"), _out_of_range(0.0, 1.0)),
    st.tuples(st.just("b2"), _out_of_range(0.0, 1.0)),
    st.tuples(st.just("eps"), _out_of_range(0.0, math.inf)),
)


@pytest.mark.parametrize("factory", OPTIMIZERS, ids=lambda f: f.__name__)
@SETTINGS
@given(bad=invalid_hyperparameter)
def test_random_invalid_hyperparameters_raise_value_error(factory, bad):
    name, value = bad
    kwargs = {"learning_rate": 1e-3, name: value}
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        factory(**kwargs)


# ADOPT, as in Optax, has no eps_root.
WITH_EPS_ROOT = [f for f in OPTIMIZERS if "eps_root" in inspect.signature(f).parameters]


@pytest.mark.parametrize("factory", WITH_EPS_ROOT, ids=lambda f: f.__name__)
@SETTINGS
@given(eps_root=_out_of_range(0.0, math.inf))
def test_random_invalid_eps_root_raises_value_error(factory, eps_root):
    with pytest.raises(ValueError, match=r"\beps_root\b"):
        factory(learning_rate=1e-3, eps_root=eps_root)
