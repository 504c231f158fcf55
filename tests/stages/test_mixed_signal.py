"""mixed_signal: AdEMAMix's slow EMA added to the bias-corrected signal."""

import chex
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_snr

GRADS = [jnp.array([1.0, -2.0]), jnp.array([3.0, 0.5]), jnp.array([-1.0, 1.0])]


def _chain(b1, b2, b3, alpha, **kwargs):
    return optax.chain(
        optax_snr.ema_moments(b1, b2), optax_snr.mixed_signal(b1, b2, b3, alpha, **kwargs)
    )


class MixedSignalTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_closed_form_over_three_steps(self):
        # Decays exact in binary, so the float32 bias correction is exact too.
        b1, b2, b3, alpha = 0.5, 0.75, 0.875, 3.0
        chain = _chain(b1, b2, b3, alpha)
        state = chain.init(jnp.zeros(2))
        update = self.variant(chain.update)
        m = v = m2 = np.zeros(2)
        for t, g in enumerate(GRADS, start=1):
            out, state = update(g, state)
            g = np.asarray(g, np.float64)
            m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g**2
            m2 = b3 * m2 + (1 - b3) * g  # never bias-corrected
            np.testing.assert_allclose(out.mu, m / (1 - b1**t) + alpha * m2, rtol=1e-6)
            np.testing.assert_allclose(out.nu, v / (1 - b2**t), rtol=1e-6)
            np.testing.assert_allclose(state[1].m2, m2, rtol=1e-6)
            self.assertEqual(int(state[1].count), t)

    @chex.variants(with_jit=True, without_jit=True)
    def test_schedules_read_the_step_before_it_is_counted(self):
        seen = []
        b3 = lambda count: 0.5 + 0.0 * count.astype(jnp.float32)
        alpha = lambda count: count.astype(jnp.float32)  # alpha_t = t - 1
        chain = _chain(0.5, 0.5, b3, alpha)
        state = chain.init(jnp.zeros(1))
        update = self.variant(chain.update)
        for _ in range(3):
            out, state = update(jnp.ones(1), state)
            seen.append(float(out.mu[0]))
        # m_hat = 1 for a constant gradient; m2_t = 1 - 0.5^t; alpha_t = t - 1.
        np.testing.assert_allclose(seen, [1.0, 1.0 + 1 * 0.75, 1.0 + 2 * 0.875], rtol=1e-6)

    def test_chain_equals_optax_scale_by_ademamix(self):
        params = helpers.multi_leaf_params()
        ours = optax.chain(
            _chain(0.9, 0.999, 0.99, 6.0), optax_snr.scale_by_snr(1e-8, 0.0), optax.scale(-1e-2)
        )
        with helpers.standard_promotion():
            reference = optax.chain(
                optax.contrib.scale_by_ademamix(0.9, 0.999, 0.99, 6.0), optax.scale(-1e-2)
            )
            expected, expected_state = helpers.run_optimizer(reference, params, 100)
        got, state = helpers.run_optimizer(ours, params, 100)
        helpers.assert_trees_bitwise_equal(got, expected)
        helpers.assert_trees_bitwise_equal(
            optax.tree.get(state, "m2"), optax.tree.get(expected_state, "m2")
        )
        assert int(optax.tree.get(state, "count")) == 100

    def test_mu_dtype_and_no_retrace(self):
        chain = _chain(0.9, 0.999, 0.9999, 5.0, mu_dtype=jnp.bfloat16)
        params = {"a": jnp.ones(3), "b": jnp.ones((2, 2))}
        state = chain.init(params)
        chex.assert_type(state[1].m2["a"], jnp.bfloat16)

        @jax.jit
        @chex.assert_max_traces(n=1)
        def step(g, s):
            return chain.update(g, s)[1]

        for _ in range(5):
            new_state = step(params, state)
            chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
            state = new_state

    def test_rejects_bad_hyperparameters_and_plain_updates(self):
        with pytest.raises(ValueError, match=r"b3 must be in \[0, 1\)"):
            optax_snr.mixed_signal(b3=1.0)
        with pytest.raises(ValueError, match=r"alpha must be in \[0, inf\)"):
            optax_snr.mixed_signal(alpha=-1.0)
        with pytest.raises(ValueError, match=r"b2 must be in \[0, 1\)"):
            optax_snr.mixed_signal(b2=1.0)
        stage = optax_snr.mixed_signal()
        with pytest.raises(TypeError, match="mixed_signal expects the Moments"):
            stage.update(jnp.ones(2), stage.init(jnp.ones(2)))
