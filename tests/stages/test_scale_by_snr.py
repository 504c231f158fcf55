"""scale_by_snr: the ratio m_hat / (sqrt(v_hat + eps_root) + eps)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import optax_snr


class ScaleBySnrTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_closed_form(self):
        eps, eps_root = 1e-3, 1e-4
        stage = optax_snr.scale_by_snr(eps, eps_root)
        m, v = np.array([0.3, -0.2, 0.0]), np.array([0.09, 0.01, 0.0])
        mom = optax_snr.Moments(jnp.asarray(m), jnp.asarray(v), jnp.zeros(3))
        ratio, state = self.variant(stage.update)(mom, stage.init(None))
        np.testing.assert_allclose(ratio, m / (np.sqrt(v + eps_root) + eps), rtol=1e-6)
        self.assertEqual(state, stage.init(None))

    @chex.variants(with_jit=True, without_jit=True)
    def test_consistent_signal_gives_unit_ratio(self):
        # |m_hat| == sqrt(v_hat): a gradient that never changes gets a full step.
        stage = optax_snr.scale_by_snr(eps=0.0)
        m = jnp.array([2.0, -0.5])
        mom = optax_snr.Moments(m, m**2, m)
        ratio, _ = self.variant(stage.update)(mom, stage.init(None))
        np.testing.assert_allclose(ratio, jnp.sign(m), rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("float16", jnp.float16), ("bfloat16", jnp.bfloat16), ("float32", jnp.float32)
    )
    def test_output_in_gradient_dtype_and_zero_is_finite(self, dtype):
        stage = optax_snr.scale_by_snr()
        z = jnp.zeros(3, dtype)
        ratio, _ = self.variant(stage.update)(optax_snr.Moments(z, z, z), stage.init(None))
        chex.assert_type(ratio, dtype)
        chex.assert_tree_all_finite(ratio)

    def test_requires_moments(self):
        stage = optax_snr.scale_by_snr()
        with pytest.raises(TypeError, match="scale_by_snr expects the Moments"):
            stage.update({"w": jnp.ones(2)}, stage.init(None))

    def test_rejects_negative_eps(self):
        with pytest.raises(ValueError, match=r"eps must be in \[0, inf\)"):
            optax_snr.scale_by_snr(eps=-1.0)
        with pytest.raises(ValueError, match=r"eps_root must be in \[0, inf\)"):
            optax_snr.scale_by_snr(eps_root=float("nan"))

    def test_no_retrace(self):
        stage = optax_snr.scale_by_snr()

        @jax.jit
        @chex.assert_max_traces(n=1)
        def step(m):
            return stage.update(m, stage.init(None))[0]

        for i in range(3):
            x = jnp.full((2,), float(i + 1))
            step(optax_snr.Moments(x, x, x))
