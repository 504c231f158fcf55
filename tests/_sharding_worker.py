"""Sharding checks that need 8 devices, run in a fresh interpreter.

``XLA_FLAGS=--xla_force_host_platform_device_count=8`` only takes effect
before JAX starts, and the suite's ``conftest.py`` has started it already, so
``test_sharding.py`` and ``test_checkpoint.py`` run this script in a
subprocess: ``python _sharding_worker.py sharding`` or
``python _sharding_worker.py checkpoint DIR``. It measures and prints one JSON
object on its last line; the tests make the assertions, so a failure names what
was measured. Mismatch lists hold one readable entry per leaf that differs.
"""

from __future__ import annotations

import faulthandler
import json
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_snr

NUM_STEPS = 20
LEARNING_RATE = 1e-2


def make_params() -> dict[str, Any]:
    """An MLP's params; every dimension divides 8 and (4, 2)."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    return {
        "hidden": {
            "kernel": jax.random.normal(k1, (16, 8), jnp.float32) * 0.3,
            "bias": jnp.zeros((8,), jnp.float32),
        },
        "out": {"kernel": jax.random.normal(k2, (8, 8), jnp.float32) * 0.3},
        "scale": jax.random.normal(k3, (), jnp.float32),
    }


def make_batch() -> tuple[jax.Array, jax.Array]:
    kx, ky = jax.random.split(jax.random.PRNGKey(1))
    return jax.random.normal(kx, (64, 16), jnp.float32), jax.random.normal(ky, (64, 8))


def loss_fn(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    h = jnp.tanh(x @ params["hidden"]["kernel"] + params["hidden"]["bias"][None, :])
    pred = params["scale"] * (h @ params["out"]["kernel"])
    return jnp.mean((pred - y) ** 2)


def param_specs(kind: str) -> dict[str, Any]:
    """FSDP (1-D mesh ``fsdp``) or data x model (2-D mesh) partition specs."""
    if kind == "1d":
        return {
            "hidden": {"kernel": P("fsdp", None), "bias": P("fsdp")},
            "out": {"kernel": P(None, "fsdp")},
            "scale": P(),
        }
    return {
        "hidden": {"kernel": P("data", "model"), "bias": P("model")},
        "out": {"kernel": P("model", "data")},
        "scale": P(),
    }


def make_mesh(kind: str, axis_type: AxisType) -> jax.sharding.Mesh:
    if kind == "1d":
        return jax.make_mesh((8,), ("fsdp",), axis_types=(axis_type,))
    return jax.make_mesh((4, 2), ("data", "model"), axis_types=(axis_type,) * 2)


def shard(tree: Any, mesh: jax.sharding.Mesh, specs: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, specs)


def moment_trees(state: Any) -> dict[str, Any]:
    return {"mu": state[0].mu, "nu": state[0].nu}


def sharding_mismatches(tree: Any, reference: Any, label: str) -> list[str]:
    """Leaves of ``tree`` whose sharding is not equivalent to ``reference``'s."""
    out = []
    for (path, x), r in zip(
        jax.tree_util.tree_flatten_with_path(tree)[0], jax.tree.leaves(reference), strict=True
    ):
        if not x.sharding.is_equivalent_to(r.sharding, x.ndim):
            out.append(f"{label}{jax.tree_util.keystr(path)}: {x.sharding} != {r.sharding}")
    return out


def type_mismatches(tree: Any, reference: Any, label: str) -> list[str]:
    """Leaves whose ``jax.typeof`` (dtype, shape and sharded type) differs."""
    out = []
    for (path, x), r in zip(
        jax.tree_util.tree_flatten_with_path(tree)[0], jax.tree.leaves(reference), strict=True
    ):
        if jax.typeof(x) != jax.typeof(r):
            out.append(f"{label}{jax.tree_util.keystr(path)}: {jax.typeof(x)} != {jax.typeof(r)}")
    return out


def max_abs_diff(a: Any, b: Any) -> float:
    diffs = [
        float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)), initial=0.0))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    ]
    return max(diffs)


def make_step(tx: optax.GradientTransformation, donate: bool):
    def step(params, state, x, y):
        grads = jax.grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def unsharded_run(num_steps: int = NUM_STEPS) -> tuple[Any, Any]:
    """The reference: the same training on one device."""
    tx = optax_snr.adam(LEARNING_RATE)
    params = make_params()
    x, y = make_batch()
    state = tx.init(params)
    step = make_step(tx, donate=False)
    for _ in range(num_steps):
        params, state = step(params, state, x, y)
    return params, state


def check_init_shardings() -> dict[str, Any]:
    """Eager ``init`` gives the moments the params' shardings (auto-sharded mesh).

    Also records, for the report only, how many moment leaves ``jax.jit(init)``
    leaves unsharded on an auto-sharded mesh, for ``optax_snr.adam`` and for
    ``optax.adam``: zeros do not depend on the params' values, so XLA's
    propagation has nothing to follow (explicit sharding fixes this, see
    :func:`check_explicit_types`).
    """
    tx = optax_snr.adam(LEARNING_RATE)
    mismatches = []
    jit_unsharded = {"optax_snr": 0, "optax": 0}
    for kind in ("1d", "2d"):
        mesh = make_mesh(kind, AxisType.Auto)
        params = shard(make_params(), mesh, param_specs(kind))
        state = tx.init(params)
        for name, moment in moment_trees(state).items():
            mismatches += sharding_mismatches(moment, params, f"{kind}/eager/{name}")
        for label, opt in (("optax_snr", tx), ("optax", optax.adam(LEARNING_RATE))):
            with jax.numpy_dtype_promotion("standard"):
                state = jax.jit(opt.init)(params)
            for moment in moment_trees(state).values():
                jit_unsharded[label] += len(sharding_mismatches(moment, params, ""))
    return {"init_mismatches": mismatches, "jit_init_auto_unsharded": jit_unsharded}


def check_explicit_types() -> dict[str, Any]:
    """Under explicit sharding, jitted init and update keep the sharded types."""
    tx = optax_snr.adam(LEARNING_RATE)
    mismatches = []
    checked = 0
    for kind in ("1d", "2d"):
        mesh = make_mesh(kind, AxisType.Explicit)
        with jax.set_mesh(mesh):
            params = shard(make_params(), mesh, param_specs(kind))
            state = jax.jit(tx.init)(params)
            for name, moment in moment_trees(state).items():
                mismatches += type_mismatches(moment, params, f"{kind}/init/{name}")
            grads = jax.tree.map(lambda p: p * jnp.asarray(0.5, p.dtype), params)
            updates, new_state = jax.jit(tx.update)(grads, state, params)
            mismatches += type_mismatches(updates, params, f"{kind}/update/updates")
            mismatches += type_mismatches(new_state, state, f"{kind}/update/state")
            checked += len(jax.tree.leaves(new_state)) + len(jax.tree.leaves(updates))
            spec = str(jax.typeof(new_state[0].mu["hidden"]["kernel"]))
    return {"explicit_mismatches": mismatches, "explicit_leaves_checked": checked, "spec": spec}


def explicit_format_optimizers() -> dict[str, optax.GradientTransformation]:
    """Optimizers whose own arguments take storage formats (every leaf stored)."""
    q8 = optax_snr.quantized(bits=8, block_size=4, min_size=0)
    q4 = optax_snr.quantized(bits=4, block_size=4, min_size=0)
    return {
        "amsgrad": optax_snr.amsgrad(LEARNING_RATE, mu_dtype=q8, nu_dtype=q4),
        "adabelief": optax_snr.adabelief(
            LEARNING_RATE, mu_dtype=q4, nu_dtype=optax_snr.factored(min_dim_size=8)
        ),
        "adopt": optax_snr.adopt(
            LEARNING_RATE, mu_dtype=optax_snr.stochastic_rounding(), nu_dtype=q8
        ),
    }


def check_explicit_formats() -> dict[str, Any]:
    """Storage formats through optimizers' arguments on an explicit FSDP mesh, jitted.

    The 1-D mesh's leaves take every block layout: rows split (hidden kernel),
    two entries per shard in blocks of 4 (bias), one entry per shard (out
    kernel: 4-bit codes gathered along it).
    """
    mismatches, diffs, checked = [], {}, 0
    x, y = make_batch()
    mesh = make_mesh("1d", AxisType.Explicit)
    for name, tx in explicit_format_optimizers().items():
        step = make_step(tx, donate=False)
        params, state = make_params(), tx.init(make_params())
        for _ in range(5):
            params, state = step(params, state, x, y)
        with jax.set_mesh(mesh):
            first = shard(make_params(), mesh, param_specs("1d"))
            first_state = jax.jit(tx.init)(first)
            xs, ys = (jax.device_put(a, NamedSharding(mesh, P())) for a in (x, y))
            sharded, sharded_state = first, first_state
            for _ in range(5):
                sharded, sharded_state = step(sharded, sharded_state, xs, ys)
            mismatches += type_mismatches(sharded_state, first_state, f"{name}/state")
            mismatches += type_mismatches(sharded, first, f"{name}/params")
            checked += len(jax.tree.leaves(sharded_state))
        diffs[name] = max_abs_diff((sharded, sharded_state), (params, state))
    return {
        "explicit_formats_mismatches": mismatches,
        "explicit_formats_diffs": diffs,
        "explicit_formats_leaves_checked": checked,
    }


def check_donated_train_step() -> dict[str, Any]:
    """20 donated, jitted steps on a 2-D mesh keep shardings and match one device."""
    tx = optax_snr.adam(LEARNING_RATE)
    mesh = make_mesh("2d", AxisType.Auto)
    specs = param_specs("2d")
    params = shard(make_params(), mesh, specs)
    x, y = (jax.device_put(a, NamedSharding(mesh, P("data"))) for a in make_batch())
    state = tx.init(params)  # Eager: zeros_like keeps each param's sharding.
    want_params = params
    count_replicated = True
    step = make_step(tx, donate=True)
    mismatches = []
    donated = True
    for i in range(NUM_STEPS):
        old_leaf = params["hidden"]["kernel"]
        params, state = step(params, state, x, y)
        donated = donated and old_leaf.is_deleted()
        mismatches += sharding_mismatches(params, want_params, f"step{i}/params")
        for name, moment in moment_trees(state).items():
            mismatches += sharding_mismatches(moment, want_params, f"step{i}/{name}")
        # The count starts as an uncommitted scalar and stays replicated.
        count_replicated = count_replicated and state[0].count.sharding.is_fully_replicated
    ref_params, ref_state = unsharded_run()
    return {
        "donated_mismatches": mismatches,
        "donated_inputs_deleted": bool(donated),
        "donated_count_replicated": bool(count_replicated),
        "donated_params_diff": max_abs_diff(params, ref_params),
        "donated_state_diff": max_abs_diff(state, ref_state),
        "donated_count": int(state[0].count),
    }


def check_shard_map_data_parallel() -> dict[str, Any]:
    """``shard_map`` over the batch with ``pmean`` of gradients equals one device."""
    tx = optax_snr.adam(LEARNING_RATE)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))

    def local_step(params, state, x, y):
        # Each device differentiates its own copy of the replicated params, so
        # the gradient is its shard's mean (otherwise shard_map's transpose
        # would already sum the gradients over devices).
        local = jax.tree.map(lambda p: jax.lax.pcast(p, "data", to="varying"), params)
        grads = jax.grad(loss_fn)(local, x, y)  # Mean over this device's rows.
        grads = jax.lax.pmean(grads, "data")  # Equal shards: the whole-batch mean.
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    step = jax.jit(
        jax.shard_map(
            local_step,
            mesh=mesh,
            in_specs=(P(), P(), P("data"), P("data")),
            out_specs=(P(), P()),
        )
    )
    with jax.set_mesh(mesh):
        params = make_params()
        state = tx.init(params)
        x, y = (jax.device_put(a, NamedSharding(mesh, P("data"))) for a in make_batch())
        for _ in range(NUM_STEPS):
            params, state = step(params, state, x, y)
    ref_params, ref_state = unsharded_run()
    return {
        "dp_params_diff": max_abs_diff(params, ref_params),
        "dp_state_diff": max_abs_diff(state, ref_state),
        "dp_count": int(state[0].count),
    }


def check_checkpoint_reshard(directory: str) -> dict[str, Any]:
    """Saves mid-run on a 1-D mesh, restores onto a 2-D mesh, finishes the run."""
    import orbax.checkpoint as ocp

    tx = optax_snr.adam(LEARNING_RATE)
    half = NUM_STEPS // 2
    mesh1 = make_mesh("1d", AxisType.Auto)
    params = shard(make_params(), mesh1, param_specs("1d"))
    x, y = make_batch()
    state = tx.init(params)
    step = make_step(tx, donate=False)
    for _ in range(half):
        params, state = step(params, state, x, y)

    path = f"{directory}/step_{half}"
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, {"params": params, "opt_state": state})
        ckptr.wait_until_finished()

        mesh2 = make_mesh("2d", AxisType.Auto)
        target_params = shard(make_params(), mesh2, param_specs("2d"))
        target_state = tx.init(target_params)
        # The count (an uncommitted scalar from init) is restored replicated
        # on the new mesh; every other leaf takes its target's sharding.
        replicated = NamedSharding(mesh2, P())

        def target(a):
            sharding = a.sharding if isinstance(a.sharding, NamedSharding) else replicated
            return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)

        abstract = jax.tree.map(target, {"params": target_params, "opt_state": target_state})
        restored = ckptr.restore(path, abstract)

    mismatches = sharding_mismatches(restored, abstract, "restored")
    restored_diff = max_abs_diff(
        {"params": params, "opt_state": state}, restored
    )  # Values survive resharding.
    params, state = restored["params"], restored["opt_state"]
    for _ in range(NUM_STEPS - half):
        params, state = step(params, state, x, y)
    ref_params, ref_state = unsharded_run()
    return {
        "restored_type": type(restored["opt_state"][0]).__name__,
        "reshard_mismatches": mismatches,
        "reshard_restored_diff": restored_diff,
        "reshard_params_diff": max_abs_diff(params, ref_params),
        "reshard_state_diff": max_abs_diff(state, ref_state),
        "reshard_count": int(state[0].count),
    }


def main(argv: list[str]) -> None:
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    jax.config.update("jax_numpy_rank_promotion", "raise")
    result: dict[str, Any] = {"device_count": jax.device_count()}
    if argv[1] == "sharding":
        result.update(check_init_shardings())
        result.update(check_explicit_types())
        result.update(check_explicit_formats())
        result.update(check_donated_train_step())
        result.update(check_shard_map_data_parallel())
    elif argv[1] == "checkpoint":
        result.update(check_checkpoint_reshard(argv[2]))
    else:
        raise SystemExit(f"unknown mode {argv[1]!r}")
    print(json.dumps(result))


if __name__ == "__main__":
    faulthandler.dump_traceback_later(240, exit=True)
    main(sys.argv)
