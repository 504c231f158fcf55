"""max_noise: AMSGrad's running maximum of the noise."""

import chex
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import optax_snr


def _moments(nu):
    nu = jnp.asarray(nu)
    return optax_snr.Moments(mu=jnp.ones_like(nu), nu=nu, grad=jnp.ones_like(nu))


class MaxNoiseTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_closed_form_over_three_steps(self):
        stage = optax_snr.max_noise()
        state = stage.init(jnp.zeros(3))
        update = self.variant(stage.update)
        noises = [[0.5, 2.0, 0.0], [1.0, 1.0, 0.25], [0.75, 3.0, 0.125]]
        expected = np.zeros(3)
        for nu in noises:
            out, state = update(_moments(nu), state)
            expected = np.maximum(expected, nu)
            np.testing.assert_array_equal(out.nu, expected)
            np.testing.assert_array_equal(state.nu_max, expected)
            np.testing.assert_array_equal(out.mu, 1.0)  # the signal passes through

    def test_chain_equals_optax_scale_by_amsgrad(self):
        params = helpers.multi_leaf_params()
        ours = optax.chain(
            optax_snr.ema_moments(0.9, 0.99),
            optax_snr.bias_correction(0.9, 0.99),
            optax_snr.max_noise(),
            optax_snr.scale_by_snr(1e-8, 1e-10),
            optax.scale(-1e-2),
        )
        with helpers.standard_promotion():
            reference = optax.chain(
                optax.scale_by_amsgrad(0.9, 0.99, 1e-8, 1e-10), optax.scale(-1e-2)
            )
            expected, expected_state = helpers.run_optimizer(reference, params, 100)
        got, state = helpers.run_optimizer(ours, params, 100)
        helpers.assert_trees_bitwise_equal(got, expected)
        helpers.assert_trees_bitwise_equal(
            optax.tree.get(state, "nu_max"), optax.tree.get(expected_state, "nu_max")
        )

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(("float32", jnp.float32), ("bfloat16", jnp.bfloat16))
    def test_dtype_kept_and_full_precision_passed_on(self, dtype):
        stage = optax_snr.max_noise()
        state = stage.init(jnp.zeros(2, dtype))
        out, new_state = self.variant(stage.update)(_moments(jnp.array([1e-3, 2.0])), state)
        chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
        chex.assert_type(out.nu, jnp.float32)  # the next stage divides in float32

    def test_no_retrace(self):
        stage = optax_snr.max_noise()
        state = stage.init({"a": jnp.zeros(3)})

        @jax.jit
        @chex.assert_max_traces(n=1)
        def step(m, s):
            return stage.update(m, s)[1]

        for i in range(5):
            nu = {"a": jnp.full(3, float(i))}
            state = step(optax_snr.Moments(mu=nu, nu=nu, grad=nu), state)
        np.testing.assert_array_equal(state.nu_max["a"], 4.0)

    def test_none_update_keeps_the_buffer(self):
        stage = optax_snr.max_noise()
        state = stage.init({"a": jnp.zeros(2), "b": jnp.zeros(2)})
        state = state._replace(nu_max={"a": jnp.zeros(2), "b": jnp.ones(2)})
        nu = {"a": jnp.ones(2), "b": None}
        out, new_state = stage.update(optax_snr.Moments(mu=nu, nu=nu, grad=nu), state)
        assert out.nu["b"] is None
        chex.assert_trees_all_equal(new_state.nu_max["b"], jnp.ones(2))

    def test_rejects_plain_updates(self):
        stage = optax_snr.max_noise()
        with pytest.raises(TypeError, match="max_noise expects the Moments"):
            stage.update(jnp.ones(2), stage.init(jnp.ones(2)))
