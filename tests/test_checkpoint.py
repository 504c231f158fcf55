"""Checkpoints: stop mid-training, restore, and continue bit for bit."""

from __future__ import annotations

import chex
import flax.serialization
import helpers
import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
import pytest
from test_sharding import run_worker

import optax_snr

TOTAL_STEPS = 12
SAVE_AT = 5


def _decay(count):
    """A schedule that runs under strict promotion (Optax's schedules do not)."""
    return jnp.asarray(1e-2, jnp.float32) * jnp.asarray(0.9, jnp.float32) ** count.astype(
        jnp.float32
    )


OPTIMIZERS = {
    "adam": lambda: optax_snr.adam(1e-2),
    "adam_bf16_mu": lambda: optax_snr.adam(1e-2, mu_dtype=jnp.bfloat16),
    "adam_schedule": lambda: optax_snr.adam(_decay),
    "inject_hyperparams": lambda: optax.inject_hyperparams(optax_snr.adam)(learning_rate=1e-2),
    "skip_nonfinite": lambda: optax_snr.skip_nonfinite(optax_snr.adam(1e-2)),
    "apply_if_finite": lambda: optax.apply_if_finite(optax_snr.adam(1e-2), 3),
}


def _jitted_step(tx):
    @jax.jit
    def step(params, state, i):
        grads = helpers.noisy_grad(params, i)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def _train(step, params, state, start, stop):
    for i in range(start, stop):
        params, state = step(params, state, jnp.asarray(i, jnp.int32))
    return params, state


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_orbax_resume_is_bit_identical(tmp_path, name):
    tx = OPTIMIZERS[name]()
    step = _jitted_step(tx)
    params = helpers.multi_leaf_params()
    state = tx.init(params)

    params, state = _train(step, params, state, 0, SAVE_AT)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "ckpt", {"params": params, "opt_state": state})
        ckptr.wait_until_finished()
    uninterrupted = _train(step, params, state, SAVE_AT, TOTAL_STEPS)

    # A fresh start: the target structure comes from init, the values from disk.
    fresh_params = helpers.multi_leaf_params()
    target = {"params": fresh_params, "opt_state": tx.init(fresh_params)}
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(tmp_path / "ckpt", abstract)
    chex.assert_trees_all_equal_structs(restored, target)  # NamedTuples come back.
    helpers.assert_trees_bitwise_equal(restored, {"params": params, "opt_state": state})

    resumed = _train(step, restored["params"], restored["opt_state"], SAVE_AT, TOTAL_STEPS)
    helpers.assert_trees_bitwise_equal(resumed, uninterrupted)
    assert int(optax.tree.get(resumed[1], "count", filtering=_bias_count)) == TOTAL_STEPS


def _bias_count(path, _):
    return getattr(path[-1], "tuple_name", None) == "ScaleByAdamState"


def test_orbax_restore_onto_a_different_sharding(tmp_path):
    # Saved on an 8-device FSDP mesh, restored onto a (4, 2) data x model mesh.
    measured = run_worker("checkpoint", str(tmp_path))
    assert measured["restored_type"] == "ScaleByAdamState"
    assert measured["reshard_mismatches"] == []
    assert measured["reshard_restored_diff"] == 0.0
    assert measured["reshard_count"] == 20
    assert measured["reshard_params_diff"] <= 1e-6
    assert measured["reshard_state_diff"] <= 1e-6


@pytest.mark.parametrize("name", ["adam", "skip_nonfinite", "inject_hyperparams"])
def test_flax_serialization_round_trip(name):
    tx = OPTIMIZERS[name]()
    step = _jitted_step(tx)
    params = helpers.multi_leaf_params()
    params, state = _train(step, params, tx.init(params), 0, SAVE_AT)

    blob = flax.serialization.to_bytes(state)
    restored = flax.serialization.from_bytes(tx.init(params), blob)
    chex.assert_trees_all_equal_structs(restored, state)
    helpers.assert_trees_bitwise_equal(restored, state)

    as_dict = flax.serialization.to_state_dict(state)
    helpers.assert_trees_bitwise_equal(
        flax.serialization.from_state_dict(tx.init(params), as_dict), state
    )

    resumed = _train(step, params, restored, SAVE_AT, TOTAL_STEPS)
    uninterrupted = _train(step, params, state, SAVE_AT, TOTAL_STEPS)
    helpers.assert_trees_bitwise_equal(resumed, uninterrupted)
