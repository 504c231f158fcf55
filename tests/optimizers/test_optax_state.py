"""The optimizers' states are Optax's own trees: same classes, fields, order and meaning."""

import chex
import helpers
import jax
import jax.numpy as jnp
import optax
import optax.contrib
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import optax_snr

OPTIMIZERS = {
    "adam": (optax_snr.adam, optax.adam),
    "adamw": (optax_snr.adamw, optax.adamw),
    "nadam": (optax_snr.nadam, optax.nadam),
    "nadamw": (optax_snr.nadamw, optax.nadamw),
    "amsgrad": (optax_snr.amsgrad, optax.amsgrad),
    "adabelief": (optax_snr.adabelief, optax.adabelief),
    "ademamix": (optax_snr.ademamix, optax.contrib.ademamix),
    "adopt": (optax_snr.adopt, optax.contrib.adopt),
}
DECAYED = ("adamw", "nadamw", "ademamix")  # Those with weight_decay and mask.


def _schedule(count):
    """A learning-rate schedule that runs under strict promotion (Optax's do not)."""
    return jnp.asarray(1e-2, jnp.float32) / (1 + count.astype(jnp.float32))


def _params():
    """Optax's trees keep ``None`` and empty subtrees; ours must keep them too."""
    params = helpers.multi_leaf_params()
    return {**params, "frozen": None, "empty": {}}


def _type_names(state):
    return [type(s).__name__ for s in state]


def _cases():
    cases = []
    for name in sorted(OPTIMIZERS):
        cases.append((name, dict(learning_rate=1e-2)))
        cases.append((name, dict(learning_rate=_schedule)))
        if name in DECAYED:
            mask = {"dense": True, "out": False, "frozen": None, "empty": {}}
            cases.append((name, dict(learning_rate=1e-2, weight_decay=0.1, mask=mask)))
            cases.append((name, dict(learning_rate=_schedule, weight_decay=_schedule)))
            cases.append((name, dict(learning_rate=1e-2, weight_decay=0.0)))
    return cases


CASES = _cases()
IDS = [
    f"{name}-{'-'.join(k if not callable(v) else k + '_schedule' for k, v in sorted(kw.items()))}"
    for name, kw in CASES
]


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=IDS)
def test_state_tree_is_optax_s(name, kwargs):
    ours, theirs = OPTIMIZERS[name]
    params = _params()
    got, expected = ours(**kwargs).init(params), theirs(**kwargs).init(params)
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    assert _type_names(got) == _type_names(expected)
    assert [type(s) for s in got] == [type(s) for s in expected]  # Optax's own classes
    assert got[0]._fields == expected[0]._fields
    chex.assert_trees_all_equal_shapes_and_dtypes(got, expected)


def test_scale_by_adam_is_a_bare_scale_by_adam_state():
    params = _params()
    got, expected = optax_snr.scale_by_adam().init(params), optax.scale_by_adam().init(params)
    assert type(got) is optax.ScaleByAdamState
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    assert isinstance(optax_snr.scale_by_adam(), optax.GradientTransformationExtraArgs)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_same_state_after_steps_field_by_field(name):
    # opt_state[0].count, .mu, .nu (and nu_max, m1, m2, count_m2) hold what
    # they hold in Optax, bit for bit under jit, not only the same shapes.
    ours, theirs = OPTIMIZERS[name]
    kwargs = dict(learning_rate=1e-2)
    params = helpers.multi_leaf_params()
    _, got = helpers.run_optimizer(ours(**kwargs), params, 5)
    with helpers.standard_promotion():
        _, expected = helpers.run_optimizer(theirs(**kwargs), params, 5)
    helpers.assert_trees_bitwise_equal(got, expected)
    state = got[0]
    chex.assert_type(state.count, jnp.int32)
    assert int(state.count) == 5  # the attribute, not tuple.count
    for i, field in enumerate(state._fields):  # by position as by name, as in Optax
        helpers.assert_trees_bitwise_equal(state[i], getattr(expected[0], field))


def test_positions_mean_what_they_mean_in_optax():
    params = helpers.multi_leaf_params()
    _, state = helpers.run_optimizer(optax_snr.adam(1e-2), params, 3)
    count, mu, nu = state[0]
    assert int(count) == 3
    assert jax.tree.structure(mu) == jax.tree.structure(nu) == jax.tree.structure(params)
    helpers.assert_trees_bitwise_equal(state[0][1], state[0].mu)
    helpers.assert_trees_bitwise_equal(state[0][2], state[0].nu)
    assert isinstance(state[1], optax.EmptyState)


def test_inject_hyperparams_gives_optax_s_structure():
    params = _params()
    for name, (ours, theirs) in sorted(OPTIMIZERS.items()):
        # ADOPT's clip_value_fn is a callable, which inject_hyperparams would
        # take for a schedule (in Optax too); it is static.
        static = ("clip_value_fn",) if name == "adopt" else ()
        got = optax.inject_hyperparams(ours, static_args=static)(1e-2).init(params)
        expected = optax.inject_hyperparams(theirs, static_args=static)(1e-2).init(params)
        assert jax.tree.structure(got) == jax.tree.structure(expected), name


def test_multi_steps_gives_optax_s_structure():
    params = _params()
    for name, (ours, theirs) in sorted(OPTIMIZERS.items()):
        got = optax.MultiSteps(ours(1e-2), every_k_schedule=2).init(params)
        with helpers.standard_promotion():
            expected = optax.MultiSteps(theirs(1e-2), every_k_schedule=2).init(params)
        assert jax.tree.structure(got) == jax.tree.structure(expected), name


def test_multi_steps_and_inject_hyperparams_step_like_optax():
    params = helpers.multi_leaf_params()

    def build(adam):
        return optax.MultiSteps(optax.inject_hyperparams(adam)(learning_rate=1e-2), 2)

    with helpers.standard_promotion():  # optax.MultiSteps needs it
        got = helpers.run_optimizer(build(optax_snr.adam), params, 6)
        expected = helpers.run_optimizer(build(optax.adam), params, 6)
    helpers.assert_trees_bitwise_equal(got, expected)


def _step(tx, standard):
    @jax.jit
    def step(params, state, i):
        with jax.numpy_dtype_promotion("standard" if standard else "strict"):
            updates, state = tx.update(helpers.noisy_grad(params, i), state, params)
            return optax.apply_updates(params, updates), state

    return step


def _train(step, params, state, start, stop):
    for i in range(start, stop):
        params, state = step(params, state, jnp.asarray(i, jnp.int32))
    return params, state


SWAPS = ["adam", "amsgrad", "adabelief", "adopt", "ademamix"]


@pytest.mark.parametrize("direction", ["optax_to_ours", "ours_to_optax"])
@pytest.mark.parametrize("name", SWAPS)
def test_orbax_checkpoint_moves_between_the_libraries(tmp_path, name, direction):
    # A run checkpointed with one library and resumed with the other continues
    # bit for bit as the uninterrupted run of the first.
    ours, theirs = OPTIMIZERS[name]
    first, second = (theirs, ours) if direction == "optax_to_ours" else (ours, theirs)
    first_standard = direction == "optax_to_ours"
    tx1, tx2 = first(1e-2), second(1e-2)
    step1, step2 = _step(tx1, first_standard), _step(tx2, not first_standard)
    params = helpers.multi_leaf_params()
    params, state = _train(step1, params, tx1.init(params), 0, 4)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "ckpt", {"params": params, "opt_state": state})
        ckptr.wait_until_finished()
    uninterrupted = _train(step1, params, state, 4, 10)

    fresh = helpers.multi_leaf_params()
    target = {"params": fresh, "opt_state": tx2.init(fresh)}
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(
            tmp_path / "ckpt", jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        )
    chex.assert_trees_all_equal_structs(restored, target)
    resumed = _train(step2, restored["params"], restored["opt_state"], 4, 10)
    helpers.assert_trees_bitwise_equal(resumed, uninterrupted)
    assert int(resumed[1][0].count) == 10


class _Model(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(3, 2, rngs=rngs)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_nnx_optimizer_state_has_optax_s_structure(name):
    ours, theirs = OPTIMIZERS[name]
    got = nnx.state(nnx.Optimizer(_Model(nnx.Rngs(0)), ours(1e-2), wrt=nnx.Param))
    expected = nnx.state(nnx.Optimizer(_Model(nnx.Rngs(0)), theirs(1e-2), wrt=nnx.Param))
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    _, got_split = nnx.split(nnx.Optimizer(_Model(nnx.Rngs(0)), ours(1e-2), wrt=nnx.Param))
    _, expected_split = nnx.split(nnx.Optimizer(_Model(nnx.Rngs(0)), theirs(1e-2), wrt=nnx.Param))
    assert jax.tree.structure(got_split) == jax.tree.structure(expected_split)


def test_nnx_optimizer_state_moves_to_optax():
    # nnx.update of an optax.adam Optimizer with the state trained by ours.
    x = jnp.ones((4, 3))
    model = _Model(nnx.Rngs(0))
    ours = nnx.Optimizer(model, optax_snr.adam(1e-2), wrt=nnx.Param)
    for _ in range(3):
        grads = nnx.grad(lambda m: jnp.sum(m.linear(x) ** 2))(model)
        ours.update(model, grads)
    theirs = nnx.Optimizer(_Model(nnx.Rngs(1)), optax.adam(1e-2), wrt=nnx.Param)
    nnx.update(theirs, nnx.state(ours))
    assert int(theirs.opt_state[0].count[...]) == 3
    helpers.assert_trees_bitwise_equal(nnx.state(theirs), nnx.state(ours))


def test_chain_as_example_in_readme_has_amsgrad_s_first_stage():
    params = helpers.multi_leaf_params()
    tx = optax_snr.chain_as(
        optax.ScaleByAmsgradState,
        optax_snr.centered_moments(b1=0.9, b2=0.999),
        optax_snr.bias_correction(b1=0.9, b2=0.999),
        optax_snr.max_noise(),
        optax_snr.scale_by_snr(eps=1e-8),
    )
    expected = optax.amsgrad(1e-2).init(params)[0]
    assert jax.tree.structure(tx.init(params)) == jax.tree.structure(expected)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_extra_args_and_one_trace_with_the_packed_state(name):
    ours, theirs = OPTIMIZERS[name]
    tx = ours(1e-2)
    if isinstance(theirs(1e-2), optax.GradientTransformationExtraArgs):
        assert isinstance(tx, optax.GradientTransformationExtraArgs)
    params = helpers.multi_leaf_params()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(p, s, i):
        updates, s = tx.update(helpers.noisy_grad(p, i), s, p, loss=jnp.zeros(()))
        return optax.apply_updates(p, updates), s

    state = tx.init(params)
    for i in range(4):
        params, new_state = step(params, state, jnp.asarray(i, jnp.int32))
        chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
        state = new_state
