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
        pairs = ((updates, ref_updates), (optax.tree.get(state, "mu"), ref_state[0].mu))
        for ours, theirs in pairs:
            for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
                np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
        assert bool(jnp.isnan(updates["dense"]["bias"]).any())
        assert int(optax.tree.get(state, "count")) == 1  # The step was taken, poison and all.

    def test_huge_finite_gradient_overflows_the_noise_buffer(self):
        # g ** 2 overflows float32 for |g| > 1.8e19: the update is a finite 0,
        # but nu is inf from then on and the parameter never moves again.
        tx = optax_snr.adam(LR)
        state = tx.init(jnp.zeros(3))
        updates, state = jax.jit(tx.update)(jnp.full(3, 1e30, jnp.float32), state)
        chex.assert_tree_all_finite(updates)
        assert bool(jnp.isinf(optax.tree.get(state, "nu")).all())
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

    def test_rejects_a_state_it_did_not_make(self):
        tx = optax_snr.skip_nonfinite(optax_snr.adam(LR))
        with self.assertRaisesRegex(TypeError, "SkipNonfiniteState"):
            tx.update(jnp.ones(2), optax_snr.adam(LR).init(jnp.zeros(2)))


TARGET = jnp.linspace(-2.0, 3.0, 8, dtype=jnp.float32)


def _quadratic(params):
    return jnp.sum((params - TARGET) ** 2)


def _train(tx, num_steps, *, with_value=False, grad_fn=None):
    """``num_steps`` jitted steps of ``tx`` on a quadratic from zero; returns (params, state)."""
    grad_fn = grad_fn or (lambda p, i: jax.grad(_quadratic)(p))

    @jax.jit
    def step(params, state, i):
        extra = {"value": _quadratic(params)} if with_value else {}
        updates, state = tx.update(grad_fn(params, i), state, params, **extra)
        return optax.apply_updates(params, updates), state

    params = jnp.zeros_like(TARGET)
    state = tx.init(params)
    for i in range(num_steps):
        params, state = step(params, state, jnp.asarray(i, jnp.int32))
    return params, state


def _nan_at(step):
    """A constant 0.1 learning rate that is NaN at count ``step``."""
    return lambda count: jnp.where(count == step, jnp.float32(jnp.nan), jnp.float32(0.1))


class WhatIsJudgedTest(chex.TestCase):
    """Only what must be finite is judged: not markers that other stages keep."""

    def test_reduce_on_plateau_inf_marker_does_not_stall_training(self):
        # reduce_on_plateau keeps best_value = inf until it has seen a loss.
        def chain():
            plateau = optax.contrib.reduce_on_plateau(accumulation_size=4)
            return optax.chain(optax_snr.adam(0.1), plateau)

        with helpers.standard_promotion():  # reduce_on_plateau promotes implicitly.
            assert bool(jnp.isinf(optax.tree.get(chain().init(TARGET), "best_value")))
            params, state = _train(optax_snr.skip_nonfinite(chain()), 50, with_value=True)
            plain, _ = _train(chain(), 50, with_value=True)
            clean, _ = _train(optax_snr.adam(0.1), 50)
        assert int(state.skipped) == 0
        helpers.assert_trees_bitwise_equal(params, plain)
        # Trained as far as plain Adam (the old guard stayed at the start, loss 12.75).
        self.assertLess(float(_quadratic(params)), 0.1)
        self.assertLess(abs(float(_quadratic(params)) - float(_quadratic(clean))), 0.05)
        # A NaN gradient is still skipped, and then training goes on.
        bad = lambda p, i: jnp.where(i == 10, jnp.float32(jnp.nan), jax.grad(_quadratic)(p))
        with helpers.standard_promotion():
            _, state = _train(optax_snr.skip_nonfinite(chain()), 20, with_value=True, grad_fn=bad)
        assert int(state.skipped) == 1 and bool(state.last_finite)

    def test_newly_nonfinite_judges_values_that_were_finite(self):
        newly = optax_snr.guards.skip_nonfinite.newly_nonfinite
        inf, nan = jnp.float32(jnp.inf), jnp.float32(jnp.nan)
        old = {"marker": jnp.array([inf, 1.0]), "count": jnp.asarray(3)}
        same = {"marker": jnp.array([inf, 2.0]), "count": jnp.asarray(4)}
        assert not bool(newly(old, same))
        assert not bool(newly(old, {"marker": jnp.array([nan, 2.0]), "count": jnp.asarray(4)}))
        assert bool(newly(old, {"marker": jnp.array([inf, inf]), "count": jnp.asarray(4)}))
        assert bool(newly(old, {"marker": jnp.array([1.0, nan]), "count": jnp.asarray(4)}))
        assert not bool(newly({}, {}))


class ScheduleClockTest(chex.TestCase):
    """A learning rate that is NaN at one step costs that step, not every later one."""

    @parameterized.named_parameters(
        ("scale_by_learning_rate", lambda lr: optax_snr.adam(lr)),
        ("inject_hyperparams", lambda lr: optax.inject_hyperparams(optax_snr.adam)(lr)),
    )
    def test_nan_schedule_skips_one_step_and_recovers(self, build):
        params, state = _train(optax_snr.skip_nonfinite(build(_nan_at(3))), 12)
        assert int(state.skipped) == 1
        assert bool(state.last_finite) and int(state.consecutive_skips) == 0
        chex.assert_tree_all_finite(params)
        # Eleven applied steps of a constant 0.1: the same as plain Adam's eleven.
        clean, clean_state = _train(build(0.1), 11)
        chex.assert_trees_all_close(params, clean, rtol=1e-6)
        counts = optax.tree_utils.tree_get_all_with_path(state, "count")
        clocks = [int(v) for path, v in counts if path[-1].tuple_name in SCHEDULE_CLOCKS]
        others = [int(v) for path, v in counts if path[-1].tuple_name not in SCHEDULE_CLOCKS]
        assert clocks and set(clocks) == {12}  # The schedule's clocks moved on through the skip.
        assert others == [11]  # Adam's count: the applied steps.
        assert int(optax.tree.get(clean_state, "count", filtering=_not_a_clock)) == 11


SCHEDULE_CLOCKS = (
    "ScaleByScheduleState",
    "InjectHyperparamsState",
    "InjectStatefulHyperparamsState",
    "WrappedScheduleState",
)


def _not_a_clock(path, _):
    return path[-1].tuple_name not in SCHEDULE_CLOCKS


class ConsecutiveSkipBoundTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_bound_applies_the_step_anyway_and_starts_over(self):
        tx = optax_snr.skip_nonfinite(optax_snr.adam(LR), max_consecutive_skips=3)
        params = jnp.zeros(2)
        state = tx.init(params)
        update = self.variant(tx.update)
        nan = jnp.array([jnp.nan, 1.0])
        seen = []
        for _ in range(5):
            updates, state = update(nan, state, params)
            applied = bool(jnp.isnan(updates).any())
            seen.append((applied, int(state.skipped), int(state.consecutive_skips)))
            assert not bool(state.last_finite)
        # Three skips, then the fourth bad step is applied (NaN and all), then skips again.
        assert seen == [(False, 1, 1), (False, 2, 2), (False, 3, 3), (True, 3, 0), (False, 4, 1)]
        assert int(optax.tree.get(state, "count")) == 1
        # A finite step resets the run of skips.
        tx = optax_snr.skip_nonfinite(optax_snr.adam(LR), max_consecutive_skips=3)
        state = tx.init(params)
        for g in (nan, nan, jnp.ones(2), nan, nan, nan):
            updates, state = update(g, state, params)
        assert (int(state.skipped), int(state.consecutive_skips)) == (5, 3)
        np.testing.assert_array_equal(updates, 0.0)

    @parameterized.named_parameters(
        ("none", None, 0), ("zero", 0, 4), ("numpy_zero", np.int64(0), 4)
    )
    def test_no_bound_and_zero_bound(self, bound, applied_steps):
        tx = optax_snr.skip_nonfinite(optax_snr.adam(LR), max_consecutive_skips=bound)
        state = tx.init(jnp.zeros(2))
        for _ in range(4):
            _, state = tx.update(jnp.array([jnp.nan, 1.0]), state)
        assert int(optax.tree.get(state, "count")) == applied_steps
        assert int(state.skipped) == 4 - applied_steps

    @parameterized.named_parameters(
        ("negative", -1, ValueError),
        ("float", 2.5, TypeError),
        ("bool", True, TypeError),
        ("string", "3", TypeError),
    )
    def test_invalid_bound_is_rejected(self, bound, error):
        with self.assertRaisesRegex(error, "max_consecutive_skips"):
            optax_snr.skip_nonfinite(optax_snr.adam(LR), max_consecutive_skips=bound)


class MultiStepsNestingTest(chex.TestCase):
    """Put skip_nonfinite outside optax.MultiSteps: inside, one NaN micro-batch is forever."""

    GOOD = [jnp.array([0.5, -1.0]), jnp.array([1.5, 0.25]), jnp.array([-0.5, 2.0])] * 2
    NAN = jnp.array([jnp.nan, 1.0])

    def _run(self, tx, grads):
        params = jnp.zeros(2)
        state = tx.init(params)
        with helpers.standard_promotion():  # MultiSteps promotes implicitly.
            update = jax.jit(tx.update)
            for g in grads:
                updates, state = update(g, state, params)
                params = optax.apply_updates(params, updates)
        return params, state

    def test_outside_drops_the_bad_micro_batch(self):
        good = self.GOOD
        tx = optax_snr.skip_nonfinite(optax.MultiSteps(optax_snr.adam(0.1), every_k_schedule=2))
        params, state = self._run(tx, [good[0], self.NAN, *good[1:]])
        clean, _ = self._run(optax.MultiSteps(optax_snr.adam(0.1), every_k_schedule=2), good)
        helpers.assert_trees_bitwise_equal(params, clean)
        assert int(state.skipped) == 1
        assert int(optax.tree.get(state, "count")) == 3  # Three Adam steps on six good batches.

    def test_inside_never_recovers(self):
        # Documents Optax's behaviour (optax 0.2.8): the accumulator is reset by
        # multiplying by zero, and NaN * 0 is NaN, so every later mean is NaN.
        good = self.GOOD
        tx = optax.MultiSteps(optax_snr.skip_nonfinite(optax_snr.adam(0.1)), every_k_schedule=2)
        params, state = self._run(tx, [good[0], self.NAN, *good])
        np.testing.assert_array_equal(params, 0.0)
        assert int(state.inner_opt_state.skipped) == 4  # Every Adam step since the NaN.
        assert int(optax.tree.get(state.inner_opt_state, "count")) == 0


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
        # apply_if_finite checks only its input gradients, here finite (1e30); the
        # update is a finite zero too, so the inf in nu is kept. skip_nonfinite checks the state.
        grads = jnp.full(2, 1e30, jnp.float32)
        tx = optax.apply_if_finite(optax_snr.adam(LR), max_consecutive_errors=5)
        _, state = tx.update(grads, tx.init(jnp.zeros(2)))
        assert int(state.total_notfinite) == 0
        assert bool(jnp.isinf(optax.tree.get(state.inner_state, "nu")).all())
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
        state = optax.tree.set(state, count=start)
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
            count = optax.tree.get(state, "count")
            assert int(count) == INT32_MAX
            assert count.dtype == jnp.int32
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
