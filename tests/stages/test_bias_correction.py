"""bias_correction: debiasing the moments and owning the step count."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_snr


def _moments(mu, nu, grad):
    return optax_snr.Moments(mu=jnp.asarray(mu), nu=jnp.asarray(nu), grad=jnp.asarray(grad))


class BiasCorrectionTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_closed_form_over_three_steps(self):
        # The factor 1 - b^t is formed in float32, as Optax does. With b2 = 0.999
        # it loses ~5 digits to cancellation (1 - 0.999^2 = 0.002), so the
        # closed form at float32 tolerance uses decays whose powers are exact;
        # the default decays are covered by bit-exact parity with optax.adam.
        b1, b2 = 0.5, 0.75
        stage = optax_snr.bias_correction(b1, b2)
        state = stage.init(None)
        update = self.variant(stage.update)
        m, v = np.array([0.3, -0.2]), np.array([0.01, 0.04])
        for t in (1, 2, 3):
            corrected, state = update(_moments(m, v, m), state)
            np.testing.assert_allclose(corrected.mu, m / (1 - b1**t), rtol=1e-6)
            np.testing.assert_allclose(corrected.nu, v / (1 - b2**t), rtol=1e-6)
            self.assertEqual(int(state.count), t)
        chex.assert_type(state.count, jnp.int32)

    @chex.variants(with_jit=True, without_jit=True)
    def test_constant_gradient_is_recovered_exactly(self):
        # After t steps of a constant g the EMA is (1 - b1^t) g: debiasing gives g.
        # Decays exact in binary, so float32 rounding of b does not enter.
        chain = optax.chain(
            optax_snr.ema_moments(0.75, 0.875), optax_snr.bias_correction(0.75, 0.875)
        )
        g = jnp.array([0.5, -4.0])
        state = chain.init(g)
        update = self.variant(chain.update)
        for _ in range(3):
            corrected, state = update(g, state)
            np.testing.assert_allclose(corrected.mu, g, rtol=1e-6)
            np.testing.assert_allclose(corrected.nu, g**2, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_nesterov_closed_form(self):
        b1 = 0.9
        stage = optax_snr.bias_correction(b1, 0.999, nesterov=True)
        state = stage.init(None)
        m, g = np.array([0.3, -0.2]), np.array([1.0, 2.0])
        corrected, state = self.variant(stage.update)(_moments(m, m**2, g), state)
        expected = b1 * m / (1 - b1**2) + (1 - b1) * g / (1 - b1)
        np.testing.assert_allclose(corrected.mu, expected, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_count_saturates_instead_of_wrapping(self):
        stage = optax_snr.bias_correction()
        state = optax_snr.BiasCorrectionState(count=jnp.asarray(jnp.iinfo(jnp.int32).max))
        corrected, state = self.variant(stage.update)(_moments([0.1], [0.01], [0.1]), state)
        self.assertEqual(int(state.count), jnp.iinfo(jnp.int32).max)
        chex.assert_tree_all_finite(corrected)
        np.testing.assert_allclose(corrected.mu, [0.1], rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_bfloat16_moments_are_debiased_in_float32(self):
        stage = optax_snr.bias_correction(0.9, 0.999)
        mom = optax_snr.Moments(
            mu=jnp.array([0.1], jnp.bfloat16),
            nu=jnp.array([0.001], jnp.bfloat16),
            grad=jnp.array([1.0], jnp.bfloat16),
        )
        corrected, _ = self.variant(stage.update)(mom, stage.init(None))
        chex.assert_type(corrected.mu, jnp.float32)
        np.testing.assert_allclose(corrected.nu, np.float32(mom.nu[0]) / (1 - 0.999), rtol=1e-4)

    def test_matches_optax_bias_correction(self):
        mu = {"a": jnp.linspace(-1.0, 1.0, 5), "b": jnp.ones((2, 2))}
        stage = optax_snr.bias_correction(0.9, 0.999)
        state = stage.init(None)
        step = jax.jit(stage.update)
        for _ in range(4):
            corrected, state = step(optax_snr.Moments(mu, mu, mu), state)
        with jax.numpy_dtype_promotion("standard"):
            expected = jax.jit(optax.tree.bias_correction)(mu, 0.9, state.count)
        chex.assert_trees_all_equal(corrected.mu, expected)

    def test_requires_moments(self):
        stage = optax_snr.bias_correction()
        with pytest.raises(TypeError, match="expects the Moments produced by ema_moments"):
            stage.update(jnp.ones(2), stage.init(None))

    def test_rejects_bad_arguments(self):
        with pytest.raises(ValueError, match=r"b1 must be in \[0, 1\)"):
            optax_snr.bias_correction(b1=1.0)
        with pytest.raises(TypeError, match="nesterov must be a bool"):
            optax_snr.bias_correction(nesterov="yes")
