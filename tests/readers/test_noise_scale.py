"""Tests for optax_snr.noise_scale: the gradient noise scale read from Adam's state.

The validation feeds synthetic mini-batch gradients ``g_t ~ N(G, diag(sigma^2)/B)``
with known ``G`` and per-example ``sigma``, so the truth ``B_simple =
sum(sigma^2) / |G|^2`` is known, and checks the estimate from the optimizer
state against it from ``B_simple = B/10`` to ``100 B``.
"""

import functools

import chex
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import optax_snr

BATCH = 32
STEPS = 2000
TOLERANCE = 0.10  # The bar; the measured errors are 0.1% to 4%.


def optimizer(name):
    if name == "adamw":
        return optax_snr.adamw(1e-3, weight_decay=1e-2)
    if name == "optax.adam":
        return optax.adam(1e-3)
    return optax_snr.adam(1e-3)


@functools.cache
def synthetic(name, ratio, seed=0):
    """The state after ``STEPS`` synthetic mini-batch gradients, and the truth.

    ``G`` is scaled so that the true noise scale is ``ratio * BATCH``. The
    estimate's statistical error grows with the ratio (|G|^2 is then a small
    difference of two large sums) and shrinks as 1/sqrt(size), so the largest
    ratio gets more coordinates.
    """
    size = 1 << 16 if ratio >= 100 else 1 << 13
    rng = np.random.default_rng(seed)
    sigma = rng.uniform(0.5, 1.5, size).astype(np.float32)  # per-example std
    g = rng.normal(size=size).astype(np.float32)
    g *= np.float32(np.sqrt((sigma**2).sum() / (g**2).sum() / (ratio * BATCH)))
    truth = {"b_simple": float((sigma**2).sum() / (g**2).sum())}
    quarter = size // 4
    split = lambda x: {"a": jnp.asarray(x[:quarter]), "b": jnp.asarray(x[quarter:]).reshape(-1, 3)}
    mean, std = split(g), split(sigma)
    for leaf in ("a", "b"):
        truth[leaf] = float(jnp.sum(std[leaf] ** 2) / jnp.sum(mean[leaf] ** 2))
    truth["trace_sigma"] = float((sigma**2).sum())
    truth["grad_sq_norm"] = float((g**2).sum())
    tx = optimizer(name)
    params = jax.tree.map(jnp.zeros_like, mean)
    scale = jnp.float32(1 / np.sqrt(BATCH))

    @jax.jit
    def run(key):
        def step(state, key):
            keys = dict(zip(("a", "b"), jax.random.split(key), strict=True))
            grads = {
                k: mean[k] + std[k] * scale * jax.random.normal(keys[k], mean[k].shape)
                for k in mean
            }
            return tx.update(grads, state, params)[1], None

        return jax.lax.scan(step, tx.init(params), jax.random.split(key, STEPS))[0]

    with helpers.standard_promotion() if name.startswith("optax.") else _strict():
        state = run(jax.random.PRNGKey(seed))
    return state, truth


def _strict():
    return jax.numpy_dtype_promotion("strict")


class SyntheticAccuracyTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(name=("adam", "adamw"), ratio=(0.1, 1.0, 10.0, 100.0))
    def test_within_ten_percent_of_the_truth(self, name, ratio):
        state, truth = synthetic(name, ratio)
        est = self.variant(lambda s: optax_snr.noise_scale(s, BATCH))(state)
        assert int(est.count) == STEPS
        for field in ("b_simple", "trace_sigma", "grad_sq_norm"):
            error = float(getattr(est, field)) / truth[field] - 1
            assert abs(error) < TOLERANCE, (field, error)
        assert abs(truth["b_simple"] / (ratio * BATCH) - 1) < 1e-4

    @parameterized.parameters(1.0, 10.0)
    def test_per_leaf_consistent_with_overall(self, ratio):
        state, truth = synthetic("adam", ratio)
        est = optax_snr.noise_scale(state, BATCH)
        assert set(est.per_leaf) == {"a", "b"}
        leaves = est.per_leaf.values()
        np.testing.assert_allclose(
            float(est.trace_sigma), sum(float(x.trace_sigma) for x in leaves), rtol=1e-5
        )
        np.testing.assert_allclose(
            float(est.grad_sq_norm), sum(float(x.grad_sq_norm) for x in leaves), rtol=1e-5
        )
        np.testing.assert_allclose(
            float(est.b_simple), float(est.trace_sigma / est.grad_sq_norm), rtol=1e-6
        )
        for leaf, x in est.per_leaf.items():
            np.testing.assert_allclose(
                float(x.b_simple), float(x.trace_sigma / x.grad_sq_norm), rtol=1e-6
            )
            assert abs(float(x.b_simple) / truth[leaf] - 1) < TOLERANCE, leaf

    def test_optax_adam_state_gives_the_same_estimate(self):
        ours, _ = synthetic("adam", 1.0)
        theirs, _ = synthetic("optax.adam", 1.0)
        chex.assert_trees_all_close(
            optax_snr.noise_scale(ours, BATCH), optax_snr.noise_scale(theirs, BATCH), rtol=1e-4
        )

    def test_traced_batch_size(self):
        state, _ = synthetic("adam", 1.0)
        est = jax.jit(optax_snr.noise_scale)(state, jnp.int32(BATCH))
        chex.assert_trees_all_close(est, optax_snr.noise_scale(state, BATCH), rtol=1e-6)


def feed(tx, grads, params=None, promote=False):
    params = jnp.zeros_like(grads[0]) if params is None else params
    state = tx.init(params)
    for g in grads:
        with helpers.standard_promotion() if promote else _strict():
            _, state = tx.update(g, state, params)
    return state


class SpecialValuesTest(parameterized.TestCase):
    def test_noise_dominated_is_inf_never_negative(self):
        # Gradients that flip sign every step: no consistent direction at all.
        # The |G|^2 estimate is negative, so b_simple is inf and |G|^2 is 0.
        grads = [jnp.full((50,), (-1.0) ** t, jnp.float32) for t in range(200)]
        est = optax_snr.noise_scale(feed(optax_snr.adam(1e-3), grads), 8)
        assert float(est.b_simple) == np.inf
        assert float(est.grad_sq_norm) == 0.0
        assert float(est.trace_sigma) > 0
        assert float(est.per_leaf["<root>"].b_simple) == np.inf

    def test_noiseless_is_zero(self):
        grads = [jnp.full((5,), 0.5, jnp.float32)] * 20
        est = optax_snr.noise_scale(feed(optax_snr.adam(1e-3), grads), 8)
        np.testing.assert_allclose(float(est.grad_sq_norm), 5 * 0.25, rtol=1e-5)
        # Only float32 rounding of v_hat - m_hat^2 is left as noise.
        assert 0.0 <= float(est.b_simple) < 1e-3

    @parameterized.parameters(0, 1)
    def test_before_the_second_step_is_nan(self, num_steps):
        grads = [jnp.ones(3, jnp.float32)] * num_steps
        est = optax_snr.noise_scale(feed(optax_snr.adam(1e-3), grads, jnp.zeros(3)), 8)
        assert int(est.count) == num_steps
        for x in jax.tree.leaves(est)[1:]:
            assert np.isnan(float(x))

    def test_amsgrad_reads_the_ema_not_the_maximum(self):
        grads = [
            jnp.asarray(np.random.default_rng(t).normal(size=20), jnp.float32) for t in range(6)
        ]
        ams = optax_snr.noise_scale(feed(optax_snr.amsgrad(1e-3), grads), 4)
        adam = optax_snr.noise_scale(feed(optax_snr.adam(1e-3), grads), 4)
        chex.assert_trees_all_close(ams, adam, rtol=1e-6)
        ams_optax = optax_snr.noise_scale(feed(optax.amsgrad(1e-3), grads, promote=True), 4)
        chex.assert_trees_all_close(ams_optax, adam, rtol=1e-5)

    def test_reads_b1_and_b2_from_inject_hyperparams(self):
        grads = [
            jnp.asarray(np.random.default_rng(t).normal(size=20), jnp.float32) for t in range(6)
        ]
        injected = optax.inject_hyperparams(optax_snr.adam)(1e-3, b1=0.5, b2=0.8)
        plain = optax_snr.adam(1e-3, b1=0.5, b2=0.8)
        chex.assert_trees_all_close(
            optax_snr.noise_scale(feed(injected, grads), 4),
            optax_snr.noise_scale(feed(plain, grads), 4, b1=0.5, b2=0.8),
            rtol=1e-5,
        )


class BadInputTest(parameterized.TestCase):
    def state(self):
        return feed(optax_snr.adam(1e-3), [jnp.ones(3, jnp.float32)] * 3)

    @parameterized.parameters((2.5,), ("8",), (None,), (True,), (np.float32(8),), (np.array([8]),))
    def test_batch_size_not_an_integer(self, batch_size):
        with pytest.raises(TypeError, match="batch_size"):
            optax_snr.noise_scale(self.state(), batch_size)

    @parameterized.parameters(0, -4, np.int64(0))
    def test_batch_size_not_positive(self, batch_size):
        with pytest.raises(ValueError, match="batch_size"):
            optax_snr.noise_scale(self.state(), batch_size)

    def test_traced_float_batch_size(self):
        with pytest.raises(TypeError, match="batch_size"):
            jax.jit(optax_snr.noise_scale)(self.state(), jnp.float32(8))

    @parameterized.parameters(("b1", 1.0), ("b1", -0.1), ("b1", 0.0), ("b2", 1.5), ("b2", np.nan))
    def test_hyperparameter_out_of_range(self, name, value):
        with pytest.raises(ValueError, match=name):
            optax_snr.noise_scale(self.state(), 8, **{name: value})

    def test_hyperparameter_not_a_number(self):
        with pytest.raises(TypeError, match="b2"):
            optax_snr.noise_scale(self.state(), 8, b2="0.9")

    def test_state_without_moments(self):
        state = optax.sgd(0.1, momentum=0.9).init(jnp.zeros(3))
        with pytest.raises(ValueError, match="holds no moments"):
            optax_snr.noise_scale(state, 8)

    @parameterized.parameters(
        (lambda: optax_snr.adabelief(1e-3),),
        (optax_snr.centered_moments,),  # AdaBelief's stage, alone
        (optax_snr.scale_by_adopt,),  # ADOPT's stage
    )
    def test_moments_that_mean_something_else(self, make):
        state = feed(make(), [jnp.ones(3, jnp.float32)] * 3)
        with pytest.raises(ValueError, match=r"AdaBelief|ADOPT"):
            optax_snr.noise_scale(state, 8)

    def test_optax_adabelief_refused(self):
        state = feed(optax.adabelief(1e-3), [jnp.ones(3, jnp.float32)] * 3, promote=True)
        with pytest.raises(ValueError, match="AdaBelief"):
            optax_snr.noise_scale(state, 8)


def test_docstring_states_the_estimator():
    doc = optax_snr.noise_scale.__doc__
    for words in (".. math::", "Lag", "inf", "Assumptions", "Example", "k_t"):
        assert words in doc, words
