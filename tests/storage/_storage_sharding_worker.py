"""Stored moments on 8 simulated CPU devices; run by ``test_storage_sharding.py``.

The device count is fixed before JAX starts, so this runs in a fresh
interpreter with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``. It
trains a few donated, jitted steps with each storage format on an FSDP (1-D)
and a data x model (2-D) mesh, each with ``AxisType.Auto`` (XLA's sharding
propagation) and ``AxisType.Explicit`` axes (sharded types; on the 1-D mesh
also ``init`` and one step eagerly), and on one device, and prints one JSON
object: what is sharded how, and how far the sharded runs are from the
unsharded ones. It also encodes leaves whose blocks straddle the shards.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_snr
from optax_snr.storage.base import is_stored

FORMATS = {  # (mu_dtype, nu_dtype)
    "8bit": (optax_snr.quantized(bits=8, block_size=64, min_size=0),) * 2,
    "4bit": (optax_snr.quantized(bits=4, block_size=64, min_size=0),) * 2,
    "sr_bf16": (optax_snr.stochastic_rounding(),) * 2,
    "factored": (None, optax_snr.factored(min_dim_size=8)),
}
# Blocks of 64 along the last axis: "kernel" splits its rows only (1-D) or
# 4 blocks over 2 devices (2-D); "bias" has 4 blocks for 8 devices (1-D: they
# cannot follow the shards) or 2 (2-D); "wide" has 8 blocks over 8 devices,
# in 2-D over both mesh axes at once.
SPECS = {
    "1d": {"kernel": P("fsdp", None), "bias": P("fsdp"), "wide": P(None, "fsdp")},
    "2d": {"kernel": P("data", "model"), "bias": P("model"), "wide": P(None, ("data", "model"))},
}
AXIS_TYPES = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}


def make_params() -> dict[str, jax.Array]:
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    return {
        "kernel": jax.random.normal(k1, (64, 256), jnp.float32),
        "bias": jax.random.normal(k2, (256,), jnp.float32),
        "wide": jax.random.normal(k3, (8, 512), jnp.float32),
    }


def grad_fn(params: Any, i: jax.Array) -> Any:
    """Elementwise in the params, so no reduction order differs between runs."""
    t = i.astype(jnp.float32)
    return jax.tree.map(lambda p: p + jnp.sin(3.0 * p + t), params)


def train(tx: optax.GradientTransformation, params: Any) -> tuple[Any, Any, list[str]]:
    """5 jitted, donated steps; also the leaves whose type changed on the way.

    (Types are compared for explicit meshes only: on an auto-sharded mesh the
    scalars that ``init`` leaves uncommitted change type when first committed.)
    """

    def step(params, state, i):
        updates, state = tx.update(grad_fn(params, i), state, params)
        return optax.apply_updates(params, updates), state

    step = jax.jit(step, donate_argnums=(0, 1))
    state = tx.init(params)
    types = jax.tree.map(jax.typeof, (params, state))
    for i in range(5):
        params, state = step(params, state, jnp.asarray(i, jnp.int32))
    changed = type_changes((params, state), types)
    return params, state, changed


def eager_step(tx: optax.GradientTransformation, params: Any) -> tuple[Any, list[str]]:
    """``init`` and one step without jit (the formats' own code is jitted inside).

    The types it reports changed are checked against the step's and against
    ``jax.jit(tx.init)``'s state (on an explicit mesh, a jitted ``init`` sees
    the params' shardings in their types and must give the same state).
    """
    state = tx.init(params)
    types = jax.tree.map(jax.typeof, (params, state))
    changed = type_changes((params, jax.jit(tx.init)(params)), types)
    updates, state = tx.update(grad_fn(params, jnp.asarray(0, jnp.int32)), state, params)
    params = optax.apply_updates(params, updates)
    return (params, state), changed + type_changes((params, state), types)


def type_changes(tree: Any, types: Any) -> list[str]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [
        f"{jax.tree_util.keystr(path)}: {jax.typeof(x)} != {t}"
        for (path, x), t in zip(flat, jax.tree.leaves(types), strict=True)
        if jax.typeof(x) != t
    ]


def max_abs_diff(a: Any, b: Any) -> float:
    return max(
        float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def spec(array: jax.Array) -> str:
    """The array's partition spec, trailing unsharded axes dropped (``P()``: replicated)."""
    entries = list(array.sharding.spec)
    while entries and entries[-1] is None:
        entries.pop()
    return str(P(*entries))


def stored_arrays(state: Any) -> list[tuple[str, str, Any]]:
    """(leaf, field, array) for every array of every stored moment leaf."""
    out = []
    for moment in ("mu", "nu"):
        for name, leaf in getattr(state[0], moment).items():
            if not is_stored(leaf):
                continue
            for field in leaf.__dataclass_fields__:
                value = getattr(leaf, field)
                if isinstance(value, jax.Array) and value.ndim:
                    out.append((name, f"{moment}.{field}", value))
    return out


# Leaves whose last-axis shards hold no whole block, on the 1-D explicit mesh:
# (shape, block_size). (8, 120): 15 entries per shard, blocks of 60; (8, 104):
# 13 per shard, blocks of 35 (the last one short). At 4 bits an odd shard cannot
# hold whole bytes, so there the last axis is gathered.
ENCODE_CASES = {"8x120": ((8, 120), 64), "8x104": ((8, 104), 50)}


def check_encode_on_explicit_mesh() -> dict[str, Any]:
    """Encode and decode on the explicit 1-D mesh, eagerly and jitted, against one device."""
    mesh = make_mesh("1d", AxisType.Explicit)
    out = {}
    for name, (shape, block_size) in ENCODE_CASES.items():
        x = jax.random.normal(jax.random.PRNGKey(3), shape, jnp.float32)
        for bits in (8, 4):
            for signed in (True, False):
                fmt = optax_snr.quantized(bits=bits, block_size=block_size, min_size=0)
                value = x if signed else jnp.square(x)

                def encode(v, fmt=fmt, signed=signed):
                    return fmt.encode(v, fmt.init(v, signed=signed))

                want = encode(value)
                with jax.set_mesh(mesh):
                    sharded = jax.device_put(value, NamedSharding(mesh, P(None, "fsdp")))
                    modes = (("eager", encode), ("jit", jax.jit(encode)))
                    for mode, fn in modes if name == "8x120" else modes[1:]:
                        got = fn(sharded)
                        decoded = got.decode()
                        out[f"{name}/{bits}/{'signed' if signed else 'positive'}/{mode}"] = {
                            "equal": bool(
                                np.array_equal(got.codes, want.codes)
                                and np.array_equal(got.scales, want.scales)
                                and np.array_equal(decoded, want.decode())
                            ),
                            "codes": spec(got.codes),
                            "scales": spec(got.scales),
                            "decoded": spec(decoded),
                        }
    return out


def make_mesh(kind: str, axis_type: AxisType) -> jax.sharding.Mesh:
    shape, axes = ((8,), ("fsdp",)) if kind == "1d" else ((4, 2), ("data", "model"))
    return jax.make_mesh(shape, axes, axis_types=(axis_type,) * len(axes))


def main() -> None:
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    result: dict[str, Any] = {"device_count": jax.device_count(), "runs": {}}
    for name, (mu, nu) in FORMATS.items():
        tx = optax_snr.adam(1e-2, mu_dtype=mu, nu_dtype=nu)
        reference = train(tx, make_params())[:2]
        eager_reference = eager_step(tx, make_params())[0]
        for kind, specs in SPECS.items():
            for axis, axis_type in AXIS_TYPES.items():
                mesh = make_mesh(kind, axis_type)
                context = jax.set_mesh(mesh) if axis == "explicit" else contextlib.nullcontext()
                with context:
                    params = {
                        k: jax.device_put(v, NamedSharding(mesh, specs[k]))
                        for k, v in make_params().items()
                    }
                    run_eager = axis == "explicit" and kind == "1d"  # its leaves take every path
                    if run_eager:  # before the donated steps delete the params
                        eager, eager_changed = eager_step(tx, params)
                    *sharded, changed = train(tx, params)
                    run = {
                        "max_abs_diff": max_abs_diff(sharded, reference),
                        "specs": {f"{k}/{f}": spec(a) for k, f, a in stored_arrays(sharded[1])},
                        "dense_specs": {
                            f"{m}/{k}": spec(v)
                            for m in ("mu", "nu")
                            for k, v in getattr(sharded[1][0], m).items()
                            if not is_stored(v)
                        },
                    }
                    if axis == "explicit":
                        run["type_changes"] = changed
                    if run_eager:
                        run["eager_max_abs_diff"] = max_abs_diff(eager, eager_reference)
                        run["eager_type_changes"] = eager_changed
                result["runs"][f"{name}/{kind}/{axis}"] = run
    result["encode"] = check_encode_on_explicit_mesh()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
