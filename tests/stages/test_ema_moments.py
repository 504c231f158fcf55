"""ema_moments: the signal and noise EMAs."""

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


class EmaMomentsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_closed_form_over_three_steps(self):
        b1, b2 = 0.8, 0.9
        stage = optax_snr.ema_moments(b1, b2)
        state = stage.init(jnp.zeros(3))
        update = self.variant(stage.update)
        for g in GRADS:
            moments, state = update(g, state)
        g1, g2, g3 = (np.asarray(g, np.float64) for g in GRADS)
        # m_3 = (1-b1) (g3 + b1 g2 + b1^2 g1), and likewise for v with g^2.
        m3 = (1 - b1) * (g3 + b1 * g2 + b1**2 * g1)
        v3 = (1 - b2) * (g3**2 + b2 * g2**2 + b2**2 * g1**2)
        np.testing.assert_allclose(moments.mu, m3, rtol=1e-6)
        np.testing.assert_allclose(moments.nu, v3, rtol=1e-6)
        chex.assert_trees_all_equal(state.mu, moments.mu)
        chex.assert_trees_all_equal(state.nu, moments.nu)
        chex.assert_trees_all_equal(moments.grad, GRADS[-1])

    def test_equals_optax_moment_updates(self):
        params = helpers.multi_leaf_params()
        stage = optax_snr.ema_moments(0.9, 0.999)
        state = stage.init(params)
        mu = nu = optax.tree.zeros_like(params)
        step = jax.jit(stage.update)
        for i in range(10):
            g = helpers.noisy_grad(params, jnp.asarray(i, jnp.int32))
            moments, state = step(g, state)
            with helpers.standard_promotion():
                mu = jax.jit(optax.tree.update_moment, static_argnums=(2, 3))(g, mu, 0.9, 1)
                nu = jax.jit(optax.tree.update_moment_per_elem_norm, static_argnums=(2, 3))(
                    g, nu, 0.999, 2
                )
        helpers.assert_trees_bitwise_equal(moments.mu, mu)
        helpers.assert_trees_bitwise_equal(moments.nu, nu)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("float32", jnp.float32, None, None),
        ("bfloat16", jnp.bfloat16, None, None),
        ("bf16_params_f32_moments", jnp.bfloat16, jnp.float32, jnp.float32),
        ("f32_params_bf16_mu", jnp.float32, jnp.bfloat16, None),
    )
    def test_dtypes_are_kept(self, param_dtype, mu_dtype, nu_dtype):
        params = jnp.ones((4,), param_dtype)
        stage = optax_snr.ema_moments(mu_dtype=mu_dtype, nu_dtype=nu_dtype)
        state = stage.init(params)
        chex.assert_type(state.mu, mu_dtype or param_dtype)
        chex.assert_type(state.nu, nu_dtype or param_dtype)
        _, new_state = self.variant(stage.update)(params, state)
        chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)

    def test_no_retrace(self):
        helpers.assert_steps_without_retrace(
            optax_snr.ema_moments(), {"a": jnp.ones(3), "b": jnp.ones((2, 2))}
        )

    def test_none_update_keeps_the_buffer(self):
        stage = optax_snr.ema_moments()
        state = stage.init({"a": jnp.ones(2), "b": jnp.ones(2)})
        moments, new_state = stage.update({"a": jnp.ones(2), "b": None}, state)
        assert moments.mu["b"] is None
        chex.assert_trees_all_equal(new_state.mu["b"], state.mu["b"])

    def test_rejects_bad_hyperparameters(self):
        with pytest.raises(ValueError, match=r"b2 must be in \[0, 1\)"):
            optax_snr.ema_moments(b2=1.0)
        with pytest.raises(TypeError, match="mu_dtype must be a floating"):
            optax_snr.ema_moments(mu_dtype=jnp.int32)
