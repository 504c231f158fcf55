"""Readers on sharded states with 8 simulated CPU devices, in a fresh interpreter.

``XLA_FLAGS=--xla_force_host_platform_device_count=8`` only takes effect
before JAX starts, so ``test_sharded_readers.py`` runs this script in a
subprocess. It builds an Adam state sharded over Explicit (and Auto) meshes,
reads it with ``snr_diagnostics`` and ``noise_scale`` eagerly and under
``jax.jit``, and prints one JSON object on its last line: the largest relative
difference from the same state read unsharded, and any error met.
"""

from __future__ import annotations

import faulthandler
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_snr

# One leaf above the 32,768 entries beyond which quantiles are sampled.
SHAPES = {"big": (256, 256), "kernel": (16, 8), "bias": (8,), "scale": ()}
SPECS = {
    "1d": {"big": P("x", None), "kernel": P(None, "x"), "bias": P("x"), "scale": P()},
    "2d": {"big": P("x", "y"), "kernel": P("y", "x"), "bias": P("y"), "scale": P()},
}


def make_state() -> Any:
    rng = np.random.default_rng(0)
    params = {k: jnp.zeros(s, jnp.float32) for k, s in SHAPES.items()}
    tx = optax_snr.adam(1e-3)
    state = tx.init(params)
    for _ in range(5):
        grads = {k: jnp.asarray(rng.normal(size=s) + 0.2, jnp.float32) for k, s in SHAPES.items()}
        _, state = tx.update(grads, state)
    return state


def shard_state(state: Any, mesh: jax.sharding.Mesh, specs: dict) -> Any:
    def place(path, x):
        name = next((k.key for k in path if isinstance(k, jax.tree_util.DictKey)), None)
        spec = specs[name] if name in specs else P()
        return jax.device_put(x, NamedSharding(mesh, spec))

    return jax.tree_util.tree_map_with_path(place, state)


def read(state: Any) -> Any:
    return (optax_snr.snr_diagnostics(state), optax_snr.noise_scale(state, 16))


def rel_diff(a: Any, b: Any) -> float:
    """The largest relative difference between two trees; equal entries (inf too) give 0."""
    worst = 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        same = (x == y) | (np.isnan(x) & np.isnan(y))
        with np.errstate(invalid="ignore"):
            diff = np.where(same, 0.0, np.abs(x - y) / (np.abs(y) + 1e-30))
        worst = max(worst, float(np.max(np.nan_to_num(diff, nan=np.inf), initial=0.0)))
    return worst


def main() -> None:
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    state = make_state()
    reference = read(state)
    result: dict[str, Any] = {"device_count": jax.device_count(), "cases": {}}
    for kind, shape, names in (("1d", (8,), ("x",)), ("2d", (4, 2), ("x", "y"))):
        for axis_type in (AxisType.Explicit, AxisType.Auto):
            mesh = jax.make_mesh(shape, names, axis_types=(axis_type,) * len(names))
            with jax.set_mesh(mesh):
                sharded = shard_state(state, mesh, SPECS[kind])
                big = sharded[0].mu["big"]
                # Eagerly on Explicit meshes, the case that used to fail.
                modes = [("jit", jax.jit(read))]
                if axis_type == AxisType.Explicit:
                    modes.append(("eager", read))
                for mode, fn in modes:
                    label = f"{kind}/{axis_type.name}/{mode}"
                    try:
                        got = fn(sharded)
                        result["cases"][label] = {
                            "diff": rel_diff(got, reference),
                            "sharded": not big.sharding.is_fully_replicated,
                            "per_leaf": sorted(got[0].per_leaf),
                        }
                    except Exception as e:  # Recorded for the test to report.
                        result["cases"][label] = {"error": f"{type(e).__name__}: {e}"[:500]}
    print(json.dumps(result))


if __name__ == "__main__":
    faulthandler.dump_traceback_later(240, exit=True)
    main()
