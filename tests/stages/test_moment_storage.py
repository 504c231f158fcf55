"""Storage formats inside the moment stages and every ready-made optimizer.

One mechanism (``optax_snr.storage.base``) serves every stage; these tests
check that the optimizers built from those stages run with each format, keep
their state's types from step to step, stay close to float32 Adam, and work
with the usual wrappers, readers and checkpoints.
"""

import tempfile

import chex
import flax.serialization
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from absl.testing import parameterized

import optax_snr

FORMATS = {
    "8bit": optax_snr.quantized(bits=8, min_size=0),
    "4bit": optax_snr.quantized(bits=4, block_size=8, min_size=0),
    "sr_bf16": optax_snr.stochastic_rounding(jnp.bfloat16),
}
NU_FORMATS = {**FORMATS, "factored": optax_snr.factored(min_dim_size=2)}

# Every optimizer that takes a moment dtype, with the format in each of its buffers.
OPTIMIZERS = {
    "adam": lambda f, n: optax_snr.adam(1e-2, mu_dtype=f, nu_dtype=n),
    "adamw": lambda f, n: optax_snr.adamw(1e-2, mu_dtype=f, nu_dtype=n),
    "nadam": lambda f, n: optax_snr.nadam(1e-2, mu_dtype=f, nu_dtype=n),
    "nadamw": lambda f, n: optax_snr.nadamw(1e-2, mu_dtype=f, nu_dtype=n),
    "scale_by_adam": lambda f, n: optax.chain(
        optax_snr.scale_by_adam(mu_dtype=f, nu_dtype=n), optax.scale_by_learning_rate(1e-2)
    ),
    "amsgrad": lambda f, n: optax.chain(  # amsgrad's stages, chained by hand
        optax_snr.ema_moments(mu_dtype=f, nu_dtype=n),
        optax_snr.bias_correction(),
        optax_snr.max_noise(nu_dtype=n),
        optax_snr.scale_by_snr(),
        optax.scale_by_learning_rate(1e-2),
    ),
    "amsgrad_mu": lambda f, n: optax_snr.amsgrad(1e-2, mu_dtype=f),
    "adabelief": lambda f, n: optax.chain(  # adabelief's stages, chained by hand
        optax_snr.centered_moments(mu_dtype=f, nu_dtype=n),
        optax_snr.bias_correction(),
        optax_snr.scale_by_snr(eps=1e-16, eps_root=0.0),
        optax.scale_by_learning_rate(1e-2),
    ),
    "ademamix": lambda f, n: optax_snr.ademamix(1e-2, b3=0.99, mu_dtype=f),
    "adopt": lambda f, n: optax_snr.adopt(1e-2, mu_dtype=f),
    "scale_by_adopt": lambda f, n: optax.chain(
        optax_snr.scale_by_adopt(mu_dtype=f, nu_dtype=n), optax.scale_by_learning_rate(1e-2)
    ),
}
NO_SIGNAL_FORMAT = {"ademamix"}  # takes mu_dtype for all its buffers: not factored.


def _params():
    return {
        "w": jax.random.normal(jax.random.PRNGKey(0), (6, 20)),
        "b": jnp.zeros((20,)),
        "s": jnp.ones(()),
    }


# Every format through each moment stage; the optimizers that only pass the
# argument on are checked with one format, which keeps the file fast.
STAGE_CHAINS = {"adam", "adabelief", "amsgrad", "ademamix", "scale_by_adopt"}


def _cases():
    for opt in sorted(OPTIMIZERS):
        for name in sorted(NU_FORMATS) if opt in STAGE_CHAINS else ["4bit"]:
            if name == "factored" and opt in NO_SIGNAL_FORMAT | {"adopt", "amsgrad_mu"}:
                continue
            yield {"testcase_name": f"_{opt}_{name}", "opt": opt, "name": name}


def _build(opt, name):
    nu = NU_FORMATS[name]
    mu = FORMATS.get(name)  # factored is for the noise only: the signal stays float32
    return OPTIMIZERS[opt](mu, nu)


class OptimizersWithFormatsTest(parameterized.TestCase):
    @parameterized.named_parameters(_cases())
    def test_steps_without_retrace_and_stay_near_float32(self, opt, name):
        tx = _build(opt, name)
        params = _params()
        state = tx.init(params)

        @jax.jit
        @chex.assert_max_traces(n=1)
        def step(g, s, p):
            return tx.update(g, s, p)

        for _ in range(3):
            updates, new_state = step(params, state, params)
            chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
            state = new_state
        chex.assert_tree_all_finite(updates)
        leaves = jax.tree.leaves(state, is_leaf=optax_snr.storage.base.is_stored)
        assert any(optax_snr.storage.base.is_stored(x) for x in leaves)
        # 20 steps against float32 moments, relative to how far float32 moved.
        p_ref, _ = helpers.run_optimizer(OPTIMIZERS[opt](None, None), params, 20)
        p_fmt, s_fmt = helpers.run_optimizer(tx, params, 20)
        chex.assert_tree_all_finite(p_fmt)
        moved = helpers.tree_max_abs_diff(p_ref, params)
        tolerance = {"8bit": 0.05, "sr_bf16": 0.05, "4bit": 0.6, "factored": 1.0}[name]
        assert helpers.tree_max_abs_diff(p_fmt, p_ref) < tolerance * moved
        if opt not in ("scale_by_adam", "amsgrad", "adabelief", "scale_by_adopt"):
            assert int(optax.tree.get(s_fmt, "count")) == 20

    def test_default_stays_bit_identical_to_optax(self):
        params = _params()
        with helpers.standard_promotion():
            p_ref, _ = helpers.run_optimizer(optax.adam(1e-2), params, 10)
        p, _ = helpers.run_optimizer(optax_snr.adam(1e-2), params, 10)
        helpers.assert_trees_bitwise_equal(p, p_ref)

    def test_small_leaves_stay_float32(self):
        tx = optax_snr.adam(1e-2, mu_dtype=optax_snr.quantized(8, min_size=100))
        mu = tx.init(_params())[0].mu
        assert isinstance(mu["w"], optax_snr.QuantizedMoment)
        chex.assert_type([mu["b"], mu["s"]], jnp.float32)

    def test_readers_see_the_decoded_moments(self):
        tx = optax_snr.adam(1e-2, mu_dtype=FORMATS["8bit"], nu_dtype=FORMATS["8bit"])
        dense = optax_snr.adam(1e-2)
        _, state = helpers.run_optimizer(tx, _params(), 5)
        _, reference = helpers.run_optimizer(dense, _params(), 5)
        decoded = optax_snr.decode_moments(state)
        chex.assert_trees_all_equal_structs(decoded, reference)
        diag = jax.jit(optax_snr.snr_diagnostics)(decoded)
        expected = optax_snr.snr_diagnostics(reference)
        np.testing.assert_allclose(diag.overall.snr.mean, expected.overall.snr.mean, rtol=0.05)

    @parameterized.parameters(*sorted(NU_FORMATS))
    def test_readers_decode_stored_states_themselves(self, name):
        tx = optax_snr.adam(1e-2, mu_dtype=FORMATS.get(name), nu_dtype=NU_FORMATS[name])
        _, state = helpers.run_optimizer(tx, _params(), 5)
        decoded = optax_snr.decode_moments(state)
        # Decoding inside the readers' jitted program or before it: equal to 1 ulp.
        chex.assert_trees_all_close(
            jax.jit(optax_snr.snr_diagnostics)(state), optax_snr.snr_diagnostics(decoded), rtol=1e-6
        )
        chex.assert_trees_all_close(
            optax_snr.noise_scale(state, 32), optax_snr.noise_scale(decoded, 32), rtol=1e-6
        )
        chex.assert_tree_all_finite(optax_snr.snr_diagnostics(state).overall)


class WrappersTest(parameterized.TestCase):
    @parameterized.parameters(*sorted(FORMATS))
    def test_inject_hyperparams(self, name):
        fmt = FORMATS[name]
        tx = optax.inject_hyperparams(optax_snr.adam)(learning_rate=1e-2, mu_dtype=fmt)
        _, state = helpers.assert_steps_without_retrace(tx, _params(), num_steps=3)
        assert optax_snr.storage.base.is_stored(state.inner_state[0].mu["w"])
        assert int(optax.tree.get(state, "count", filtering=_bias_count)) == 3

    @parameterized.parameters(*sorted(FORMATS))
    def test_multi_steps(self, name):
        fmt = FORMATS[name]
        tx = optax.MultiSteps(optax_snr.adam(1e-2, mu_dtype=fmt, nu_dtype=fmt), every_k_schedule=2)
        with helpers.standard_promotion():  # MultiSteps mixes int32 and float32
            params, state = helpers.run_optimizer(tx, _params(), 6)
        chex.assert_tree_all_finite(params)
        assert int(state.gradient_step) == 3

    @parameterized.parameters(*sorted(FORMATS))
    def test_skip_nonfinite_keeps_the_stored_moments(self, name):
        fmt = FORMATS[name]
        tx = optax_snr.skip_nonfinite(optax_snr.adam(1e-2, mu_dtype=fmt, nu_dtype=fmt))
        params = _params()
        state = tx.init(params)
        _, state = jax.jit(tx.update)(params, state, params)
        bad = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), params)
        updates, skipped = jax.jit(tx.update)(bad, state, params)
        chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, params))
        chex.assert_trees_all_equal(skipped.inner_state, state.inner_state)


def _bias_count(path, value):
    del value
    return any(getattr(k, "tuple_name", None) == "ScaleByAdamState" for k in path)


class CheckpointTest(parameterized.TestCase):
    def _step(self, tx):
        @jax.jit
        def step(params, state, i):
            updates, state = tx.update(helpers.noisy_grad(params, i), state, params)
            return optax.apply_updates(params, updates), state

        return step

    @parameterized.parameters(*sorted(NU_FORMATS))
    def test_orbax_resume_is_bit_identical(self, name):
        tx = optax_snr.adam(1e-2, mu_dtype=FORMATS.get(name), nu_dtype=NU_FORMATS[name])
        step = self._step(tx)
        params, state = _params(), tx.init(_params())
        for i in range(3):
            params, state = step(params, state, jnp.asarray(i))
        path = self.enter_context(tempfile.TemporaryDirectory()) + "/ckpt"
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(path, {"params": params, "opt_state": state})
            ckptr.wait_until_finished()
        target = {"params": _params(), "opt_state": tx.init(_params())}
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(path, abstract)
        chex.assert_trees_all_equal_structs(restored, target)
        helpers.assert_trees_bitwise_equal(restored, {"params": params, "opt_state": state})
        a, b = (params, state), (restored["params"], restored["opt_state"])
        for i in range(3, 6):
            a = step(*a, jnp.asarray(i))
            b = step(*b, jnp.asarray(i))
        helpers.assert_trees_bitwise_equal(a, b)

    def test_orbax_refuses_a_checkpoint_of_another_format(self):
        def state_of(fmt):
            tx = optax_snr.adam(1e-2, mu_dtype=fmt, nu_dtype=fmt)
            return tx.init(_params())

        path = self.enter_context(tempfile.TemporaryDirectory()) + "/ckpt"
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(path, state_of(FORMATS["8bit"]))
            ckptr.wait_until_finished()
        for other in (FORMATS["4bit"], FORMATS["sr_bf16"], None):
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_of(other))
            with ocp.StandardCheckpointer() as ckptr, pytest.raises(ValueError):
                ckptr.restore(path, abstract)

    @parameterized.parameters(
        ("8bit", "4bit"), ("4bit", "8bit"), ("sr_bf16", "8bit"), (None, "4bit"), ("8bit", None)
    )
    def test_a_state_of_another_format_fails_naming_the_leaf_and_both(self, saved, wanted):
        def adam(name):
            fmt = FORMATS.get(name)
            return optax_snr.adam(1e-2, mu_dtype=fmt, nu_dtype=fmt)

        state = adam(saved).init(_params())
        tx = adam(wanted)
        expected = repr(FORMATS[wanted]) if wanted else "a plain array"
        written = repr(FORMATS[saved]) if saved else "a plain array of shape"
        # flax.serialization: the restore fails (stored target) or the first update does.
        with pytest.raises(ValueError, match=r"mu(/|\[')[bw]") as error:
            blob = flax.serialization.to_bytes(state)
            tx.update(_params(), flax.serialization.from_bytes(tx.init(_params()), blob))
        assert expected in str(error.value) and written in str(error.value)
        # A state handed over in memory (no serialization) fails at the first update.
        with pytest.raises(ValueError, match=r"the state's leaf mu\['[bw]'\]") as error:
            tx.update(_params(), state)
        assert expected in str(error.value)

    @parameterized.parameters(*sorted(NU_FORMATS))
    def test_flax_serialization_round_trip(self, name):
        tx = optax_snr.adam(1e-2, mu_dtype=FORMATS.get(name), nu_dtype=NU_FORMATS[name])
        _, state = helpers.run_optimizer(tx, _params(), 2)
        blob = flax.serialization.to_bytes(state)
        restored = flax.serialization.from_bytes(tx.init(_params()), blob)
        helpers.assert_trees_bitwise_equal(restored, state)
        chex.assert_trees_all_equal_structs(restored, state)


class BadInputTest(parameterized.TestCase):
    def test_a_state_of_other_shapes_names_both(self):
        # Same format, other params (or a shard of them, as inside jax.shard_map).
        fmt = optax_snr.quantized(bits=8, min_size=0)
        tx = optax_snr.adam(1e-2, mu_dtype=fmt, nu_dtype=fmt)
        state = tx.init({"w": jnp.ones((8, 64))})
        with pytest.raises(ValueError, match=r"mu\['w'\].*\(8, 64\).*update has shape \(4, 64\)"):
            tx.update({"w": jnp.ones((4, 64))}, state)

    @parameterized.parameters(jnp.int8, jnp.uint8, jnp.int32, bool)
    def test_integer_moment_dtypes_raise(self, dtype):
        for make in (
            lambda: optax_snr.ema_moments(mu_dtype=dtype),
            lambda: optax_snr.ema_moments(nu_dtype=dtype),
            lambda: optax_snr.centered_moments(mu_dtype=dtype),
            lambda: optax_snr.max_noise(nu_dtype=dtype),
            lambda: optax_snr.mixed_signal(mu_dtype=dtype),
            lambda: optax_snr.scale_by_adopt(nu_dtype=dtype),
        ):
            with pytest.raises(TypeError, match="_dtype must be a floating"):
                make()

    def test_a_format_class_instead_of_an_object_raises(self):
        from optax_snr.storage.quantized import Quantized

        with pytest.raises(TypeError, match="not the class Quantized"):
            optax_snr.adam(1e-3, mu_dtype=Quantized)

    def test_a_format_where_only_a_dtype_makes_sense_raises(self):
        from optax_snr.common import validation

        with pytest.raises(TypeError, match="plain dtype here, not the storage format"):
            validation.check_dtype("mu_dtype", optax_snr.quantized(8))
