"""Stored moments on 8 simulated CPU devices; run by ``test_storage_sharding.py``.

The device count is fixed before JAX starts, so this runs in a fresh
interpreter with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``. It
trains a few donated, jitted steps with each storage format on an FSDP (1-D)
and a data x model (2-D) mesh and on one device, and prints one JSON object:
what is sharded how, and how far the sharded run is from the unsharded one.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_snr

FORMATS = {
    "8bit": optax_snr.quantized(bits=8, block_size=64, min_size=0),
    "4bit": optax_snr.quantized(bits=4, block_size=64, min_size=0),
    "sr_bf16": optax_snr.stochastic_rounding(),
}
SPECS = {
    "1d": {"kernel": P("fsdp", None), "bias": P("fsdp")},
    "2d": {"kernel": P("data", "model"), "bias": P("model")},
}


def make_params() -> dict[str, jax.Array]:
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    return {
        "kernel": jax.random.normal(k1, (64, 256), jnp.float32),
        "bias": jax.random.normal(k2, (256,), jnp.float32),
    }


def grad_fn(params: Any, i: jax.Array) -> Any:
    """Elementwise in the params, so no reduction order differs between runs."""
    t = i.astype(jnp.float32)
    return jax.tree.map(lambda p: p + jnp.sin(3.0 * p + t), params)


def train(tx: optax.GradientTransformation, params: Any) -> tuple[Any, Any]:
    @jax.jit
    def step(params, state, i):
        updates, state = tx.update(grad_fn(params, i), state, params)
        return optax.apply_updates(params, updates), state

    step = jax.jit(step, donate_argnums=(0, 1))
    state = tx.init(params)
    for i in range(5):
        params, state = step(params, state, jnp.asarray(i, jnp.int32))
    return params, state


def stored_arrays(state: Any) -> list[tuple[str, str, Any]]:
    """(leaf, field, array) for every array of every stored moment leaf."""
    out = []
    for moment in ("mu", "nu"):
        tree = getattr(state[0], moment)
        for name, leaf in tree.items():
            for field in leaf.__dataclass_fields__:
                value = getattr(leaf, field)
                if isinstance(value, jax.Array) and value.ndim:
                    out.append((name, f"{moment}.{field}", value))
    return out


def main() -> None:
    result: dict[str, Any] = {"device_count": jax.device_count(), "runs": {}}
    for name, fmt in FORMATS.items():
        tx = optax_snr.adam(1e-2, mu_dtype=fmt, nu_dtype=fmt)
        reference = train(tx, make_params())
        for kind, specs in SPECS.items():
            shape = (8,) if kind == "1d" else (4, 2)
            axes = ("fsdp",) if kind == "1d" else ("data", "model")
            mesh = jax.make_mesh(shape, axes, axis_types=(AxisType.Auto,) * len(axes))
            params = {
                k: jax.device_put(v, NamedSharding(mesh, specs[k]))
                for k, v in make_params().items()
            }
            sharded = train(tx, params)
            diffs = [
                float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
                for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(reference), strict=True)
            ]
            specs_seen = {
                f"{leaf}/{field}": str(array.sharding.spec)
                for leaf, field, array in stored_arrays(sharded[1])
            }
            replicated = [
                f"{leaf}/{field}"
                for leaf, field, array in stored_arrays(sharded[1])
                if array.sharding.is_fully_replicated
            ]
            result["runs"][f"{name}/{kind}"] = {
                "max_abs_diff": max(diffs),
                "replicated": replicated,
                "specs": specs_seen,
                "num_stored_arrays": len(specs_seen),
            }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
