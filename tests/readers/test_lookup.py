"""Tests for optax_snr.readers.lookup: the moments found in every state layout.

The readers must work on optax_snr's states and on Optax's own optimizers'
states alike (the ready-made optimizers' states are becoming Optax's), on Flax
NNX functional states, and name every leaf uniquely.
"""

import chex
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest
from absl.testing import parameterized
from flax import nnx

import optax_snr
from optax_snr.readers import lookup


def grads_seq(num_steps, tree, seed=0):
    rng = np.random.default_rng(seed)
    return [
        jax.tree.map(lambda x: (rng.normal(size=x.shape) + 0.3).astype(np.float32), tree)
        for _ in range(num_steps)
    ]


def feed(tx, params, num_steps=4, promote=False):
    state = tx.init(params)
    for g in grads_seq(num_steps, params):
        if promote:
            with helpers.standard_promotion():
                _, state = tx.update(jax.tree.map(jnp.asarray, g), state, params)
        else:
            _, state = tx.update(jax.tree.map(jnp.asarray, g), state, params)
    return state


PARAMS = {"dense": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}}

OPTAX = {
    "adam": optax.adam,
    "adamw": optax.adamw,
    "nadam": optax.nadam,
    "amsgrad": optax.amsgrad,
    "adabelief": optax.adabelief,
    "ademamix": optax.contrib.ademamix,
}


class OptaxStatesTest(parameterized.TestCase):
    @parameterized.parameters(*OPTAX)
    def test_optax_state_reads_like_ours(self, name):
        # The same gradients through Optax's optimizer and ours: the same moments.
        theirs = feed(OPTAX[name](1e-2), PARAMS, promote=True)
        ours = feed(getattr(optax_snr, name)(1e-2), PARAMS)
        a, b = lookup.read_moments(theirs), lookup.read_moments(ours)
        assert a.names == b.names == ("dense/bias", "dense/kernel")
        assert int(a.count) == int(b.count) == 4
        chex.assert_trees_all_close(a.mu, b.mu, rtol=1e-6)
        chex.assert_trees_all_close(a.nu, b.nu, rtol=1e-6)
        assert (a.nu_max is None) == (b.nu_max is None) == (name != "amsgrad")
        eps = 1e-16 if name == "adabelief" else None
        chex.assert_trees_all_close(
            optax_snr.snr_diagnostics(theirs, eps=eps),
            optax_snr.snr_diagnostics(ours, eps=eps),
            rtol=1e-6,
        )
        if name != "adabelief":  # Refused: its noise is centered.
            chex.assert_trees_all_close(
                optax_snr.noise_scale(theirs, 8), optax_snr.noise_scale(ours, 8), rtol=1e-5
            )

    def test_ademamix_signal_is_the_fast_ema(self):
        state = feed(optax.contrib.ademamix(1e-2), PARAMS, promote=True)
        found = lookup.read_moments(state)
        assert found.kind == "ScaleByAdemamixState"
        chex.assert_trees_all_equal(list(found.mu), jax.tree.leaves(state[0].m1))


class NnxStatesTest(parameterized.TestCase):
    def make(self, tx):
        model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        x = jnp.arange(12.0).reshape(4, 3) / 10

        @nnx.jit
        def step(model, optimizer):
            grads = nnx.grad(lambda m: jnp.mean((m(x) - 1.0) ** 2))(model)
            optimizer.update(model, grads)

        for _ in range(3):
            step(model, optimizer)
        return optimizer

    @parameterized.named_parameters(
        ("optax_snr", lambda: optax_snr.adam(1e-2), False),
        ("optax", lambda: optax.adam(1e-2), True),
        ("inject", lambda: optax.inject_hyperparams(optax_snr.adam)(1e-2, b1=0.5), False),
        ("amsgrad", lambda: optax_snr.amsgrad(1e-2), False),
    )
    def test_functional_states_read_like_opt_state(self, make_tx, promote):
        with helpers.standard_promotion() if promote else jax.numpy_dtype_promotion("strict"):
            optimizer = self.make(make_tx())
        reference = optax_snr.snr_diagnostics(optimizer.opt_state)
        assert int(reference.count) == 3
        assert set(reference.per_leaf) == {"bias", "kernel"}
        reference_scale = optax_snr.noise_scale(optimizer.opt_state, 4)
        for state in (nnx.state(optimizer), nnx.split(optimizer)[1]):
            chex.assert_trees_all_equal(optax_snr.snr_diagnostics(state), reference)
            chex.assert_trees_all_close(
                jax.jit(optax_snr.snr_diagnostics)(state), reference, rtol=1e-6
            )
            chex.assert_trees_all_equal(optax_snr.noise_scale(state, 4), reference_scale)

    def test_functional_state_without_moments(self):
        optimizer = self.make(optax.sgd(0.1, momentum=0.9))
        with pytest.raises(ValueError, match="holds no moments"):
            optax_snr.snr_diagnostics(nnx.state(optimizer))


class NamesTest(parameterized.TestCase):
    def test_colliding_names_get_two_entries(self):
        params = {"a/b": jnp.zeros(2), "a": {"b": jnp.ones(3)}}
        state = feed(optax_snr.adam(1e-2), params)
        diag = optax_snr.snr_diagnostics(state)
        assert set(diag.per_leaf) == {"['a/b']", "['a']['b']"}
        scale = optax_snr.noise_scale(state, 8)
        assert set(scale.per_leaf) == set(diag.per_leaf)
        row = optax_snr.flatten_diagnostics(diag, per_leaf=True)
        assert len(row) == 1 + 18 * 3

    def test_other_names_stay_simple(self):
        params = {"a/b": jnp.zeros(2), "a": {"b": jnp.ones(3)}, "c": [jnp.ones(1)]}
        names = lookup.read_moments(optax_snr.adam(1e-2).init(params)).names
        assert names == ("['a']['b']", "['a/b']", "c/0")

    def test_names_unique_even_when_keystr_collides(self):
        paths = [
            (jax.tree_util.DictKey("x"),),
            (jax.tree_util.GetAttrKey("x"),),
            (jax.tree_util.DictKey("['x']"),),
        ]
        names = lookup.unique_leaf_names(paths)
        assert len(set(names)) == 3, names

    def test_single_array_is_root(self):
        state = feed(optax_snr.adam(1e-2), jnp.zeros(3))
        assert set(optax_snr.snr_diagnostics(state).per_leaf) == {"<root>"}
