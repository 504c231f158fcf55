"""Tests for optax_snr.fused_adam: the fused CPU step against the reference chain.

The reference is ``optax_snr.adam``'s ``update`` followed by
``optax.apply_updates`` (``None`` gradients keep their param). The kernel
performs the compiled chain's float operations, but XLA may simplify the chain
differently from tree to tree, so float32 results are compared within 1e-6
relative; leaves that take the reference path inside ``step`` are compared bit
for bit.
"""

import json
import os
import subprocess
import sys
import tempfile

import chex
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import optax_snr
from optax_snr.kernels import fused_adam as fused

NUM_STEPS = 5
RTOL, ATOL = 1e-6, 1e-7


def reference_step(tx, grads, state, params):
    """The readable definition: update, then apply (a None gradient keeps its param)."""
    updates, state = tx.update(grads, state, params)
    params = jax.tree.map(
        lambda p, u: p if u is None else optax.apply_updates(p, u),
        params,
        updates,
        is_leaf=lambda x: x is None,
    )
    return params, state


def run_both(opt, params, num_steps=NUM_STEPS, *, jit=True, freeze=()):
    """Runs ``opt.step`` and the reference side by side; returns both (params, state)."""
    ref_step = lambda g, s, p: reference_step(opt, g, s, p)
    fused_step = opt.step
    if jit:
        ref_step, fused_step = jax.jit(ref_step), jax.jit(fused_step)
    grad = jax.jit(helpers.noisy_grad)
    ref = fast = (params, opt.init(params))
    for i in range(num_steps):
        step = jnp.asarray(i, jnp.int32)
        g_ref, g_fast = grad(ref[0], step), grad(fast[0], step)
        for key in freeze:
            g_ref[key] = g_fast[key] = None
        ref = ref_step(g_ref, ref[1], ref[0])
        fast = fused_step(g_fast, fast[1], fast[0])
    return ref, fast


def float32_tree(seed=0):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {
        "kernel": jax.random.normal(k1, (33, 17)),
        "bias": jax.random.normal(k2, (17,)),
        "big": jax.random.normal(k3, (300_000,)),  # Split across threads.
        "scalar": jnp.asarray(0.5, jnp.float32),
    }


class FusedAdamTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("defaults", {}),
        ("hyperparameters", {"b1": 0.8, "b2": 0.95, "eps": 1e-3}),
        ("eps_root", {"eps_root": 1e-6}),
        ("schedule", {"learning_rate": optax.linear_schedule(1e-2, 1e-3, 3)}),
    )
    def test_matches_reference_chain(self, kwargs):
        kwargs = {"learning_rate": 1e-2, **kwargs}
        opt = optax_snr.fused_adam(**kwargs)
        params = float32_tree()
        state = opt.init(params)
        step = self.variant(opt.step)
        ref_step = jax.jit(lambda g, s, p: reference_step(opt, g, s, p))
        ref = (params, state)
        for i in range(NUM_STEPS):
            grads = helpers.noisy_grad(params, jnp.asarray(i, jnp.int32))
            params, state = step(grads, state, params)
            ref = ref_step(grads, *ref[::-1])
        chex.assert_trees_all_close((params, state), ref, rtol=RTOL, atol=ATOL)
        chex.assert_trees_all_equal_structs(state, optax_snr.adam(**kwargs).init(params))
        self.assertEqual(int(state[0].count), NUM_STEPS)
        # The step did something: params moved by about learning_rate per step.
        moved = helpers.tree_max_abs_diff(params, float32_tree())
        self.assertGreater(moved, 1e-3)

    def test_same_as_optax_adam(self):
        opt = optax_snr.fused_adam(1e-3)
        params = float32_tree(1)
        with helpers.standard_promotion():
            ref_tx = optax.adam(1e-3)
            ref = helpers.run_optimizer(ref_tx, params, NUM_STEPS)
        step = jax.jit(lambda p, s, i: opt.step(helpers.noisy_grad(p, i), s, p))
        fast = (params, opt.init(params))
        for i in range(NUM_STEPS):
            fast = step(*fast, jnp.asarray(i, jnp.int32))
        chex.assert_trees_all_close(fast[0], ref[0], rtol=RTOL, atol=ATOL)
        chex.assert_trees_all_close(fast[1][0].mu, ref[1][0].mu, rtol=RTOL, atol=ATOL)
        chex.assert_trees_all_close(fast[1][0].nu, ref[1][0].nu, rtol=RTOL, atol=ATOL)

    def test_kernel_is_used_and_donation_updates_in_place(self):
        opt = optax_snr.fused_adam(1e-3)
        params = float32_tree()
        state = opt.init(params)
        grads = helpers.noisy_grad(params, jnp.asarray(0, jnp.int32))
        step = jax.jit(opt.step, donate_argnums=(1, 2))
        hlo = step.lower(grads, state, params).compile().as_text()
        self.assertEqual(hlo.count(f'custom_call_target="{fused._TARGET}"'), 1)
        expected = jax.jit(lambda g, s, p: reference_step(opt, g, s, p))(grads, state, params)
        old_leaf = params["big"]
        new_params, new_state = step(grads, state, params)
        self.assertTrue(old_leaf.is_deleted())  # Donated: the step reused its buffer.
        chex.assert_trees_all_close((new_params, new_state), expected, rtol=RTOL, atol=ATOL)

    def test_no_retrace(self):
        opt = optax_snr.fused_adam(1e-3)
        params = float32_tree()

        @jax.jit
        @chex.assert_max_traces(n=1)
        def step(grads, state, params):
            return opt.step(grads, state, params)

        state = opt.init(params)
        for i in range(3):
            grads = helpers.noisy_grad(params, jnp.asarray(i, jnp.int32))
            params, state = step(grads, state, params)
        jax.block_until_ready(params)

    def test_mixed_dtypes(self):
        # float32 leaves take the kernel; 16-bit and float64 leaves the chain.
        params = {
            "f32": jnp.linspace(-1.0, 1.0, 40, dtype=jnp.float32),
            "bf16": jnp.linspace(-1.0, 1.0, 40, dtype=jnp.bfloat16),
            "f16": jnp.linspace(-1.0, 1.0, 40, dtype=jnp.float16),
        }
        ref, fast = run_both(optax_snr.fused_adam(1e-2), params)
        chex.assert_trees_all_equal_dtypes(fast, ref)
        for key in ("bf16", "f16"):
            helpers.assert_trees_bitwise_equal(fast[0][key], ref[0][key])
            helpers.assert_trees_bitwise_equal(fast[1][0].mu[key], ref[1][0].mu[key])
        chex.assert_trees_all_close(fast, ref, rtol=RTOL, atol=ATOL)

    def test_float64_takes_the_reference_path(self):
        previous = jax.config.jax_enable_x64
        jax.config.update("jax_enable_x64", True)
        try:
            params = {"w": jnp.linspace(-1.0, 1.0, 16, dtype=jnp.float64)}
            opt = optax_snr.fused_adam(1e-2)
            hlo = jax.jit(opt.step).lower(params, opt.init(params), params).as_text()
            self.assertNotIn(fused._TARGET, hlo)
            ref, fast = run_both(opt, params)
            helpers.assert_trees_bitwise_equal(fast, ref)
        finally:
            jax.config.update("jax_enable_x64", previous)

    @parameterized.named_parameters(
        ("mu_dtype", {"mu_dtype": jnp.bfloat16}),
        ("nesterov", {"nesterov": True}),
    )
    def test_unsupported_options_take_the_reference_path(self, kwargs):
        opt = optax_snr.fused_adam(1e-2, **kwargs)
        params = float32_tree()
        hlo = jax.jit(opt.step).lower(params, opt.init(params), params).as_text()
        self.assertNotIn(fused._TARGET, hlo)
        ref, fast = run_both(opt, params)
        helpers.assert_trees_bitwise_equal(fast, ref)

    def test_none_gradients_freeze_their_leaves(self):
        params = float32_tree()
        ref, fast = run_both(optax_snr.fused_adam(1e-2), params, freeze=("bias",))
        helpers.assert_trees_bitwise_equal(fast[0]["bias"], params["bias"])
        chex.assert_trees_all_equal(fast[1][0].mu["bias"], jnp.zeros_like(params["bias"]))
        chex.assert_trees_all_close(fast, ref, rtol=RTOL, atol=ATOL)
        self.assertGreater(helpers.tree_max_abs_diff(fast[0]["kernel"], params["kernel"]), 0.0)

    def test_empty_tree(self):
        opt = optax_snr.fused_adam(1e-2)
        params, state = jax.jit(opt.step)({}, opt.init({}), {})
        self.assertEqual(params, {})
        self.assertEqual(int(optax.tree.get(state, "count")), 1)

    def test_mismatched_trees_are_rejected(self):
        opt = optax_snr.fused_adam(1e-2)
        params = float32_tree()
        grads = {k: v for k, v in params.items() if k != "bias"}
        with self.assertRaises(ValueError):
            opt.step(grads, opt.init(params), params)

    def test_invalid_hyperparameters_are_rejected(self):
        with self.assertRaises(ValueError):
            optax_snr.fused_adam(-1.0)
        with self.assertRaises(ValueError):
            optax_snr.fused_adam(1e-3, b1=1.0)

    def test_missing_compiler_is_a_clear_error(self):
        cache = tempfile.mkdtemp()
        env = {"CXX": os.path.join(cache, "no-such-compiler"), "OPTAX_SNR_CACHE": cache}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            with self.assertRaisesRegex(RuntimeError, "building the fused Adam kernel"):
                fused.build_fused_kernel.__wrapped__()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k)
                else:
                    os.environ[k] = v


SHARDING_SCRIPT = """
import json, os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, jax.numpy as jnp, optax
from jax.sharding import NamedSharding, PartitionSpec as P
import optax_snr

mesh = jax.make_mesh((8,), ("x",))
specs = {"w": P("x", None), "b": P("x")}
params = {"w": jax.random.normal(jax.random.PRNGKey(0), (64, 16)), "b": jnp.linspace(-1, 1, 8)}
params = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), params, specs)
grads = jax.tree.map(lambda p: 0.3 * p + 0.1, params)
opt = optax_snr.fused_adam(1e-2)

def reference(g, s, p):
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

state_specs = jax.tree.map(lambda _: P(), opt.init(params))
state_specs = (state_specs[0]._replace(mu=specs, nu=specs), *state_specs[1:])
sharded = jax.jit(
    jax.shard_map(opt.step, mesh=mesh, in_specs=(specs, state_specs, specs),
                  out_specs=(specs, state_specs)),
)
ref = (params, opt.init(params))
fast = (params, opt.init(params))
plain = (params, opt.init(params))
for _ in range(3):
    ref = jax.jit(reference)(grads, ref[1], ref[0])
    fast = sharded(grads, fast[1], fast[0])
    plain = jax.jit(opt.step)(grads, plain[1], plain[0])
diff = lambda a, b: max(float(jnp.max(jnp.abs(x - y))) for x, y in
                        zip(jax.tree.leaves(a), jax.tree.leaves(b)))
hlo = sharded.lower(grads, fast[1], fast[0]).compile().as_text()
print(json.dumps({
    "devices": len(jax.devices()),
    "shard_map_diff": diff(fast, ref),
    "plain_jit_diff": diff(plain, ref),
    "param_specs": {k: str(v.sharding.spec) for k, v in fast[0].items()},
    "mu_specs": {k: str(v.sharding.spec) for k, v in fast[1][0].mu.items()},
    "shard_map_all_gathers": hlo.count("all-gather("),
    "count": int(optax.tree.get(fast[1], "count")),
}))
"""


def test_sharded_params():
    """Under shard_map each device updates its shard; plain jit gathers but is correct."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [sys.executable, "-c", SHARDING_SCRIPT],
        cwd=helpers.REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8
    assert result["count"] == 3
    assert result["shard_map_diff"] <= 1e-6
    assert result["plain_jit_diff"] <= 1e-6
    assert result["param_specs"] == {"b": "P('x',)", "w": "P('x', None)"}
    assert result["mu_specs"] == result["param_specs"]
    assert result["shard_map_all_gathers"] == 0


def test_work_split_across_leaves_and_threads():
    # The kernel lays the leaves end to end and cuts them among threads: one big
    # leaf and the same data in 40 leaves must give the same values, each
    # element updated exactly once.
    values = jax.random.normal(jax.random.PRNGKey(3), (400_000,))
    opt = optax_snr.fused_adam(1e-2)
    big = {"w": values}
    small = {f"w{i:02d}": chunk for i, chunk in enumerate(jnp.split(values, 40))}
    step = jax.jit(opt.step)
    out_big = step(big, opt.init(big), big)[0]["w"]
    out_small = step(small, opt.init(small), small)[0]
    np.testing.assert_array_equal(
        np.asarray(out_big), np.concatenate([np.asarray(out_small[k]) for k in sorted(out_small)])
    )


if __name__ == "__main__":
    pytest.main([__file__])
