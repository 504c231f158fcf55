"""scale_by_adopt: ADOPT's ratio against the previous noise, then averaged."""

import chex
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import optax_snr
from optax_snr.stages.scale_by_adopt import fourth_root

GRADS = [jnp.array([1.0, -2.0, 0.5]), jnp.array([3.0, 0.0, -0.5]), jnp.array([-1.0, 1.0, 2.0])]


def _reference(grads, b1, b2, eps, clip, nesterov):
    """ADOPT (Taniguchi et al., Algorithm 2 with clipping) in float64 NumPy."""
    m = np.zeros_like(grads[0])
    v = np.asarray(grads[0]) ** 2  # step 0 only initializes the noise
    steps = [np.zeros_like(m)]
    for t, g in enumerate(grads[1:], start=1):
        r = g / np.maximum(np.sqrt(v), eps)
        if clip is not None:
            r = np.clip(r, -clip(t), clip(t))
        m = b1 * m + (1 - b1) * r
        steps.append(b1 * m + (1 - b1) * r if nesterov else m)
        v = b2 * v + (1 - b2) * g**2
    return steps


class ScaleByAdoptTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(clipping=(True, False), nesterov=(True, False))
    def test_closed_form_over_three_steps(self, clipping, nesterov):
        b1, b2, eps = 0.8, 0.9, 1e-6
        stage = optax_snr.scale_by_adopt(b1, b2, eps, nesterov=nesterov, use_clipping=clipping)
        state = stage.init(jnp.zeros(3))
        update = self.variant(stage.update)
        clip = (lambda t: t**0.25) if clipping else None
        grads = [np.asarray(g, np.float64) for g in GRADS]
        for g, expected in zip(GRADS, _reference(grads, b1, b2, eps, clip, nesterov), strict=True):
            step, state = update(g, state)
            np.testing.assert_allclose(step, expected, rtol=1e-6, atol=1e-7)
        self.assertEqual(int(state.count), 3)

    def test_clipping_bounds_the_ratio(self):
        stage = optax_snr.scale_by_adopt(b1=0.0, clip_value_fn=lambda count: jnp.float32(0.5))
        state = stage.init(jnp.zeros(2))
        _, state = stage.update(jnp.array([1e-3, 1e-3]), state)  # tiny noise...
        step, _ = stage.update(jnp.array([1.0, -1.0]), state)  # ...then a huge ratio
        np.testing.assert_array_equal(step, [0.5, -0.5])

    def test_equals_optax_contrib_scale_by_adopt(self):
        params = helpers.multi_leaf_params()
        for kwargs in (dict(), dict(nesterov=True, use_clipping=False)):
            ours = optax.chain(optax_snr.scale_by_adopt(0.9, 0.99, **kwargs), optax.scale(-1e-2))
            with helpers.standard_promotion():
                reference = optax.chain(
                    optax.contrib.scale_by_adopt(0.9, 0.99, **kwargs), optax.scale(-1e-2)
                )
                expected, expected_state = helpers.run_optimizer(reference, params, 100)
            got, state = helpers.run_optimizer(ours, params, 100)
            helpers.assert_trees_bitwise_equal(got, expected)
            for name in ("mu", "nu", "count"):
                helpers.assert_trees_bitwise_equal(
                    optax.tree.get(state, name), optax.tree.get(expected_state, name)
                )

    def test_default_clip_value_is_optax_default(self):
        steps = jnp.arange(10, dtype=jnp.int32)
        with helpers.standard_promotion():
            expected = steps**0.25
        helpers.assert_trees_bitwise_equal(fourth_root(steps), expected)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("float32", jnp.float32, None),
        ("bfloat16", jnp.bfloat16, None),
        ("float16", jnp.float16, None),
        ("f32_params_bf16_mu", jnp.float32, jnp.bfloat16),
    )
    def test_dtypes_are_kept(self, dtype, mu_dtype):
        params = jnp.ones((4,), dtype)
        stage = optax_snr.scale_by_adopt(mu_dtype=mu_dtype)
        state = stage.init(params)
        chex.assert_type(state.mu, mu_dtype or dtype)
        update = self.variant(stage.update)
        for _ in range(2):
            step, new_state = update(params, state)
            chex.assert_type(step, dtype)
            chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
            state = new_state
        chex.assert_tree_all_finite(step)

    def test_no_retrace_and_none_leaves(self):
        stage = optax_snr.scale_by_adopt()
        params = {"a": jnp.ones(3), "frozen": None}
        state = stage.init(params)

        @jax.jit
        @chex.assert_max_traces(n=1)
        def step(g, s):
            return stage.update(g, s)

        for _ in range(5):
            updates, state = step(params, state)
        assert updates["frozen"] is None

    def test_rejects_bad_arguments(self):
        with pytest.raises(ValueError, match=r"b2 must be in \[0, 1\)"):
            optax_snr.scale_by_adopt(b2=1.0)
        with pytest.raises(ValueError, match=r"eps must be in \[0, inf\)"):
            optax_snr.scale_by_adopt(eps=-1.0)
        with pytest.raises(TypeError, match="clip_value_fn must be callable"):
            optax_snr.scale_by_adopt(clip_value_fn=0.25)
        with pytest.raises(TypeError, match="use_clipping must be a bool"):
            optax_snr.scale_by_adopt(use_clipping="yes")
