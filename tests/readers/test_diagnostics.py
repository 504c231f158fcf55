"""Tests for optax_snr.readers.diagnostics: signal, noise and SNR read from a state."""

import chex
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import absltest, parameterized

import optax_snr
from optax_snr.readers import diagnostics

LEVELS = (0.0, 0.1, 0.5, 0.9, 1.0)


def random_grads(num_steps, seed=0):
    """A list of gradient trees (float32 NumPy) with mixed signs and scales."""
    rng = np.random.default_rng(seed)
    shapes = {"dense": {"kernel": (4, 3), "bias": (3,)}, "out": (5,)}
    return [
        jax.tree.map(
            lambda shape: (rng.normal(size=shape) * 2.0 + 0.5).astype(np.float32),
            shapes,
            is_leaf=lambda x: isinstance(x, tuple),
        )
        for _ in range(num_steps)
    ]


def params_like(grads):
    return jax.tree.map(lambda g: jnp.zeros(g.shape, jnp.float32), grads)


def feed(tx, grads_seq, params=None):
    """Runs ``tx.update`` on each gradient tree in turn; returns the final state."""
    params = params_like(grads_seq[0]) if params is None else params
    state = tx.init(params)
    for g in grads_seq:
        _, state = tx.update(jax.tree.map(jnp.asarray, g), state, params)
    return state


def hand_stats(x):
    """Mean and the quantiles of ``x``, in float64 NumPy."""
    x = np.ravel(np.asarray(x, np.float64))
    return (x.mean(), *np.quantile(x, LEVELS))


def hand_diagnostics(grads_seq, b1, b2, eps, *, amsgrad=False):
    """Algorithm 1 of Kingma & Ba in float64, then the summaries, by hand.

    With ``amsgrad`` the noise is the root of the running max of v_hat.
    """
    leaves = [jax.tree.leaves(g) for g in grads_seq]
    names = [
        "/".join(str(k.key) for k in p)
        for p, _ in jax.tree_util.tree_leaves_with_path(grads_seq[0])
    ]
    m = [np.zeros(g.shape) for g in leaves[0]]
    v = [np.zeros(g.shape) for g in leaves[0]]
    v_max = [np.zeros(g.shape) for g in leaves[0]]
    for t, step in enumerate(leaves, start=1):
        m = [b1 * mi + (1 - b1) * np.float64(g) for mi, g in zip(m, step, strict=True)]
        v = [b2 * vi + (1 - b2) * np.float64(g) ** 2 for vi, g in zip(v, step, strict=True)]
        v_max = [np.maximum(x, vi / (1 - b2**t)) for x, vi in zip(v_max, v, strict=True)]
    t = len(leaves)
    signal = [np.abs(mi / (1 - b1**t)) for mi in m]
    noise = [np.sqrt(x) for x in v_max] if amsgrad else [np.sqrt(vi / (1 - b2**t)) for vi in v]
    snr = [s / (n + eps) for s, n in zip(signal, noise, strict=True)]
    flat = lambda xs: np.concatenate([np.ravel(x) for x in xs])
    overall = {"signal": flat(signal), "noise": flat(noise), "snr": flat(snr)}
    per_leaf = {
        name: {"signal": s, "noise": n, "snr": r}
        for name, s, n, r in zip(names, signal, noise, snr, strict=True)
    }
    return overall, per_leaf


def assert_summary_close(summary, values, rtol=3e-5):
    """``summary`` (an SnrSummary) against hand-computed arrays per quantity.

    The default tolerance is float32's for this computation: with b2 = 0.999
    and small t, ``1 - b2 ** t`` in float32 (as Optax and the library take it)
    loses up to about 2e-5 of relative precision to cancellation (1e-5 after
    the root); the float64 test checks the same computation at 1e-12.
    """
    for quantity, x in values.items():
        got = np.asarray(getattr(summary, quantity), np.float64)
        np.testing.assert_allclose(got, hand_stats(x), rtol=rtol, atol=1e-12, err_msg=quantity)


class SnrDiagnosticsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("defaults", 0.9, 0.999, 1e-8, 3),
        ("short_memory", 0.5, 0.8, 1e-3, 4),
        ("one_step", 0.9, 0.999, 1e-8, 1),
    )
    def test_matches_hand_computation(self, b1, b2, eps, num_steps):
        grads = random_grads(num_steps)
        state = feed(optax_snr.adam(1e-3, b1=b1, b2=b2, eps=eps), grads)
        diag = self.variant(lambda s: optax_snr.snr_diagnostics(s, b1=b1, b2=b2, eps=eps))(state)
        overall, per_leaf = hand_diagnostics(grads, b1, b2, eps)
        assert int(diag.count) == num_steps
        assert_summary_close(diag.overall, overall)
        assert set(diag.per_leaf) == set(per_leaf) == {"dense/bias", "dense/kernel", "out"}
        for name, values in per_leaf.items():
            assert_summary_close(diag.per_leaf[name], values)

    def test_first_step_snr_is_one(self):
        # After one step m_hat = g and v_hat = g^2: a full step everywhere.
        state = feed(optax_snr.adam(0.1), random_grads(1))
        diag = optax_snr.snr_diagnostics(state, eps=0.0)
        chex.assert_trees_all_close(diag.overall.snr, diagnostics.Summary(*[1.0] * 6), rtol=2e-5)

    def test_before_first_step_reports_zero(self):
        state = optax_snr.adam(0.1).init(params_like(random_grads(1)[0]))
        diag = optax_snr.snr_diagnostics(state)
        assert int(diag.count) == 0
        chex.assert_trees_all_equal(diag.overall, jax.tree.map(jnp.zeros_like, diag.overall))

    def test_same_as_for_optax_adam_state(self):
        # optax.adam's ScaleByAdamState keeps the same field names.
        grads = random_grads(5)
        with helpers.standard_promotion():
            reference = optax_snr.snr_diagnostics(feed(optax.adam(1e-2), grads))
        ours = optax_snr.snr_diagnostics(feed(optax_snr.adam(1e-2), grads))
        chex.assert_trees_all_close(ours, reference, rtol=1e-6)

    def test_reads_hyperparameters_from_inject_hyperparams(self):
        grads = random_grads(3)
        tx = optax.inject_hyperparams(optax_snr.adam)(learning_rate=1e-2, b1=0.5, b2=0.7, eps=0.1)
        state = feed(tx, grads)
        overall, _ = hand_diagnostics(grads, 0.5, 0.7, 0.1)
        assert_summary_close(optax_snr.snr_diagnostics(state).overall, overall, rtol=1e-5)
        # An explicit argument wins over the injected value.
        overall, _ = hand_diagnostics(grads, 0.5, 0.7, 0.0)
        diag = optax_snr.snr_diagnostics(state, eps=0.0)
        assert_summary_close(diag.overall, overall, rtol=1e-5)

    def test_inside_multi_steps_counts_gradient_steps(self):
        grads = random_grads(6)
        with helpers.standard_promotion():  # MultiSteps itself needs it.
            state = feed(optax.MultiSteps(optax_snr.adam(1e-2), every_k_schedule=2), grads)
        # The inner Adam saw the mean of each pair of mini-batch gradients.
        means = [
            jax.tree.map(lambda a, b: (a + b) / np.float32(2), grads[i], grads[i + 1])
            for i in range(0, 6, 2)
        ]
        diag = optax_snr.snr_diagnostics(state)
        assert int(diag.count) == 3
        assert_summary_close(diag.overall, hand_diagnostics(means, 0.9, 0.999, 1e-8)[0])

    def test_masked_leaves_are_left_out(self):
        grads = random_grads(2)
        mask = {"dense": {"kernel": True, "bias": False}, "out": True}
        state = feed(optax.masked(optax_snr.adam(1e-2), mask), grads)
        diag = optax_snr.snr_diagnostics(state)
        assert set(diag.per_leaf) == {"dense/kernel", "out"}
        kept = [{"dense": {"kernel": g["dense"]["kernel"]}, "out": g["out"]} for g in grads]
        assert_summary_close(diag.overall, hand_diagnostics(kept, 0.9, 0.999, 1e-8)[0])

    def test_with_a_schedule_and_chained_transforms(self):
        # Other counts in the state (the schedule's) must not be mistaken for Adam's.
        grads = random_grads(3)
        tx = optax.chain(
            optax.clip_by_global_norm(1e6),
            optax_snr.adam(optax.linear_schedule(1e-2, 0.0, 100)),
            optax.apply_every(1),  # ApplyEvery has a `count` field too.
        )
        with helpers.standard_promotion():  # Optax's schedule and apply_every need it.
            state = feed(tx, grads)
        diag = optax_snr.snr_diagnostics(state)
        assert int(diag.count) == 3
        assert_summary_close(diag.overall, hand_diagnostics(grads, 0.9, 0.999, 1e-8)[0])

    def test_amsgrad_reports_the_running_max_noise(self):
        # Gradients that shrink make v_hat fall, so the max differs from v_hat.
        grads = [
            jax.tree.map(lambda g, k=k: g / np.float32(k), g)
            for k, g in enumerate(random_grads(4), 1)
        ]
        diag = optax_snr.snr_diagnostics(feed(optax_snr.amsgrad(1e-2), grads))
        assert_summary_close(
            diag.overall, hand_diagnostics(grads, 0.9, 0.999, 1e-8, amsgrad=True)[0]
        )
        with helpers.standard_promotion():
            reference = optax_snr.snr_diagnostics(feed(optax.amsgrad(1e-2), grads))
        chex.assert_trees_all_close(diag, reference, rtol=1e-6)

    def test_adabelief_reports_the_centered_noise(self):
        grads = random_grads(4)
        diag = optax_snr.snr_diagnostics(feed(optax_snr.adabelief(1e-2), grads), eps=1e-16)
        with helpers.standard_promotion():
            reference = feed(optax.adabelief(1e-2), grads)
        chex.assert_trees_all_close(
            diag, optax_snr.snr_diagnostics(reference, eps=1e-16), rtol=1e-6
        )
        # The centered noise is smaller than the raw one: the mean is taken out.
        raw = optax_snr.snr_diagnostics(feed(optax_snr.adam(1e-2), grads))
        assert float(diag.overall.noise.mean) < float(raw.overall.noise.mean)

    @parameterized.parameters("adamw", "nadam", "nadamw")
    def test_same_as_for_optax_variant_state(self, name):
        grads = random_grads(4)
        diag = optax_snr.snr_diagnostics(feed(getattr(optax_snr, name)(1e-2), grads))
        with helpers.standard_promotion():
            reference = optax_snr.snr_diagnostics(feed(getattr(optax, name)(1e-2), grads))
        chex.assert_trees_all_close(diag, reference, rtol=1e-6)
        assert_summary_close(diag.overall, hand_diagnostics(grads, 0.9, 0.999, 1e-8)[0])

    def test_ademamix_finds_its_count(self):
        grads = random_grads(3)
        state = feed(optax_snr.ademamix(1e-2), grads)
        diag = optax_snr.snr_diagnostics(state)
        assert int(diag.count) == 3
        assert_summary_close(diag.overall, hand_diagnostics(grads, 0.9, 0.999, 1e-8)[0])

    def test_adopt_stage_is_refused(self):
        # scale_by_adopt's own state says it is ADOPT. optax_snr.adopt's state
        # is Optax's ScaleByAdamState, as optax.contrib.adopt's is, so from the
        # state alone it cannot be told apart from Adam's.
        tx = optax.chain(optax_snr.scale_by_adopt(), optax.scale_by_learning_rate(1e-2))
        state = feed(tx, random_grads(2))
        with pytest.raises(ValueError, match="ADOPT"):
            optax_snr.snr_diagnostics(state)
        ours, theirs = optax_snr.adopt(1e-2), optax.contrib.adopt(1e-2)
        params = params_like(random_grads(1)[0])
        assert jax.tree.structure(ours.init(params)) == jax.tree.structure(theirs.init(params))

    def test_no_moments_is_a_clear_error(self):
        state = optax.sgd(0.1, momentum=0.9).init(params_like(random_grads(1)[0]))
        with pytest.raises(ValueError, match="holds no moments"):
            optax_snr.snr_diagnostics(state)

    def test_two_sets_of_moments_is_a_clear_error(self):
        params = params_like(random_grads(1)[0])
        state = optax.chain(optax_snr.adam(0.1), optax_snr.adam(0.1)).init(params)
        with pytest.raises(ValueError, match="more than one set of moments"):
            optax_snr.snr_diagnostics(state)

    @parameterized.parameters(("b1", 1.0), ("b2", -0.1), ("eps", -1.0))
    def test_bad_hyperparameter(self, name, value):
        state = optax_snr.adam(0.1).init(params_like(random_grads(1)[0]))
        with pytest.raises(ValueError, match=name):
            optax_snr.snr_diagnostics(state, **{name: value})

    def test_params_named_mu_are_not_moments(self):
        # A parameter dict key "mu" (say, a VAE head) is not a NamedTuple field.
        params = {"mu": jnp.ones(2), "nu": jnp.ones(3)}
        state = feed(
            optax_snr.adam(0.1),
            [{"mu": np.ones(2, np.float32), "nu": np.ones(3, np.float32)}],
            params,
        )
        assert set(optax_snr.snr_diagnostics(state).per_leaf) == {"mu", "nu"}

    def test_does_not_retrace_between_steps(self):
        tx = optax_snr.adam(1e-2)
        grads = random_grads(3)
        state = tx.init(params_like(grads[0]))
        fn = jax.jit(chex.assert_max_traces(optax_snr.snr_diagnostics, n=1))
        for g in grads:
            _, state = tx.update(jax.tree.map(jnp.asarray, g), state)
            chex.assert_tree_all_finite(fn(state))

    @parameterized.parameters(jnp.bfloat16, jnp.float16)
    def test_low_precision_moments_summarized_in_float32(self, dtype):
        grads = random_grads(2)
        tx = optax_snr.adam(1e-2, mu_dtype=dtype)
        state = feed(
            tx,
            [jax.tree.map(lambda g: g.astype(dtype), g) for g in grads],
            jax.tree.map(lambda g: jnp.zeros(g.shape, dtype), grads[0]),
        )
        diag = optax_snr.snr_diagnostics(state)
        for leaf in jax.tree.leaves(diag.overall):
            chex.assert_type(leaf, jnp.float32)
        chex.assert_tree_all_finite(diag)

    def test_float64_moments_summarized_in_float64(self):
        with jax.enable_x64(True):
            grads = [jax.tree.map(lambda g: g.astype(np.float64), g) for g in random_grads(3)]
            params = jax.tree.map(lambda g: jnp.zeros(g.shape, jnp.float64), grads[0])
            state = feed(optax_snr.adam(1e-2), grads, params)
            diag = optax_snr.snr_diagnostics(state)
            chex.assert_type(diag.overall.snr.mean, jnp.float64)
            assert_summary_close(
                diag.overall, hand_diagnostics(grads, 0.9, 0.999, 1e-8)[0], rtol=1e-12
            )

    def test_large_leaves_have_sampled_quantiles(self):
        # Beyond 32,768 entries the quantiles come from a random sample: their
        # ranks are within a few tenths of a percent; mean, min and max are exact.
        rng = np.random.default_rng(1)
        grads = [
            {"big": rng.lognormal(size=300_000).astype(np.float32), "small": g["out"]}
            for g in random_grads(2)
        ]
        diag = jax.jit(optax_snr.snr_diagnostics)(feed(optax_snr.adam(1e-2), grads))
        overall, per_leaf = hand_diagnostics(grads, 0.9, 0.999, 1e-8)
        for got, values in ((diag.overall, overall), (diag.per_leaf["big"], per_leaf["big"])):
            for quantity, x in values.items():
                stats = getattr(got, quantity)
                mean, low, _, _, _, high = hand_stats(x)
                np.testing.assert_allclose(
                    [stats.mean, stats.min, stats.max], [mean, low, high], rtol=3e-5
                )
                for level, value in zip(
                    (0.1, 0.5, 0.9), (stats.q10, stats.median, stats.q90), strict=True
                ):
                    rank = np.mean(np.ravel(x) <= float(value))
                    assert abs(rank - level) < 0.01, (quantity, level, rank)

    def test_snr_falls_as_a_noisy_problem_converges(self):
        # The SNR reading: near the optimum only noise is left, so the SNR drops
        # well below its early value while the noise stays of the same order.
        key = jax.random.PRNGKey(0)
        tx = optax_snr.adam(0.05)
        params = jnp.full((256,), 5.0)
        state = tx.init(params)

        @jax.jit
        def step(params, state, key):
            grads = params + jax.random.normal(key, params.shape)  # 0.5 |p|^2 + noise
            updates, state = tx.update(grads, state)
            return optax.apply_updates(params, updates), state

        early = None
        for i, k in enumerate(jax.random.split(key, 400)):
            params, state = step(params, state, k)
            if i == 9:
                early = optax_snr.snr_diagnostics(state).overall
        late = optax_snr.snr_diagnostics(state).overall
        assert float(late.snr.median) < 0.3 * float(early.snr.median)
        assert float(late.signal.mean) < 0.3 * float(early.signal.mean)
        assert 0.5 < float(late.noise.median) < 2.0  # the unit-variance noise stays


class FlattenDiagnosticsTest(absltest.TestCase):
    def test_compact_by_default(self):
        state = feed(optax_snr.adam(1e-2), random_grads(2))
        diag = optax_snr.snr_diagnostics(state)
        row = optax_snr.flatten_diagnostics(diag)
        # 1 count + 3 quantities x 6 statistics, overall only.
        assert len(row) == 1 + 18
        assert row["count"] == 2.0
        assert row["snr/median"] == float(diag.overall.snr.median)
        assert all(isinstance(v, float) for v in row.values())

    def test_per_leaf_on_request(self):
        state = feed(optax_snr.adam(1e-2), random_grads(2))
        diag = optax_snr.snr_diagnostics(state)
        row = optax_snr.flatten_diagnostics(diag, per_leaf=True)
        assert row["dense/kernel/noise/q90"] == float(diag.per_leaf["dense/kernel"].noise.q90)
        assert len(row) == 1 + 18 * 4  # and for each of the 3 leaves

    def test_with_noise_scale(self):
        state = feed(optax_snr.adam(1e-2), random_grads(5))
        diag = optax_snr.snr_diagnostics(state)
        scale = optax_snr.noise_scale(state, batch_size=16)
        row = optax_snr.flatten_diagnostics(diag, scale)
        assert len(row) == 1 + 18 + 3
        assert row["noise_scale/b_simple"] == float(scale.b_simple)
        row = optax_snr.flatten_diagnostics(diag, scale, per_leaf=True)
        assert len(row) == 1 + 21 * 4
        assert row["out/noise_scale/trace_sigma"] == float(scale.per_leaf["out"].trace_sigma)
        only = optax_snr.flatten_diagnostics(None, scale)
        assert set(only) == {"count", *(f"noise_scale/{k}" for k in scale._fields[1:4])}

    def test_nothing_to_flatten(self):
        with pytest.raises(ValueError, match="diagnostics"):
            optax_snr.flatten_diagnostics(None)


def test_docstring_has_math_and_example():
    assert (
        "Example" in optax_snr.snr_diagnostics.__doc__
        and ".. math::" in optax_snr.snr_diagnostics.__doc__
    )


if __name__ == "__main__":
    absltest.main()
