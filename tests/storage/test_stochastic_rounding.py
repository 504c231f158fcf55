"""stochastic_rounding: unbiased, reproducible bfloat16 rounding without a key."""

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from absl.testing import parameterized

import optax_snr

FMT = optax_snr.stochastic_rounding(jnp.bfloat16)


def _neighbours(x):
    """The bfloat16 values just below and above each float32 entry (in magnitude)."""
    x = np.asarray(x, np.float32)
    down = (x.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
    up = ((x.view(np.uint32) & np.uint32(0xFFFF0000)) + np.uint32(0x10000)).view(np.float32)
    return down, up


class StochasticRoundingTest(parameterized.TestCase):
    def test_rounds_to_one_of_the_two_neighbours(self):
        x = jax.random.normal(jax.random.PRNGKey(0), (4, 1000), jnp.float32)
        stored = FMT.encode(x, FMT.init(x, signed=True))
        chex.assert_type(stored.value, jnp.bfloat16)
        y = np.asarray(stored.decode())
        down, up = _neighbours(x)
        assert np.all((y == down) | (y == up))
        assert 0.3 < np.mean(y == up) < 0.7

    @parameterized.parameters(0.1, 0.25, 0.5, 0.9)
    def test_is_unbiased(self, fraction):
        # x sits `fraction` of the way between two bfloat16 values: rounded up
        # with that probability. 100,000 draws: the standard error is < 0.0016.
        base = 1.5
        x = jnp.full((100_000,), base + fraction * 2.0**-7, jnp.float32)
        y = np.asarray(FMT.encode(x, FMT.init(x, signed=False)).decode(), np.float64)
        estimate = (y.mean() - base) / 2.0**-7
        assert abs(estimate - fraction) < 0.008
        neg = np.asarray(FMT.encode(-x, FMT.init(x, signed=True)).decode(), np.float64)
        assert abs((-neg.mean() - base) / 2.0**-7 - fraction) < 0.008

    def test_keeps_a_small_ema_increment_on_average(self):
        # Round to nearest cannot move 1.0 by 1e-3 * 0.1: the EMA freezes.
        # Stochastic rounding moves it, on average, by the right amount.
        v = jnp.ones((50_000,), jnp.float32)
        stored = FMT.encode(v, FMT.init(v, signed=False))
        for _ in range(200):
            v_new = 0.999 * stored.decode() + 0.001 * 0.1
            stored = FMT.encode(v_new, stored)
        exact = 0.1 + 0.9 * 0.999**200
        assert abs(float(stored.decode().mean()) - exact) < 2e-3
        nearest = jnp.ones((1,), jnp.bfloat16)
        for _ in range(200):
            nearest = (0.999 * nearest.astype(jnp.float32) + 0.001 * 0.1).astype(jnp.bfloat16)
        assert float(nearest[0]) == 1.0

    def test_is_reproducible_and_changes_with_the_step_and_the_leaf(self):
        x = jax.random.normal(jax.random.PRNGKey(1), (1000,), jnp.float32)
        first = FMT.init(x, signed=True, seed=7)
        a, b = FMT.encode(x, first), jax.jit(FMT.encode)(x, first)
        chex.assert_trees_all_equal(a, b)
        assert int(a.seed) == 8  # one more update
        later = FMT.encode(x, a)  # the next step draws other bits
        assert not np.array_equal(np.asarray(later.value), np.asarray(a.value))
        other_leaf = FMT.encode(x, FMT.init(x, signed=True, seed=8 + 2**20))
        assert not np.array_equal(np.asarray(other_leaf.value), np.asarray(a.value))

    def test_the_leaf_seed_comes_from_its_path_and_moment(self):
        params = {"a": jnp.zeros(3), "b": jnp.zeros(3)}
        tx = optax_snr.ema_moments(mu_dtype=FMT, nu_dtype=FMT)
        state, again = tx.init(params), tx.init(params)
        seeds = {int(s.seed) for s in (state.mu["a"], state.mu["b"], state.nu["a"])}
        assert len(seeds) == 3
        chex.assert_trees_all_equal(state, again)

    def test_non_finite_values_pass_through(self):
        x = jnp.asarray([jnp.inf, -jnp.inf, jnp.nan, 3.0e38, 1.0], jnp.float32)
        y = np.asarray(FMT.encode(x, FMT.init(x, signed=True)).decode())
        assert y[0] == np.inf and y[1] == -np.inf and np.isnan(y[2]) and np.isfinite(y[4])

    @parameterized.parameters(jnp.float16, jnp.float32, jnp.int8, "not a dtype")
    def test_other_dtypes_raise(self, dtype):
        with pytest.raises(ValueError, match=r"dtype must be jnp\.bfloat16"):
            optax_snr.stochastic_rounding(dtype)

    def test_accepts_the_ml_dtypes_spelling_and_rejects_a_negative_min_size(self):
        assert optax_snr.stochastic_rounding(ml_dtypes.bfloat16) == FMT
        with pytest.raises(ValueError, match="min_size"):
            optax_snr.stochastic_rounding(min_size=-1)
