"""centered_moments: the signal and AdaBelief's centered noise."""

import chex
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import optax_snr

GRADS = [jnp.array([1.0, -2.0, 0.5]), jnp.array([3.0, 0.0, -0.5]), jnp.array([-1.0, 1.0, 2.0])]


class CenteredMomentsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_closed_form_over_three_steps(self):
        b1, b2, eps_root = 0.8, 0.9, 1e-3
        stage = optax_snr.centered_moments(b1, b2, eps_root)
        state = stage.init(jnp.zeros(3))
        update = self.variant(stage.update)
        m = s = np.zeros(3)
        for g in GRADS:
            moments, state = update(g, state)
            g = np.asarray(g, np.float64)
            m = b1 * m + (1 - b1) * g
            s = b2 * s + (1 - b2) * (g - m) ** 2 + eps_root
        np.testing.assert_allclose(moments.mu, m, rtol=1e-6)
        np.testing.assert_allclose(moments.nu, s, rtol=1e-6)
        chex.assert_trees_all_equal(state.nu, moments.nu)
        chex.assert_trees_all_equal(moments.grad, GRADS[-1])

    def test_a_constant_gradient_has_no_noise(self):
        # Adam's raw second moment sees g^2 as noise; the centered one sees
        # only the deviation, which vanishes as the signal settles on g.
        chain = optax.chain(
            optax_snr.centered_moments(0.5, 0.5, eps_root=0.0),
            optax_snr.bias_correction(0.5, 0.5),
        )
        g = jnp.array([3.0, -2.0])
        state = chain.init(g)
        for _ in range(40):
            corrected, state = chain.update(g, state)
        np.testing.assert_allclose(corrected.mu, g, rtol=1e-6)
        np.testing.assert_array_less(corrected.nu, 1e-10)

    def test_what_the_noise_estimates_for_iid_gradients(self):
        # For i.i.d. gradients of variance sigma^2, once the EMAs settle,
        # E[(g_t - m_t)^2] = 2 b1^2 sigma^2 / (1 + b1): the docstring's claim.
        b1, b2, sigma = 0.9, 0.99, 2.0
        stage = optax_snr.centered_moments(b1, b2, eps_root=0.0)
        key = jax.random.PRNGKey(0)
        mean = jnp.linspace(-1.0, 1.0, 20_000)  # a signal that centering removes

        def step(state, k):
            g = mean + sigma * jax.random.normal(k, mean.shape)
            return stage.update(g, state)[1], None

        state, _ = jax.lax.scan(step, stage.init(mean), jax.random.split(key, 2_000))
        expected = 2 * b1**2 * sigma**2 / (1 + b1)  # 3.41, against sigma^2 = 4
        np.testing.assert_allclose(float(jnp.mean(state.nu)), expected, rtol=0.02)

    def test_equals_optax_scale_by_belief(self):
        params = helpers.multi_leaf_params()
        for nesterov in (False, True):
            ours = optax.chain(
                optax_snr.centered_moments(0.9, 0.99, 1e-12),
                optax_snr.bias_correction(0.9, 0.99, nesterov=nesterov),
                optax_snr.scale_by_snr(1e-8, eps_root=0.0),
                optax.scale(-1e-2),
            )
            with helpers.standard_promotion():
                reference = optax.chain(
                    optax.scale_by_belief(0.9, 0.99, 1e-8, 1e-12, nesterov=nesterov),
                    optax.scale(-1e-2),
                )
                expected, expected_state = helpers.run_optimizer(reference, params, 100)
            got, state = helpers.run_optimizer(ours, params, 100)
            helpers.assert_trees_bitwise_equal(got, expected)
            for name in ("mu", "nu"):
                helpers.assert_trees_bitwise_equal(
                    optax.tree.get(state, name), optax.tree.get(expected_state, name)
                )

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("float32", jnp.float32), ("bfloat16", jnp.bfloat16))
    def test_dtypes_are_kept(self, dtype):
        params = jnp.ones((4,), dtype)
        stage = optax_snr.centered_moments()
        state = stage.init(params)
        chex.assert_type(state.nu, dtype)
        _, new_state = self.variant(stage.update)(params, state)
        chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)

    def test_no_retrace(self):
        helpers.assert_steps_without_retrace(
            optax_snr.centered_moments(), {"a": jnp.ones(3), "b": jnp.ones((2, 2))}
        )

    def test_none_update_keeps_the_buffer(self):
        stage = optax_snr.centered_moments()
        state = stage.init({"a": jnp.ones(2), "b": jnp.ones(2)})
        moments, new_state = stage.update({"a": jnp.ones(2), "b": None}, state)
        assert moments.nu["b"] is None
        chex.assert_trees_all_equal(new_state.nu["b"], state.nu["b"])

    def test_rejects_bad_hyperparameters(self):
        with pytest.raises(ValueError, match=r"b1 must be in \[0, 1\)"):
            optax_snr.centered_moments(b1=1.0)
        with pytest.raises(ValueError, match=r"eps_root must be in \[0, inf\)"):
            optax_snr.centered_moments(eps_root=-1e-16)
        with pytest.raises(TypeError, match=r"\['n'\] has dtype int32"):
            optax_snr.centered_moments().init({"n": jnp.ones(2, jnp.int32)})
