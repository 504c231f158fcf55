"""optax_snr in Flax: nnx.Optimizer and Linen's TrainState, against optax.adam."""

import chex
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen, nnx
from flax.training import train_state

import optax_snr


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(6, 8, rngs=rngs)
        self.out = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.hidden(x)))


def batches(num_steps, seed=0):
    """Mini-batches of a learnable task: the label is the largest of 3 inputs."""
    rng = np.random.default_rng(seed)
    xs = [rng.normal(size=(32, 6)).astype(np.float32) for _ in range(num_steps)]
    return [(x, np.argmax(x[:, :3], axis=1).astype(np.int32)) for x in xs]


def decay(count):
    """A schedule with explicit casts (Optax's own fail under strict promotion)."""
    return jnp.float32(1e-2) / (1 + count.astype(jnp.float32))


def nnx_train(tx, num_steps, *, diagnose=False):
    """Trains a fresh MLP (always the same init) with ``nnx.Optimizer``."""
    model = MLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        def loss_fn(model):
            logits = model(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [step(model, optimizer, x, y) for x, y in batches(num_steps)]
    diag = jax.jit(optax_snr.snr_diagnostics)(optimizer.opt_state) if diagnose else None
    return nnx.state(model, nnx.Param), losses, optimizer, diag


@pytest.mark.parametrize("learning_rate", [1e-2, decay])
def test_nnx_optimizer_equals_optax_adam(learning_rate):
    params, losses, optimizer, _ = nnx_train(optax_snr.adam(learning_rate), 20)
    with helpers.standard_promotion():  # optax.adam needs standard promotion.
        ref_params, ref_losses, ref_optimizer, _ = nnx_train(optax.adam(learning_rate), 20)
    helpers.assert_trees_bitwise_equal(jax.tree.leaves(params), jax.tree.leaves(ref_params))
    helpers.assert_trees_bitwise_equal(losses, ref_losses)
    assert int(optimizer.step[...]) == int(ref_optimizer.step[...]) == 20
    assert int(optax_snr.snr_diagnostics(optimizer.opt_state).count) == 20
    assert float(np.mean(losses[-5:])) < float(np.mean(losses[:5]))  # It trains.


def test_diagnostics_read_an_nnx_optimizer_state():
    _, _, _, diag = nnx_train(optax_snr.adam(1e-2), 5, diagnose=True)
    with helpers.standard_promotion():
        _, _, _, ref = nnx_train(optax.adam(1e-2), 5, diagnose=True)
    assert int(diag.count) == 5
    # Leaf names drop NNX's Variable wrapper: "hidden/kernel", not ".../value".
    assert set(diag.per_leaf) == {"hidden/bias", "hidden/kernel", "out/bias", "out/kernel"}
    chex.assert_trees_all_close(diag, ref, rtol=1e-6)
    chex.assert_tree_all_finite(diag)


def test_nnx_optimizer_with_injected_learning_rate():
    # inject_hyperparams exposes the learning rate and b1, b2, eps as state.
    tx = optax.inject_hyperparams(optax_snr.adam)(learning_rate=1e-2, b1=0.8)
    params, _, optimizer, diag = nnx_train(tx, 3, diagnose=True)
    assert float(optimizer.opt_state.hyperparams["b1"][...]) == pytest.approx(0.8)
    with helpers.standard_promotion():
        ref_tx = optax.inject_hyperparams(optax.adam)(learning_rate=1e-2, b1=0.8)
        ref_params, *_ = nnx_train(ref_tx, 3)
    helpers.assert_trees_bitwise_equal(jax.tree.leaves(params), jax.tree.leaves(ref_params))
    assert int(diag.count) == 3


class LinenMLP(linen.Module):
    @linen.compact
    def __call__(self, x):
        return linen.Dense(3)(jax.nn.relu(linen.Dense(8)(x)))


def linen_train(tx, num_steps):
    """Trains a Linen MLP with ``TrainState.create(..., tx=tx)``."""
    model = LinenMLP()
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 6), jnp.float32))["params"]
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

    @jax.jit
    def step(state, x, y):
        def loss_fn(params):
            logits = state.apply_fn({"params": params}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), loss

    losses = []
    for x, y in batches(num_steps):
        state, loss = step(state, x, y)
        losses.append(loss)
    return state, losses


def test_linen_train_state_equals_optax_adam():
    state, losses = linen_train(optax_snr.adam(1e-2), 20)
    with helpers.standard_promotion():
        ref_state, ref_losses = linen_train(optax.adam(1e-2), 20)
    helpers.assert_trees_bitwise_equal(state.params, ref_state.params)
    helpers.assert_trees_bitwise_equal(losses, ref_losses)
    assert int(state.step) == 20
    diag = optax_snr.snr_diagnostics(state.opt_state)
    assert set(diag.per_leaf) == {
        "Dense_0/bias",
        "Dense_0/kernel",
        "Dense_1/bias",
        "Dense_1/kernel",
    }
