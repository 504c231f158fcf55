"""chain_as: optax.chain's behaviour, with the stages' states packed into one NamedTuple."""

from typing import Any, NamedTuple

import chex
import helpers
import jax
import jax.numpy as jnp
import optax
import pytest

import optax_snr


def _stages():
    return (optax_snr.ema_moments(), optax_snr.bias_correction(), optax_snr.scale_by_snr())


class ChainAsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_same_updates_as_optax_chain_with_the_states_packed(self):
        params = helpers.multi_leaf_params()
        packed = optax_snr.chain_as(optax.ScaleByAdamState, *_stages())
        chained = optax.chain(*_stages())
        state, chain_state = packed.init(params), chained.init(params)
        update, chain_update = self.variant(packed.update), self.variant(chained.update)
        for i in range(3):
            grads = helpers.noisy_grad(params, jnp.asarray(i))
            updates, state = update(grads, state)
            expected, chain_state = chain_update(grads, chain_state)
            helpers.assert_trees_bitwise_equal(updates, expected)
        assert type(state) is optax.ScaleByAdamState
        helpers.assert_trees_bitwise_equal(state.mu, chain_state[0].mu)
        helpers.assert_trees_bitwise_equal(state.nu, chain_state[0].nu)
        helpers.assert_trees_bitwise_equal(state.count, chain_state[1].count)

    def test_no_retrace_and_a_stable_state(self):
        tx = optax_snr.chain_as(optax.ScaleByAdamState, *_stages())
        _, state = helpers.assert_steps_without_retrace(tx, helpers.multi_leaf_params())
        assert int(state.count) == 5

    def test_none_leaves_and_empty_trees(self):
        tx = optax_snr.chain_as(optax.ScaleByAdamState, *_stages())
        params = {"w": jnp.ones(2), "frozen": None, "empty": {}}
        state = tx.init(params)
        assert jax.tree.structure(state) == jax.tree.structure(optax.scale_by_adam().init(params))
        updates, state = tx.update({"w": jnp.ones(2), "frozen": None, "empty": {}}, state)
        assert updates["frozen"] is None and updates["empty"] == {}
        updates, state = tx.update({}, tx.init({}))
        assert updates == {} and int(state.count) == 1

    def test_extra_arguments_reach_the_stages(self):
        seen = {}

        def update_fn(updates, state, params=None, *, loss=None):
            seen["loss"] = loss
            return updates, state

        spy = optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)
        tx = optax_snr.chain_as(optax.ScaleByAdamState, *_stages(), spy)
        assert isinstance(tx, optax.GradientTransformationExtraArgs)
        tx.update(jnp.ones(2), tx.init(jnp.ones(2)), loss=jnp.asarray(3.0))
        assert float(seen["loss"]) == 3.0

    def test_fields_maps_differently_named_fields(self):
        class Renamed(NamedTuple):
            count: Any
            count_copy: Any
            first: Any
            nu: Any

        tx = optax_snr.chain_as(Renamed, *_stages(), fields={"first": "mu", "count_copy": "count"})
        _, state = tx.update(jnp.ones(2), tx.init(jnp.zeros(2)))
        assert int(state.count) == int(state.count_copy) == 1
        chex.assert_trees_all_close(state.first, jnp.full(2, 0.1))

    def test_the_stages_keep_their_own_states(self):
        params = jnp.zeros(2)
        assert type(optax_snr.ema_moments().init(params)) is optax_snr.EmaMomentsState
        assert type(optax_snr.bias_correction().init(params)) is optax_snr.BiasCorrectionState
        tx = optax.chain(*_stages())
        assert [type(s).__name__ for s in tx.init(params)] == [
            "EmaMomentsState",
            "BiasCorrectionState",
            "EmptyState",
        ]


class _Two(NamedTuple):
    mu: Any
    nu: Any


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((tuple,), {}, TypeError, "state_cls must be a NamedTuple class"),
        (("ScaleByAdamState",), {}, TypeError, "state_cls must be a NamedTuple class"),
        ((optax.ScaleByAdamState, *_stages()), {"fields": {"m1": "mu"}}, ValueError, "lacks"),
        ((_Two, *_stages()), {}, ValueError, r"no field for the stage field\(s\) \['count'\]"),
        ((optax.ScaleByAdamState, optax_snr.ema_moments()), {}, ValueError, "no stage has"),
        (
            (optax.ScaleByAdamState, optax_snr.ema_moments(), optax_snr.centered_moments()),
            {},
            ValueError,
            "both have a field 'mu'",
        ),
        (
            (optax.ScaleByAdamState, optax.chain(optax_snr.ema_moments())),
            {},
            TypeError,
            "only stages whose state is a NamedTuple",
        ),
    ],
)
def test_bad_combinations_are_clear_errors(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        optax_snr.chain_as(*args, **kwargs)


def test_a_state_of_another_layout_is_a_clear_error():
    # An old optax_snr checkpoint's layout: (EmaMomentsState, BiasCorrectionState, ...).
    tx = optax_snr.chain_as(optax.ScaleByAdamState, *_stages())
    old = optax.chain(*_stages()).init(jnp.zeros(2))
    with pytest.raises(TypeError, match=r"a ScaleByAdamState with fields \('count', 'mu', 'nu'\)"):
        tx.update(jnp.ones(2), old)


def test_a_stage_whose_init_needs_params_is_a_clear_error():
    def init_fn(params):
        return optax.ScaleByScheduleState(count=params["w"])  # needs a real tree

    stage = optax.GradientTransformation(init_fn, lambda u, s, p=None: (u, s))
    with pytest.raises(TypeError, match="stage 0's init fails on an empty tree"):
        optax_snr.chain_as(optax.ScaleByScheduleState, stage)
