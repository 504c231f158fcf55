"""Shared test helpers: tree comparison, reference runs and test problems."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

REPO = pathlib.Path(__file__).resolve().parents[1]  # The repository root.


def run_eight_device_worker(worker: pathlib.Path, *args: str, timeout: float = 300) -> dict:
    """Runs ``worker`` in a subprocess on 8 simulated CPU devices; returns its JSON result.

    ``XLA_FLAGS`` must be set before jax is imported, hence the subprocess. The
    worker prints one JSON object, with ``device_count``, as its last line.
    """
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, str(worker), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["device_count"] == 8
    return result


@contextlib.contextmanager
def standard_promotion() -> Iterator[None]:
    """Runs Optax (which needs implicit promotion) inside the strict suite."""
    with jax.numpy_dtype_promotion("standard"):
        yield


def tree_max_abs_diff(a: Any, b: Any) -> float:
    """The largest absolute elementwise difference between two trees."""
    diffs = jax.tree.map(
        lambda x, y: float(
            np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)), initial=0.0)
        ),
        a,
        b,
    )
    return max(jax.tree.leaves(diffs), default=0.0)


def assert_trees_bitwise_equal(a: Any, b: Any) -> None:
    """Every leaf equal bit for bit, with the same dtype and shape."""
    chex.assert_trees_all_equal_structs(a, b)
    chex.assert_trees_all_equal_dtypes(a, b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.atleast_1d(np.asarray(x)), np.atleast_1d(np.asarray(y))
        assert x.shape == y.shape
        worst = np.max(np.abs(x.astype(np.complex128) - y.astype(np.complex128)), initial=0.0)
        assert np.array_equal(x.view(np.uint8), y.view(np.uint8)), (
            f"not bit-identical: max |diff| = {worst}"
        )


def multi_leaf_params(dtype: Any = jnp.float32) -> dict[str, Any]:
    """A small pytree with matrices, vectors and a scalar, nested two deep."""
    key = jax.random.PRNGKey(42)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    return {
        "dense": {
            "kernel": jax.random.normal(k1, (4, 3), dtype),
            "bias": jax.random.normal(k2, (3,), dtype),
        },
        "out": [jax.random.normal(k3, (3, 2), dtype), jax.random.normal(k4, (), dtype)],
    }


def noisy_grad(params: Any, step: jax.Array) -> Any:
    """A deterministic, step-dependent gradient with signal and noise parts.

    The gradient of ``0.5 * ||p||^2`` (the signal, pulling towards zero) plus a
    sinusoidal term that changes sign with the step (the noise).
    """
    step = jnp.asarray(step, jnp.float32)

    def leaf(p):
        phase = jnp.arange(p.size, dtype=jnp.float32).reshape(p.shape)
        noise = jnp.sin(phase * 1.7 + step * 0.9).astype(p.dtype)
        return p + jnp.asarray(0.3, p.dtype) * noise

    return jax.tree.map(leaf, params)


def run_optimizer(
    tx: optax.GradientTransformation,
    params: Any,
    num_steps: int,
    *,
    jit: bool = True,
    grad_fn: Callable[[Any, jax.Array], Any] = noisy_grad,
) -> tuple[Any, Any]:
    """Runs ``num_steps`` of ``tx`` on ``grad_fn``; returns (params, state)."""

    def step(p, s, i):
        updates, s = tx.update(grad_fn(p, i), s, p)
        return optax.apply_updates(p, updates), s

    if jit:
        step = jax.jit(step)
    state = tx.init(params)
    for i in range(num_steps):
        params, state = step(params, state, jnp.asarray(i, jnp.int32))
    return params, state


def assert_steps_without_retrace(tx: optax.GradientTransformation, grads: Any, num_steps: int = 5):
    """Runs ``num_steps`` jitted updates on ``grads``; fails if the step traces twice
    or if the state's shapes and dtypes change. Returns the last (updates, state)."""
    state = tx.init(grads)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(g, s):
        return tx.update(g, s)

    for _ in range(num_steps):
        updates, new_state = step(grads, state)
        chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
        state = new_state
    return updates, state
