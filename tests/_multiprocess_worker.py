"""One process of the two-process training run started by ``test_multiprocess.py``.

Run as ``python _multiprocess_worker.py PROCESS_ID PORT OUT_FILE`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=2``: the two processes join
through ``jax.distributed`` on ``127.0.0.1:PORT`` (CPU collectives over gloo),
shard params and optimizer state over the 4 global devices, train, and process 0
writes the gathered result to ``OUT_FILE`` (``.npz``).

The problem itself (:func:`make_problem`, :func:`train`) has no side effects at
import, so the test imports this module to compute the single-process reference
with exactly the same code.
"""

from __future__ import annotations

import faulthandler
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_snr

NUM_STEPS = 20
LEARNING_RATE = 1e-2


def make_problem() -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Initial params and a fixed regression batch, as host NumPy arrays."""
    rng = np.random.default_rng(0)
    params = {
        "kernel": rng.normal(size=(8, 4)).astype(np.float32),
        "bias": rng.normal(size=(4,)).astype(np.float32),
    }
    x = rng.normal(size=(32, 8)).astype(np.float32)
    y = rng.normal(size=(32, 4)).astype(np.float32)
    return params, x, y


def loss_fn(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    pred = jnp.tanh(x @ params["kernel"] + params["bias"][None, :])
    return jnp.mean((pred - y) ** 2)


def train(params: Any, x: jax.Array, y: jax.Array, num_steps: int = NUM_STEPS) -> tuple[Any, Any]:
    """``num_steps`` of ``optax_snr.adam`` under one jitted step; returns (params, state)."""
    tx = optax_snr.adam(LEARNING_RATE)

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = jax.jit(tx.init)(params)
    for _ in range(num_steps):
        params, state = step(params, state)
    return params, state


def _gloo_on_loopback() -> None:
    """Makes gloo listen and connect on 127.0.0.1, never on another address.

    JAX builds its gloo collectives without a host name, and gloo then uses
    whatever this machine's name resolves to. JAX offers no public setting for
    it, so the (private) factory it calls is wrapped to pass ``127.0.0.1``.
    """
    from jax._src import xla_bridge

    make = xla_bridge._jax.make_gloo_tcp_collectives

    def on_loopback(**kwargs):
        _GLOO_HOSTS.append("127.0.0.1")
        return make(**kwargs, hostname="127.0.0.1")

    xla_bridge._jax.make_gloo_tcp_collectives = on_loopback


_GLOO_HOSTS: list[str] = []  # Hosts the gloo collectives were made with.


def main(process_id: int, port: int, out_file: str) -> None:
    from jax.experimental import multihost_utils
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_numpy_dtype_promotion", "strict")
    _gloo_on_loopback()
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        coordinator_bind_address=f"127.0.0.1:{port}",
        num_processes=2,
        process_id=process_id,
        initialization_timeout=60,
        shutdown_timeout_seconds=30,
    )
    assert jax.process_count() == 2, jax.process_count()
    assert jax.device_count() == 4 and jax.local_device_count() == 2
    assert _GLOO_HOSTS == ["127.0.0.1"], _GLOO_HOSTS

    mesh = jax.make_mesh((4,), ("fsdp",), axis_types=(AxisType.Auto,))
    shardings = {"kernel": NamedSharding(mesh, P("fsdp")), "bias": NamedSharding(mesh, P("fsdp"))}
    replicated = NamedSharding(mesh, P())

    host_params, x, y = make_problem()

    def global_array(value, sharding):
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    params = {k: global_array(v, shardings[k]) for k, v in host_params.items()}
    x = global_array(x, replicated)
    y = global_array(y, replicated)

    params, state = train(params, x, y)

    mu, nu = state[0].mu, state[0].nu
    for k in params:
        assert params[k].sharding == shardings[k], (k, params[k].sharding)
        assert mu[k].sharding.is_equivalent_to(shardings[k], mu[k].ndim), (k, mu[k].sharding)
        assert nu[k].sharding.is_equivalent_to(shardings[k], nu[k].ndim), (k, nu[k].sharding)
        assert len(mu[k].addressable_shards) == 2

    gathered = multihost_utils.process_allgather(
        {"params": params, "mu": mu, "nu": nu, "count": state[0].count}, tiled=True
    )
    if process_id == 0:
        flat = {
            jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(gathered)[0]
        }
        np.savez(out_file, **flat)
    multihost_utils.sync_global_devices("optax_snr_multiprocess_done")
    jax.distributed.shutdown()
    print(f"process {process_id}: done", flush=True)


if __name__ == "__main__":
    # A hung collective must not outlive the test: dump the stacks and exit.
    faulthandler.dump_traceback_later(90, exit=True)
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
    # Both processes are past the shutdown barrier and the result is written:
    # skip the interpreter's teardown of the distributed runtime, which can
    # hang once the other process (the coordinator) has gone.
    os._exit(0)
