"""Faults: NaN and inf gradients, a saturated step count, extreme magnitudes."""

from __future__ import annotations

import math

import chex
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import optax_snr
import optax_snr.guards.skip_nonfinite

LR = 1e-3
B1, B2 = 0.9, 0.999
# Adam's trust region (Kingma & Ba, Section 2.1): |step| <= lr (1 - b1) / sqrt(1 - b2)
# when 1 - b1 > sqrt(1 - b2), as with the defaults.
TRUST_REGION = LR * (1 - B1) / math.sqrt(1 - B2)
INT32_MAX = int(jnp.iinfo(jnp.int32).max)


def _poison(tree, value):
    """``tree`` with ``value`` in the first element of its first leaf."""
    leaves, treedef = jax.tree.flatten(tree)
    first = leaves[0].reshape(-1).at[0].set(value).reshape(leaves[0].shape)
    return jax.tree.unflatten(treedef, [first, *leaves[1:]])


class DefaultBehaviourTest(chex.TestCase):
    """Without a wrapper a NaN propagates, as in Optax: it is never hidden."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_nan_gradient_propagates_like_optax(self):
        params = helpers.multi_leaf_params()
        grads = _poison(helpers.noisy_grad(params, jnp.asarray(0)), jnp.nan)
        tx = optax_snr.adam(LR)
        updates, state = self.variant(tx.update)(grads, tx.init(params))
        with helpers.standard_promotion():
            ref = optax.adam(LR)
            ref_updates, ref_state = jax.jit(ref.update)(grads, ref.init(params))
        for ours, theirs in ((updates, ref_updates), (state[0].mu, ref_state[0].mu)):
            for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
                np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
        assert bool(jnp.isnan(updates["dense"]["bias"]).any())
        assert int(state[0].count) == 1  # The step was taken, poison and all.

    def test_huge_finite_gradient_overflows_the_noise_buffer(self):
        # g ** 2 overflows float32 for |g| > 1.8e19: the update is a finite 0,
        # but nu is inf from then on and the parameter never moves again.
        tx = optax_snr.adam(LR)
        state = tx.init(jnp.zeros(3))
        updates, state = jax.jit(tx.update)(jnp.full(3, 1e30, jnp.float32), state)
        chex.assert_tree_all_finite(updates)
        assert bool(jnp.isinf(state[0].nu).all())
        updates, _ = jax.jit(tx.update)(jnp.ones(3), state)
        np.testing.assert_array_equal(updates, 0.0)


class SkipNonfiniteTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("nan", jnp.nan), ("inf", jnp.inf), ("minus_inf", -jnp.inf), ("overflow", 1e30)
    )
    def test_bad_batch_leaves_params_and_state_unchanged(self, bad):
        params = helpers.multi_leaf_params()
        tx = optax_snr.skip_nonfinite(optax_snr.adam(LR))
        update = self.variant(tx.update)

        def step(p, s, g):
            u, s = update(g, s, p)
            return optax.apply_updates(p, u), s

        state = tx.init(params)
        for i in range(3):
            params, state = step(params, state, helpers.noisy_grad(params, jnp.asarray(i)))
        grads = _poison(helpers.noisy_grad(params, jnp.asarray(3)), bad)
        new_params, new_state = step(params, state, grads)

        helpers.assert_trees_bitwise_equal(new_params, params)
        helpers.assert_trees_bitwise_equal(new_state.inner_state, state.inner_state)
        assert int(new_state.skipped) == 1
        assert not bool(new_state.last_finite)
        assert int(optax.tree.get(new_state, "count")) == 3  # Applied steps only.

        # The next good batch continues as if the bad one had never come.
        good = helpers.noisy_grad(params, jnp.asarray(4))
        resumed = step(new_params, new_state, good)
        clean = step(params, state, good)
        helpers.assert_trees_bitwise_equal(resumed[0], clean[0])
        helpers.assert_trees_bitwise_equal(resumed[1].inner_state, clean[1].inner_state)
        assert int(resumed[1].skipped) == 1
        assert bool(resumed[1].last_finite)

    def test_transparent_on_good_batches(self):
        params = helpers.multi_leaf_params()
        wrapped = helpers.run_optimizer(optax_snr.skip_nonfinite(optax_snr.adam(LR)), params, 50)
        plain = helpers.run_optimizer(optax_snr.adam(LR), params, 50)
        helpers.assert_trees_bitwise_equal(wrapped[0], plain[0])
        helpers.assert_trees_bitwise_equal(wrapped[1].inner_state, plain[1])
        assert int(wrapped[1].skipped) == 0

    def test_skips_are_counted_and_saturate(self):
        tx = optax_snr.skip_nonfinite(optax_snr.adam(LR))
        state = tx.init(jnp.zeros(2))
        state = state._replace(skipped=jnp.asarray(INT32_MAX - 1, jnp.int32))
        update = jax.jit(tx.update)
        for _ in range(3):
            _, state = update(jnp.array([jnp.nan, 1.0]), state)
        assert int(state.skipped) == INT32_MAX

    def test_passes_extra_args_and_none_leaves(self):
        tx = optax_snr.skip_nonfinite(optax_snr.adam(LR))
        params = {"a": jnp.ones(2), "frozen": jnp.ones(3)}
        state = tx.init(params)
        updates, state = tx.update({"a": jnp.ones(2), "frozen": None}, state, params, value=1.0)
        assert updates["frozen"] is None
        assert int(optax.tree.get(state, "count")) == 1

    def test_works_inside_optax_wrappers(self):
        tx = optax.MultiSteps(optax_snr.skip_nonfinite(optax_snr.adam(LR)), every_k_schedule=2)
        params = jnp.zeros(2)
        state = tx.init(params)
        with helpers.standard_promotion():  # MultiSteps promotes implicitly.
            for g in (jnp.ones(2), jnp.array([jnp.nan, 1.0])):
                updates, state = tx.update(g, state, params)
        np.testing.assert_array_equal(updates, 0.0)
        assert int(state.inner_opt_state.skipped) == 1


class ApplyIfFiniteTest(chex.TestCase):
    """``optax.apply_if_finite`` composes with our state; its limits, documented."""

    def test_nan_batch_is_skipped_and_counted(self):
        tx = optax.apply_if_finite(optax_snr.adam(LR), max_consecutive_errors=5)
        params = helpers.multi_leaf_params()
        state = tx.init(params)
        update = jax.jit(tx.update)
        updates, state = update(helpers.noisy_grad(params, jnp.asarray(0)), state, params)
        params = optax.apply_updates(params, updates)
        bad = _poison(helpers.noisy_grad(params, jnp.asarray(1)), jnp.nan)
        updates, new_state = update(bad, state, params)
        helpers.assert_trees_bitwise_equal(optax.apply_updates(params, updates), params)
        helpers.assert_trees_bitwise_equal(new_state.inner_state, state.inner_state)
        assert int(new_state.notfinite_count) == 1
        assert int(new_state.total_notfinite) == 1
        # No field of apply_if_finite is named "count": the lookup is unambiguous
        # and gives our count of applied steps.
        assert int(optax.tree.get(new_state, "count")) == 1

    def test_does_not_see_an_overflowed_noise_buffer(self):
        # apply_if_finite checks the updates only; the overflow's update is a
        # finite zero, so the inf in nu is kept. skip_nonfinite checks the state.
        grads = jnp.full(2, 1e30, jnp.float32)
        tx = optax.apply_if_finite(optax_snr.adam(LR), max_consecutive_errors=5)
        _, state = tx.update(grads, tx.init(jnp.zeros(2)))
        assert int(state.total_notfinite) == 0
        assert bool(jnp.isinf(state.inner_state[0].nu).all())
        ours = optax_snr.skip_nonfinite(optax_snr.adam(LR))
        _, state = ours.update(grads, ours.init(jnp.zeros(2)))
        assert int(state.skipped) == 1
        chex.assert_tree_all_finite(state.inner_state)


class CountLookupTest(chex.TestCase):
    def test_inject_hyperparams_makes_count_ambiguous_and_a_filter_resolves_it(self):
        tx = optax.inject_hyperparams(optax_snr.adam)(learning_rate=LR)
        params = jnp.zeros(2)
        state = tx.init(params)
        for _ in range(3):
            _, state = tx.update(jnp.ones(2), state, params)
        with pytest.raises(KeyError):
            optax.tree.get(state, "count")  # InjectHyperparamsState has one too.
        count = optax.tree.get(
            state,
            "count",
            filtering=lambda path, _: getattr(path[-1], "tuple_name", None) == "ScaleByAdamState",
        )
        assert int(count) == 3


class CountSaturationTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_count_saturates_with_finite_updates_equal_to_optax(self):
        params = helpers.multi_leaf_params()
        grads = helpers.noisy_grad(params, jnp.asarray(0))
        start = jnp.asarray(INT32_MAX - 1, jnp.int32)
        tx = optax_snr.adam(LR)
        state = tx.init(params)
        state = (state[0]._replace(count=start), *state[1:])
        with helpers.standard_promotion():
            ref = optax.adam(LR)
            ref_state = ref.init(params)
            ref_state = (ref_state[0]._replace(count=start), *ref_state[1:])
            ref_update = jax.jit(ref.update)
        update = self.variant(tx.update)
        for _ in range(3):
            updates, state = update(grads, state)
            with helpers.standard_promotion():
                ref_updates, ref_state = ref_update(grads, ref_state)
            chex.assert_tree_all_finite(updates)
            assert int(state[0].count) == INT32_MAX
            assert state[0].count.dtype == jnp.int32
            chex.assert_trees_all_close(updates, ref_updates, rtol=1e-6)


def _extreme_cases():
    cases = []
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
        info = jnp.finfo(dtype)
        tiny = max(1e-30, float(info.tiny))  # float16: its smallest normal number.
        huge = min(1e30, float(info.max))  # float16: its largest finite number.
        name = jnp.dtype(dtype).name
        cases += [(f"{name}_tiny", dtype, tiny), (f"{name}_huge", dtype, huge)]
    return cases


class ExtremeMagnitudeTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*_extreme_cases())
    def test_steps_are_finite_and_inside_the_trust_region(self, dtype, magnitude):
        # 16-bit moments are kept in float32, as recommended for float16.
        tx = optax_snr.adam(LR, B1, B2, mu_dtype=jnp.float32, nu_dtype=jnp.float32)
        params = jnp.zeros(4, dtype)
        sign = jnp.array([1.0, -1.0, 1.0, -1.0], jnp.float32)
        state = tx.init(params)
        update = self.variant(tx.update)
        for i in range(10):
            g = (sign * (1.0 if i % 3 else -1.0)).astype(dtype) * jnp.asarray(magnitude, dtype)
            updates, state = update(g, state)
            assert updates.dtype == dtype
            u = np.asarray(updates, np.float64)
            assert np.isfinite(u).all(), (i, u)
            assert np.abs(u).max() <= TRUST_REGION * 1.01, (i, u)

    @parameterized.named_parameters(("tiny", 1e-3), ("large", 300.0), ("max", 65504.0))
    def test_float16_gradients_are_squared_in_float32(self, magnitude):
        # In float16, g ** 2 vanishes (1e-3 -> a step of g / eps = inf) or
        # overflows (300 -> a step of 0); squared in float32 the first step is
        # -lr * sign(g), as Adam's first step always is.
        tx = optax_snr.adam(LR, nu_dtype=jnp.float32)
        g = jnp.array([magnitude, -magnitude], jnp.float16)
        updates, state = jax.jit(tx.update)(g, tx.init(jnp.zeros(2, jnp.float16)))
        np.testing.assert_allclose(np.asarray(updates, np.float32), [-LR, LR], rtol=2e-3)
        chex.assert_tree_all_finite(state)

    def test_float16_noise_buffer_overflow_is_caught_by_skip_nonfinite(self):
        # With nu in float16 itself, (1 - b2) g^2 overflows for |g| > 8.1e3.
        tx = optax_snr.skip_nonfinite(optax_snr.adam(LR))
        state = tx.init(jnp.zeros(2, jnp.float16))
        _, state = tx.update(jnp.full(2, 1e4, jnp.float16), state)
        assert int(state.skipped) == 1
        chex.assert_tree_all_finite(state.inner_state)
