"""Tests for optax_snr.fused_adam: the fused CPU step against the reference chain.

The reference is ``optax_snr.adam``'s ``update`` followed by
``optax.apply_updates`` (``None`` gradients keep their param). The kernel
performs the compiled chain's float operations, but XLA may simplify the chain
differently from tree to tree, so float32 results are compared within 1e-6
relative; leaves that take the reference path inside ``step`` are compared bit
for bit.
"""

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import types

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
from optax_snr.storage.base import is_stored

NUM_STEPS = 5
RTOL, ATOL = 1e-6, 1e-7


def reference_step(tx, params, state, grads):
    """The readable definition: update, then apply (a None gradient keeps its param)."""
    updates, state = tx.update(grads, state, params)
    params = jax.tree.map(
        lambda p, u: p if u is None else optax.apply_updates(p, u),
        params,
        updates,
        is_leaf=lambda x: x is None,
    )
    return params, state


def adam_count(state):
    """Adam's step count (a schedule keeps a count of its own)."""
    not_schedule = lambda path, _: path[-1].tuple_name != "ScaleByScheduleState"
    return optax.tree.get(state, "count", filtering=not_schedule)


def run_both(opt, params, num_steps=NUM_STEPS, *, jit=True, freeze=()):
    """Runs ``opt.step`` and the reference side by side; returns both (params, state)."""
    ref_step = lambda p, s, g: reference_step(opt, p, s, g)
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
        ref = ref_step(*ref, g_ref)
        fast = fused_step(*fast, g_fast)
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
        ref_step = jax.jit(lambda p, s, g: reference_step(opt, p, s, g))
        ref = (params, state)
        for i in range(NUM_STEPS):
            grads = helpers.noisy_grad(params, jnp.asarray(i, jnp.int32))
            params, state = step(params, state, grads)
            ref = ref_step(*ref, grads)
        chex.assert_trees_all_close((params, state), ref, rtol=RTOL, atol=ATOL)
        chex.assert_trees_all_equal_structs(state, optax_snr.adam(**kwargs).init(params))
        self.assertEqual(int(adam_count(state)), NUM_STEPS)
        # The step did something: params moved by about learning_rate per step.
        moved = helpers.tree_max_abs_diff(params, float32_tree())
        self.assertGreater(moved, 1e-3)

    def test_same_as_optax_adam(self):
        opt = optax_snr.fused_adam(1e-3)
        params = float32_tree(1)
        with helpers.standard_promotion():
            ref_tx = optax.adam(1e-3)
            ref = helpers.run_optimizer(ref_tx, params, NUM_STEPS)
        step = jax.jit(lambda p, s, i: opt.step(p, s, helpers.noisy_grad(p, i)))
        fast = (params, opt.init(params))
        for i in range(NUM_STEPS):
            fast = step(*fast, jnp.asarray(i, jnp.int32))
        chex.assert_trees_all_close(fast[0], ref[0], rtol=RTOL, atol=ATOL)
        for name in ("mu", "nu"):
            chex.assert_trees_all_close(
                optax.tree.get(fast[1], name), ref[1][0]._asdict()[name], rtol=RTOL, atol=ATOL
            )

    def test_kernel_is_used_and_donation_updates_in_place(self):
        opt = optax_snr.fused_adam(1e-3)
        params = float32_tree()
        state = opt.init(params)
        grads = helpers.noisy_grad(params, jnp.asarray(0, jnp.int32))
        step = jax.jit(opt.step, donate_argnums=(0, 1))  # The documented form.
        hlo = step.lower(params, state, grads).compile().as_text()
        self.assertEqual(hlo.count(f'custom_call_target="{fused._TARGET}"'), 1)
        expected = jax.jit(lambda p, s, g: reference_step(opt, p, s, g))(params, state, grads)
        old_leaf = params["big"]
        new_params, new_state = step(params, state, grads)
        self.assertTrue(old_leaf.is_deleted())  # Donated: the step reused its buffer.
        chex.assert_trees_all_close((new_params, new_state), expected, rtol=RTOL, atol=ATOL)

    def test_no_retrace(self):
        opt = optax_snr.fused_adam(1e-3)
        params = float32_tree()

        @jax.jit
        @chex.assert_max_traces(n=1)
        def step(params, state, grads):
            return opt.step(params, state, grads)

        state = opt.init(params)
        for i in range(3):
            grads = helpers.noisy_grad(params, jnp.asarray(i, jnp.int32))
            params, state = step(params, state, grads)
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
            mu_fast, mu_ref = (optax.tree.get(run[1], "mu")[key] for run in (fast, ref))
            helpers.assert_trees_bitwise_equal(mu_fast, mu_ref)
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
        mu = optax.tree.get(fast[1], "mu")
        chex.assert_trees_all_equal(mu["bias"], jnp.zeros_like(params["bias"]))
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
        with self.assertRaisesRegex(ValueError, r"only in params: \['bias'\]"):
            opt.step(params, opt.init(params), grads)

    def test_invalid_hyperparameters_are_rejected(self):
        with self.assertRaises(ValueError):
            optax_snr.fused_adam(-1.0)
        with self.assertRaises(ValueError):
            optax_snr.fused_adam(1e-3, b1=1.0)

    def test_vmap_steps_each_batch_element(self):
        opt = optax_snr.fused_adam(1e-2)
        params = jnp.stack([jnp.linspace(-1.0, 1.0, 50), jnp.linspace(2.0, 0.0, 50)])
        state = jax.vmap(opt.init)(params)
        grads = 0.3 * params + 0.1
        hlo = jax.jit(jax.vmap(opt.step)).lower(params, state, grads).as_text()
        self.assertIn(fused._TARGET, hlo)  # The kernel, not a fallback.
        fast = jax.jit(jax.vmap(opt.step))(params, state, grads)
        ref = jax.jit(jax.vmap(lambda p, s, g: reference_step(opt, p, s, g)))(params, state, grads)
        chex.assert_trees_all_close(fast, ref, rtol=RTOL, atol=ATOL)
        self.assertGreater(helpers.tree_max_abs_diff(fast[0], params), 1e-3)


@pytest.mark.parametrize("schedule", [False, True])
def test_state_is_found_by_field_name(monkeypatch, schedule):
    """step reads count, mu and nu by name: it works on Optax's own adam state layout too."""

    def optax_adam(learning_rate, b1, b2, eps, eps_root, mu_dtype, *, nesterov, nu_dtype):
        del nu_dtype
        return optax.adam(learning_rate, b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov)

    monkeypatch.setattr(fused, "adam", optax_adam)
    learning_rate = optax.linear_schedule(1e-2, 1e-3, 3) if schedule else 1e-2
    opt = optax_snr.fused_adam(learning_rate)
    params = float32_tree()
    with helpers.standard_promotion():  # optax.adam promotes implicitly.
        state = opt.init(params)
        assert isinstance(state[0], optax.ScaleByAdamState)
        assert fused._TARGET in jax.jit(opt.step).lower(params, state, params).as_text()
        ref, fast = run_both(opt, params)
    chex.assert_trees_all_close(fast, ref, rtol=RTOL, atol=ATOL)
    assert int(fast[1][0].count) == NUM_STEPS


def full_size_copies(hlo, min_elements):
    """The ``copy`` instructions of a compiled HLO text with at least ``min_elements``."""
    copies = re.findall(r"= (\w+)\[([\d,]*)\]\S* copy\(", hlo)
    return [c for c in copies if math.prod(int(d) for d in c[1].split(",") if d) >= min_elements]


class DonationTest(chex.TestCase):
    """The documented ``jax.jit(opt.step, donate_argnums=(0, 1))`` updates in place."""

    @staticmethod
    def _params():
        return {"w": jnp.linspace(-1.0, 1.0, 512 * 512).reshape(512, 512), "b": jnp.zeros(512)}

    def _compiled(self, fn, *args):
        return fn.lower(*args).compile().as_text()

    def test_documented_form_compiles_without_copies(self):
        opt = optax_snr.fused_adam(1e-3)
        params = self._params()
        state, grads = opt.init(params), jax.tree.map(lambda p: 0.5 * p, params)
        hlo = self._compiled(jax.jit(opt.step, donate_argnums=(0, 1)), params, state, grads)
        self.assertIn(fused._TARGET, hlo)
        self.assertEqual(full_size_copies(hlo, 512), [])
        # The check can fail: with the donated arguments in another order than the
        # results, the buffers rotate and XLA copies each of them.
        rotated = jax.jit(lambda s, p, g: opt.step(p, s, g), donate_argnums=(0, 1))
        hlo = self._compiled(rotated, state, params, grads)
        self.assertGreaterEqual(len(full_size_copies(hlo, 512)), 3)

    def test_documented_form_with_a_schedule(self):
        opt = optax_snr.fused_adam(optax.linear_schedule(1e-2, 1e-3, 10))
        params = self._params()
        state, grads = opt.init(params), jax.tree.map(lambda p: 0.5 * p, params)
        step = jax.jit(opt.step, donate_argnums=(0, 1))
        self.assertEqual(full_size_copies(self._compiled(step, params, state, grads), 512), [])


class ErrorTest(chex.TestCase):
    """Wrong input fails in Python with a message naming what is wrong."""

    def test_a_state_that_is_not_adams_is_a_type_error(self):
        opt = optax_snr.fused_adam(1e-2)
        params = float32_tree()
        guarded = optax_snr.skip_nonfinite(optax_snr.adam(1e-2)).init(params)
        with self.assertRaisesRegex(TypeError, "got SkipNonfiniteState"):
            opt.step(params, guarded, params)
        with self.assertRaisesRegex(TypeError, "fused_adam.step: state must be"):
            jax.jit(opt.step)(params, optax.sgd(1e-2, momentum=0.9).init(params), params)

    @chex.variants(with_jit=True, without_jit=True)
    def test_shapes_that_differ_from_the_state_name_the_leaf(self):
        opt = optax_snr.fused_adam(1e-2)
        params = float32_tree()
        state = opt.init(params)
        other = {**params, "bias": jnp.zeros(5)}
        step = self.variant(opt.step)
        with self.assertRaisesRegex(ValueError, r"mu\['bias'\] has shape \(17,\), but params"):
            step(other, state, other)
        with self.assertRaisesRegex(ValueError, r"grads leaf \['bias'\] has shape \(5,\)"):
            step(params, state, other)


# The kernel cache. Every test here points OPTAX_SNR_CACHE at its own tmp_path.
# One real build (module fixture) gives a good library; the other tests use a
# stand-in compiler that copies it, so that a rebuild costs nothing.


@pytest.fixture(scope="module")
def good_library(tmp_path_factory):
    """A real build with CXX holding a command with arguments (``env c++``)."""
    cache = tmp_path_factory.mktemp("cache")
    compiler = shutil.which("c++") or shutil.which("g++")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPTAX_SNR_CACHE", str(cache))
        mp.setenv("CXX", f"env {compiler}")
        path, handle = fused._open_kernel()
        assert path.parent == cache
        assert hasattr(handle, fused._SYMBOL)
        return types.SimpleNamespace(path=path, data=path.read_bytes())


@pytest.fixture
def copy_compiler(tmp_path, good_library, monkeypatch):
    """A stand-in compiler: writes the good library to its -o and logs each build."""
    good = tmp_path / "good.so"
    good.write_bytes(good_library.data)
    log = tmp_path / "builds.log"
    script = tmp_path / "copy-cxx"
    script.write_text(
        "#!/bin/sh\n"
        'while [ $# -gt 0 ]; do [ "$1" = -o ] && out="$2"; shift; done\n'
        f'cp "{good}" "$out" && echo built >> "{log}"\n'
    )
    script.chmod(0o755)
    cache = tmp_path / "cache"
    monkeypatch.setenv("OPTAX_SNR_CACHE", str(cache))
    monkeypatch.setenv("CXX", str(script))
    opened = []
    original_open = fused._open
    monkeypatch.setattr(
        fused, "_open", lambda path: opened.append(path.read_bytes()) or original_open(path)
    )

    def builds():
        return len(log.read_text().splitlines()) if log.exists() else 0

    return types.SimpleNamespace(cache=cache, builds=builds, opened=opened)


def test_real_build_is_recorded(good_library):
    assert good_library.data[:4] == b"\x7fELF"
    record = json.loads(fused._record_path(good_library.path).read_text())
    assert record == {
        "size": len(good_library.data),
        "sha256": hashlib.sha256(good_library.data).hexdigest(),
    }
    # The compiler command is part of the key: another command, another library.
    assert fused._library_path(["c++"]).name != good_library.path.name


def test_cached_library_is_reused(copy_compiler):
    path, _ = fused._open_kernel()
    assert copy_compiler.builds() == 1
    assert json.loads(fused._record_path(path).read_text())["size"] == path.stat().st_size
    fused._open_kernel()
    assert copy_compiler.builds() == 1  # Intact and loadable: not rebuilt.
    assert sorted(p.name for p in copy_compiler.cache.iterdir()) == [
        path.name,
        path.name + ".json",
    ]


@pytest.mark.parametrize("damage", ["truncated", "random_bytes", "empty", "no_record"])
def test_damaged_library_is_rebuilt_without_being_loaded(copy_compiler, good_library, damage):
    good_library = good_library.data
    path, _ = fused._open_kernel()
    record = fused._record_path(path)
    if damage == "truncated":
        path.write_bytes(good_library[: len(good_library) // 2])
    elif damage == "random_bytes":
        path.write_bytes(np.random.default_rng(0).bytes(len(good_library)))
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        record.unlink()
    copy_compiler.opened.clear()
    rebuilt, handle = fused._open_kernel()
    assert copy_compiler.builds() == 2
    assert rebuilt.read_bytes() == good_library
    assert json.loads(record.read_text())["size"] == len(good_library)
    assert hasattr(handle, fused._SYMBOL)
    # Only the good library was ever handed to dlopen: never the damaged file.
    assert copy_compiler.opened and all(data == good_library for data in copy_compiler.opened)


def test_recorded_library_that_fails_to_load_is_rebuilt(copy_compiler, good_library):
    good_library = good_library.data
    path, _ = fused._open_kernel()
    junk = b"not a shared library\n" * 64
    path.write_bytes(junk)
    fused._record_path(path).write_text(json.dumps(fused._digest(junk)))  # Passes the check.
    rebuilt, handle = fused._open_kernel()
    assert copy_compiler.builds() == 2
    assert rebuilt.read_bytes() == good_library and hasattr(handle, fused._SYMBOL)


def test_command_with_arguments(copy_compiler, monkeypatch):
    monkeypatch.setenv("CXX", f"env LC_ALL=C {os.environ['CXX']}")
    path, _ = fused._open_kernel()
    assert copy_compiler.builds() == 1 and path.exists()


@pytest.mark.parametrize(
    ("compiler", "message"),
    [
        ("/bin/true", "wrote no library"),
        ("gcc", "does not load"),  # Compiles the C++ but does not link libstdc++.
        ("/no/such/compiler", "not found"),
        ("env /no/such/compiler", "building the fused Adam kernel failed"),
        ("false", "building the fused Adam kernel failed"),
    ],
)
def test_bad_compiler_is_a_clear_error_and_caches_nothing(tmp_path, monkeypatch, compiler, message):
    monkeypatch.setenv("OPTAX_SNR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", compiler)
    with pytest.raises(RuntimeError, match=message):
        fused._open_kernel()
    cached = list((tmp_path / "cache").iterdir()) if (tmp_path / "cache").exists() else []
    assert cached == []


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

def reference(p, s, g):
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

state_specs = jax.tree.map(lambda _: P(), opt.init(params))
state_specs = optax.tree.set(state_specs, mu=specs, nu=specs)
sharded = jax.jit(
    jax.shard_map(opt.step, mesh=mesh, in_specs=(specs, state_specs, specs),
                  out_specs=(specs, state_specs)),
)
ref = (params, opt.init(params))
fast = (params, opt.init(params))
plain = (params, opt.init(params))
for _ in range(3):
    ref = jax.jit(reference)(*ref, grads)
    fast = sharded(*fast, grads)
    plain = jax.jit(opt.step)(*plain, grads)
diff = lambda a, b: max(float(jnp.max(jnp.abs(x - y))) for x, y in
                        zip(jax.tree.leaves(a), jax.tree.leaves(b)))
hlo = sharded.lower(*fast, grads).compile().as_text()
print(json.dumps({
    "devices": len(jax.devices()),
    "shard_map_diff": diff(fast, ref),
    "plain_jit_diff": diff(plain, ref),
    "param_specs": {k: str(v.sharding.spec) for k, v in fast[0].items()},
    "mu_specs": {k: str(v.sharding.spec) for k, v in optax.tree.get(fast[1], "mu").items()},
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


def quantized_run(opt, params, num_steps=4, seed=0):
    """``opt.step`` jitted and donated, and the jitted reference chain, on the same gradients.

    The gradients do not depend on the params, so the moments of both runs see
    the same inputs at every step and their codes can be compared exactly.
    """
    rng = np.random.default_rng(seed)
    ref_step = jax.jit(lambda p, s, g: reference_step(opt, p, s, g))
    fused_step = jax.jit(opt.step, donate_argnums=(0, 1))
    ref = (params, opt.init(params))
    fast = (jax.tree.map(jnp.copy, params), opt.init(params))
    for _ in range(num_steps):
        # Gradients over five orders of magnitude, so the blocks' code maps are exercised.
        grads = jax.tree.map(
            lambda p: jnp.asarray(
                rng.normal(size=p.shape) * 10.0 ** rng.integers(-4, 1, size=p.shape), jnp.float32
            ),
            params,
        )
        ref = ref_step(*ref, grads)
        fast = fused_step(*fast, grads)
    return ref, fast


def quantized_tree():
    k = jax.random.split(jax.random.PRNGKey(7), 4)
    return {
        "matrix": jax.random.normal(k[0], (64, 300)),  # 300 = 2 blocks of 150 at 8 bits.
        "odd": jax.random.normal(k[1], (3, 5, 333)),  # Odd rows: a 4-bit byte spans blocks.
        "flat": jax.random.normal(k[2], (70_001,)),  # Split across threads; odd length.
        "small": jax.random.normal(k[3], (10,)),  # Below min_size: float32, the f32 kernel.
    }


class QuantizedKernelTest(chex.TestCase):
    """fused_adam.step on 8- and 4-bit moments: decode, step and encode in one pass."""

    @parameterized.named_parameters(
        (
            "8_bit",
            optax_snr.quantized(bits=8, min_size=64),
            optax_snr.quantized(bits=8, min_size=64),
        ),
        (
            "4_bit",
            optax_snr.quantized(bits=4, min_size=64),
            optax_snr.quantized(bits=4, min_size=64),
        ),
        (
            "8_bit_signal_4_bit_noise",
            optax_snr.quantized(bits=8, block_size=128, min_size=64),
            optax_snr.quantized(bits=4, block_size=128, min_size=64),
        ),
        (
            "odd_blocks",
            optax_snr.quantized(bits=4, block_size=7, min_size=64),
            optax_snr.quantized(bits=4, block_size=7, min_size=64),
        ),
    )
    def test_matches_the_reference_chain(self, mu_dtype, nu_dtype):
        opt = optax_snr.fused_adam(1e-2, mu_dtype=mu_dtype, nu_dtype=nu_dtype)
        tree = quantized_tree()
        hlo = jax.jit(opt.step).lower(tree, opt.init(tree), tree).compile().as_text()
        self.assertIn(fused._QUANTIZED_TARGET, hlo)  # The kernel steps the big leaves.
        (ref_params, ref_state), (params, state) = quantized_run(opt, tree)
        # The same codes and scales, bit for bit; the params within float32 rounding.
        for name in ("mu", "nu"):
            got, want = optax.tree.get(state, name), optax.tree.get(ref_state, name)
            self.assertIsInstance(got["matrix"], optax_snr.QuantizedMoment)
            self.assertIsInstance(got["small"], jax.Array)
            chex.assert_trees_all_equal(got, want)
        chex.assert_trees_all_close(params, ref_params, rtol=RTOL, atol=ATOL)
        self.assertEqual(int(adam_count(state)), 4)

    def test_kernel_is_used_and_the_documented_form_has_no_copies(self):
        fmt = optax_snr.quantized(bits=8)
        opt = optax_snr.fused_adam(1e-3, mu_dtype=fmt, nu_dtype=fmt)
        params = {"w": jnp.linspace(-1.0, 1.0, 512 * 512).reshape(512, 512), "b": jnp.zeros(512)}
        state, grads = opt.init(params), jax.tree.map(lambda p: 0.5 * p, params)
        step = jax.jit(opt.step, donate_argnums=(0, 1))
        compiled = step.lower(params, state, grads).compile()
        hlo = compiled.as_text()
        self.assertEqual(hlo.count(f'custom_call_target="{fused._QUANTIZED_TARGET}"'), 1)
        self.assertEqual(full_size_copies(hlo, 512), [])
        # In place: no float32 moment of the big leaf is ever materialized.
        self.assertLess(compiled.memory_analysis().temp_size_in_bytes, 512 * 512)
        old_codes = state[0].mu["w"].codes
        _, new_state = step(params, state, grads)
        self.assertTrue(old_codes.is_deleted())
        self.assertEqual(new_state[0].mu["w"].codes.dtype, jnp.uint8)

    def test_moments_in_other_blocks_take_the_reference_chain(self):
        # The kernel needs the signal and the noise cut into the same blocks.
        opt = optax_snr.fused_adam(
            1e-2,
            mu_dtype=optax_snr.quantized(bits=8, block_size=64, min_size=0),
            nu_dtype=optax_snr.quantized(bits=8, block_size=32, min_size=0),
        )
        params = {"w": jnp.linspace(-1.0, 1.0, 256).reshape(4, 64)}
        state = opt.init(params)
        hlo = jax.jit(opt.step).lower(params, state, params).compile().as_text()
        self.assertNotIn(fused._QUANTIZED_TARGET, hlo)
        (ref_params, ref_state), (got_params, got_state) = quantized_run(opt, params)
        chex.assert_trees_all_equal((got_params, got_state), (ref_params, ref_state))

    def test_a_nan_gradient_poisons_its_block_as_in_the_chain(self):
        fmt = optax_snr.quantized(bits=8, block_size=16, min_size=0)
        opt = optax_snr.fused_adam(1e-2, mu_dtype=fmt, nu_dtype=fmt)
        params = {"w": jnp.ones((2, 32))}
        grads = {"w": jnp.full((2, 32), 0.1).at[1, 20].set(jnp.nan)}
        ref = jax.jit(lambda p, s, g: reference_step(opt, p, s, g))(params, opt.init(params), grads)
        got = jax.jit(opt.step)(params, opt.init(params), grads)
        for p, s in (ref, got):
            mu = optax_snr.decode_moments(s)[0].mu["w"]
            # Only the block that saw the NaN (row 1, entries 16-31) is NaN.
            nan = np.isnan(np.asarray(mu))
            self.assertTrue(nan[1, 16:].all())
            self.assertFalse(nan[0].any() or nan[1, :16].any())
            self.assertTrue(np.isnan(np.asarray(p["w"][1, 20])))
        chex.assert_trees_all_equal(got[1][0].mu["w"].scales, ref[1][0].mu["w"].scales)

    def test_work_split_across_threads_is_exact(self):
        # One big leaf, and the same data as many leaves, give the same codes:
        # every block is stepped exactly once whatever thread takes it.
        fmt = optax_snr.quantized(bits=4, block_size=100, min_size=0)
        opt = optax_snr.fused_adam(1e-2, mu_dtype=fmt, nu_dtype=fmt)
        values = jax.random.normal(jax.random.PRNGKey(3), (40, 10_000))
        big = {"w": values}
        small = {f"w{i:02d}": row[None] for i, row in enumerate(values)}
        step = jax.jit(opt.step)
        _, big_state = step(big, opt.init(big), big)
        _, small_state = step(small, opt.init(small), small)
        np.testing.assert_array_equal(
            np.asarray(big_state[0].nu["w"].codes),
            np.concatenate([np.asarray(small_state[0].nu[k].codes) for k in sorted(small)]),
        )


def test_other_formats_take_the_reference_chain():
    """Moments the kernel does not read (here bf16 stochastic rounding) step through the chain."""
    fmt = optax_snr.stochastic_rounding(jnp.bfloat16)
    opt = optax_snr.fused_adam(1e-2, mu_dtype=fmt, nu_dtype=fmt)
    ref = optax_snr.adam(1e-2, mu_dtype=fmt, nu_dtype=fmt)
    params = {"w": jnp.linspace(-1.0, 1.0, 8192).reshape(64, 128), "b": jnp.ones(32)}
    state, ref_state, ref_params = opt.init(params), ref.init(params), params
    step = jax.jit(opt.step, donate_argnums=(0, 1))
    for t in range(3):
        grads = jax.tree.map(lambda p, t=t: jnp.sin(p * (t + 1)), ref_params)
        updates, ref_state = ref.update(grads, ref_state, ref_params)
        ref_params = optax.apply_updates(ref_params, updates)
        params, state = step(params, state, grads)
    assert is_stored(state[0].mu["w"]) and state[0].mu["w"].format == fmt
    chex.assert_trees_all_close(params, ref_params, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(
        optax_snr.decode_moments(state), optax_snr.decode_moments(ref_state), rtol=1e-6
    )
