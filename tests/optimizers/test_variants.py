"""Adam's variants, each a chain of the stages, against their Optax counterparts."""

from __future__ import annotations

import inspect
import re

import chex
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

import optax_snr

NUM_STEPS = 300

# name: (ours, Optax's). Every check below runs over all of them.
VARIANTS = {
    "adamw": (optax_snr.adamw, optax.adamw),
    "nadam": (optax_snr.nadam, optax.nadam),
    "nadamw": (optax_snr.nadamw, optax.nadamw),
    "amsgrad": (optax_snr.amsgrad, optax.amsgrad),
    "adabelief": (optax_snr.adabelief, optax.adabelief),
    "adopt": (optax_snr.adopt, optax.contrib.adopt),
    "ademamix": (optax_snr.ademamix, optax.contrib.ademamix),
}

MASK = {"dense": {"kernel": True, "bias": False}, "out": [True, False]}  # for multi_leaf_params


def _strict_exp_decay(scale, steps):
    # Optax's own schedules promote the int32 count implicitly; this one is strict-safe.
    return lambda count: scale * jnp.exp(count.astype(jnp.float32) / -steps)


def _warmup(final, steps):
    return lambda count: final * jnp.minimum(count.astype(jnp.float32) / steps, 1.0)


PARITY_CASES = {
    "adamw-defaults": ("adamw", dict(learning_rate=1e-2)),
    "adamw-mask-tree": ("adamw", dict(learning_rate=1e-2, weight_decay=0.1, mask=MASK)),
    "adamw-mask-callable": (
        "adamw",
        dict(
            learning_rate=1e-2,
            weight_decay=0.1,
            mask=lambda params: jax.tree.map(lambda p: p.ndim > 1, params),
        ),
    ),
    "adamw-schedules-nesterov": (
        "adamw",
        dict(
            learning_rate=_strict_exp_decay(1e-2, 100.0),
            weight_decay=_strict_exp_decay(1e-1, 50.0),
            b1=0.8,
            nesterov=True,
        ),
    ),
    "adamw-mu-dtype": ("adamw", dict(learning_rate=1e-2, mu_dtype=jnp.bfloat16)),
    "nadam-defaults": ("nadam", dict(learning_rate=1e-2)),
    "nadam-b1-b2-eps-root": ("nadam", dict(learning_rate=3e-3, b1=0.8, b2=0.95, eps_root=1e-8)),
    "nadamw-mask": ("nadamw", dict(learning_rate=1e-2, weight_decay=0.1, mask=MASK)),
    "amsgrad-defaults": ("amsgrad", dict(learning_rate=1e-2)),
    "amsgrad-paper": (
        "amsgrad",
        dict(learning_rate=1e-2, bias_correction_mu=False, bias_correction_nu=False),
    ),
    "amsgrad-raw-signal-eps-root": (
        "amsgrad",
        dict(learning_rate=1e-2, eps_root=1e-8, bias_correction_mu=False),
    ),
    "amsgrad-raw-noise-mu-dtype": (
        "amsgrad",
        dict(learning_rate=1e-2, bias_correction_nu=False, mu_dtype=jnp.bfloat16),
    ),
    "adabelief-defaults": ("adabelief", dict(learning_rate=1e-2)),
    "adabelief-paper-eps-nesterov": (
        "adabelief",
        dict(learning_rate=1e-2, eps=1e-8, eps_root=0.0, nesterov=True),
    ),
    "adabelief-schedule": ("adabelief", dict(learning_rate=_strict_exp_decay(1e-2, 100.0))),
    "adopt-defaults": ("adopt", dict(learning_rate=1e-2)),
    "adopt-no-clipping": ("adopt", dict(learning_rate=1e-2, use_clipping=False)),
    "adopt-nesterov-b2": ("adopt", dict(learning_rate=1e-2, nesterov=True, b2=0.99)),
    "adopt-clip-fn-mu-dtype": (
        "adopt",
        dict(
            learning_rate=1e-2,
            clip_value_fn=lambda count: 0.5 * jnp.sqrt(count.astype(jnp.float32)),
            mu_dtype=jnp.bfloat16,
        ),
    ),
    "ademamix-defaults": ("ademamix", dict(learning_rate=1e-2)),
    "ademamix-decay-mask": (
        "ademamix",
        dict(learning_rate=1e-2, b3=0.999, alpha=8.0, eps_root=1e-8, weight_decay=0.1, mask=MASK),
    ),
    "ademamix-b3-alpha-schedules": (
        "ademamix",
        dict(
            learning_rate=1e-2,
            b3=lambda count: 0.9 + _warmup(0.09, 100.0)(count),
            alpha=_warmup(5.0, 100.0),
        ),
    ),
}


def _run_optax(variant, kwargs, params=None, num_steps=NUM_STEPS, *, jit=True):
    params = helpers.multi_leaf_params() if params is None else params
    with helpers.standard_promotion():
        return helpers.run_optimizer(VARIANTS[variant][1](**kwargs), params, num_steps, jit=jit)


def _run_ours(variant, kwargs, params=None, num_steps=NUM_STEPS, *, jit=True):
    params = helpers.multi_leaf_params() if params is None else params
    return helpers.run_optimizer(VARIANTS[variant][0](**kwargs), params, num_steps, jit=jit)


def _moment_fields(state):
    """Names of the state's per-parameter buffers (Optax's NamedTuple fields)."""
    names = set()
    for path, _ in jax.tree_util.tree_flatten_with_path(state)[0]:
        for key in path:
            name = getattr(key, "name", None)
            if name in ("mu", "nu", "nu_max", "m1", "m2"):
                names.add(name)
    return sorted(names)


def _nbytes(tree):
    return sum(x.nbytes for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("case", sorted(PARITY_CASES))
def test_bit_identical_to_optax_under_jit(case):
    # All the variants perform Optax's float operations in Optax's order, so
    # under jit every case is bit-identical (stronger than the 1e-6 asked for).
    variant, kwargs = PARITY_CASES[case]
    expected_params, expected_state = _run_optax(variant, kwargs)
    got_params, got_state = _run_ours(variant, kwargs)
    assert helpers.tree_max_abs_diff(got_params, expected_params) <= 1e-6
    helpers.assert_trees_bitwise_equal(got_params, expected_params)
    fields = _moment_fields(expected_state)
    assert "nu" in fields
    for name in fields:  # the moments too, found by Optax's field names
        helpers.assert_trees_bitwise_equal(
            optax.tree.get(got_state, name), optax.tree.get(expected_state, name)
        )
    counts = [c for _, c in optax.tree.get_all_with_path(got_state, "count")]
    # The chain owns one step count; a weight-decay or lr schedule brings its own, as in Optax.
    schedules = sum(callable(kwargs.get(k)) for k in ("learning_rate", "weight_decay"))
    assert len(counts) == 1 + schedules
    assert all(int(c) == NUM_STEPS for c in counts)


@pytest.mark.parametrize("case", ["adamw-mask-tree", "amsgrad-defaults", "adopt-defaults"])
def test_eager_matches_optax_within_1e6(case):
    variant, kwargs = PARITY_CASES[case]
    num_steps = 30  # op-by-op dispatch is slow; 30 steps cover the bias-corrected regime
    expected, _ = _run_optax(variant, kwargs, num_steps=num_steps, jit=False)
    got, _ = _run_ours(variant, kwargs, num_steps=num_steps, jit=False)
    chex.assert_trees_all_close(got, expected, rtol=0.0, atol=1e-6)


def test_ademamix_mu_dtype_keeps_the_state_dtype_where_optax_does_not():
    # Optax never casts AdEMAMix's buffers back to mu_dtype, so they turn into
    # float32 after the first step. Ours stay in mu_dtype; with that one
    # difference put back into Optax's, the two are bit-identical.
    kwargs = dict(learning_rate=1e-2, mu_dtype=jnp.bfloat16)
    reference = optax.contrib.ademamix(**kwargs)

    def update(updates, state, params):
        updates, new_state = reference.update(updates, state, params)
        return updates, jax.tree.map(lambda new, old: new.astype(old.dtype), new_state, state)

    params = helpers.multi_leaf_params()
    with helpers.standard_promotion():
        expected, _ = helpers.run_optimizer(
            optax.GradientTransformation(reference.init, update), params, NUM_STEPS
        )
        _, drifting = helpers.run_optimizer(reference, params, 2)
    got, state = _run_ours("ademamix", kwargs, params)
    helpers.assert_trees_bitwise_equal(got, expected)
    assert optax.tree.get(drifting, "m2")["dense"]["kernel"].dtype == jnp.float32
    for name in ("m1", "m2", "nu"):
        chex.assert_trees_all_equal_dtypes(
            optax.tree.get(state, name), jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
        )


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_same_parameters_order_and_defaults_as_optax(variant):
    ours, reference = VARIANTS[variant]
    ours_params = list(inspect.signature(ours).parameters.values())
    reference_params = list(inspect.signature(reference).parameters.values())
    for mine, theirs in zip(ours_params, reference_params, strict=False):
        assert (mine.name, mine.kind) == (theirs.name, theirs.kind)
        if mine.name == "clip_value_fn":  # Optax's default is a lambda; compare values
            steps = jnp.arange(5, dtype=jnp.int32)
            with helpers.standard_promotion():
                np.testing.assert_array_equal(mine.default(steps), theirs.default(steps))
        else:
            assert mine.default == theirs.default, mine.name
    # Anything we add (nu_dtype; mu_dtype where Optax has none) comes after
    # Optax's parameters, keyword-only.
    extra = ours_params[len(reference_params) :]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in extra)
    assert {p.name for p in extra} <= {"mu_dtype", "nu_dtype"}
    assert all(p.default is None for p in extra)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_state_memory_no_larger_than_optax(variant):
    params = helpers.multi_leaf_params()
    ours, reference = VARIANTS[variant]
    got, expected = _nbytes(ours(1e-3).init(params)), _nbytes(reference(1e-3).init(params))
    assert got <= expected
    assert got == expected  # Optax's state tree exactly (AdEMAMix keeps count_m2 too)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_one_count_and_optax_field_names(variant):
    ours, reference = VARIANTS[variant]
    params = helpers.multi_leaf_params()
    tx = ours(1e-3)
    _, state = helpers.run_optimizer(tx, params, 7)
    count = optax.tree.get(state, "count")
    chex.assert_type(count, jnp.int32)
    assert int(count) == 7
    # Diagnostics and users look the buffers up by Optax's names.
    reference_state = reference(1e-3).init(params)
    for name in _moment_fields(reference_state):
        chex.assert_trees_all_equal_shapes_and_dtypes(
            optax.tree.get(state, name), optax.tree.get(reference_state, name)
        )


# Hyperparameters set at run time through inject_hyperparams, three settings each.
INJECTED = {
    "adamw": dict(
        learning_rate=(1e-2, 3e-3, 1e-3), b1=(0.9, 0.5, 0.0), weight_decay=(1e-4, 0.1, 0.0)
    ),
    "nadam": dict(learning_rate=(1e-2, 3e-3, 1e-3), b1=(0.9, 0.5, 0.0), eps=(1e-8, 1e-4, 0.1)),
    "nadamw": dict(
        learning_rate=(1e-2, 3e-3, 1e-3), b2=(0.999, 0.99, 0.5), weight_decay=(0.1, 0, 1)
    ),
    "amsgrad": dict(learning_rate=(1e-2, 3e-3, 1e-3), b1=(0.9, 0.5, 0.0), b2=(0.999, 0.99, 0.5)),
    "adabelief": dict(
        learning_rate=(1e-2, 3e-3, 1e-3), b2=(0.999, 0.99, 0.5), eps=(1e-16, 1e-8, 0.1)
    ),
    "adopt": dict(learning_rate=(1e-2, 3e-3, 1e-3), b1=(0.9, 0.5, 0.0), eps=(1e-6, 1e-3, 0.1)),
    "ademamix": dict(
        learning_rate=(1e-2, 3e-3, 1e-3), b3=(0.9999, 0.99, 0.9), alpha=(5.0, 8.0, 0.0)
    ),
}


class InjectHyperparamsTest(parameterized.TestCase):
    @parameterized.parameters(*sorted(VARIANTS))
    def test_changed_at_run_time_without_recompiling(self, variant):
        settings = INJECTED[variant]

        def run(factory):
            chex.clear_trace_counter()
            params = helpers.multi_leaf_params()
            # inject_hyperparams takes every callable for a schedule, defaults included.
            static = ["clip_value_fn"] if variant == "adopt" else []
            injected = optax.inject_hyperparams(factory, static_args=static)
            tx = injected(**{k: v[0] for k, v in settings.items()})
            state = tx.init(params)

            @jax.jit
            @chex.assert_max_traces(n=1)
            def step(p, s, i):
                updates, s = tx.update(helpers.noisy_grad(p, i), s, p)
                return optax.apply_updates(p, updates), s

            for i in range(6):
                for name, values in settings.items():
                    state.hyperparams[name] = jnp.asarray(values[i % 3], jnp.float32)
                params, state = step(params, state, jnp.asarray(i, jnp.int32))
            return params, state

        ours, reference = VARIANTS[variant]
        got, state = run(ours)
        with helpers.standard_promotion():
            expected, _ = run(reference)
        helpers.assert_trees_bitwise_equal(got, expected)
        self.assertEqual(int(optax.tree.get(state.inner_state, "count")), 6)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_multi_steps_equals_big_batch(variant):
    key = jax.random.PRNGKey(3)
    kx, ky, kw = jax.random.split(key, 3)
    x = jax.random.normal(kx, (4, 8, 5))  # 4 micro-batches of 8 examples
    y = jax.random.normal(ky, (4, 8))
    params = {"w": jax.random.normal(kw, (5,)), "b": jnp.zeros(())}

    def loss(p, xb, yb):
        return jnp.mean((xb @ p["w"] + p["b"] - yb) ** 2)

    factory = VARIANTS[variant][0]
    big = factory(1e-2)
    big_state = big.init(params)
    big_update = jax.jit(big.update)
    acc = optax.MultiSteps(factory(1e-2), every_k_schedule=4)
    acc_state = acc.init(params)
    acc_update = jax.jit(acc.update)
    big_params, acc_params = params, params
    for _ in range(4):  # ADOPT's first step only fills its noise: take a few
        g = jax.grad(loss)(big_params, x.reshape(32, 5), y.reshape(32))
        updates, big_state = big_update(g, big_state, big_params)
        big_params = optax.apply_updates(big_params, updates)
        for k in range(4):
            g = jax.grad(loss)(acc_params, x[k], y[k])
            with helpers.standard_promotion():  # MultiSteps divides an int32 count implicitly.
                updates, acc_state = acc_update(g, acc_state, acc_params)
            acc_params = optax.apply_updates(acc_params, updates)
    assert helpers.tree_max_abs_diff(big_params, params) > 1e-3  # it moved
    chex.assert_trees_all_close(acc_params, big_params, atol=1e-6)


class VariantBehaviourTest(chex.TestCase):
    """The behaviour checks of ``adam``, for every variant."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*sorted(VARIANTS))
    def test_dtype_preserved(self, variant):
        params = {
            "bf16": jnp.ones((3,), jnp.bfloat16),
            "f32": jnp.ones((2,), jnp.float32),
            "f16": jnp.ones((2,), jnp.float16),
        }
        tx = VARIANTS[variant][0](1e-3)
        state = tx.init(params)
        update = self.variant(tx.update)
        for _ in range(2):  # ADOPT's first update is zero; check a real one too
            updates, new_state = update(params, state, params)
            chex.assert_trees_all_equal_dtypes(updates, params)
            chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
            chex.assert_tree_all_finite(updates)
            state = new_state
        self.assertTrue(any(bool(jnp.any(u != 0)) for u in jax.tree.leaves(updates)))

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*sorted(VARIANTS))
    def test_extra_args_are_accepted(self, variant):
        tx = VARIANTS[variant][0](1e-3)
        self.assertIsInstance(tx, optax.GradientTransformationExtraArgs)
        params = {"w": jnp.ones(3)}
        update = self.variant(lambda g, s, p: tx.update(g, s, p, loss=jnp.float32(1.0), rng=None))
        updates, _ = update(params, tx.init(params), params)
        chex.assert_tree_all_finite(updates)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*sorted(VARIANTS))
    def test_none_leaves_pass_through(self, variant):
        tx = VARIANTS[variant][0](1e-3)
        params = {"frozen": None, "w": jnp.ones(2)}
        grads = {"frozen": None, "w": jnp.ones(2)}
        updates, _ = self.variant(tx.update)(grads, tx.init(params), params)
        self.assertIsNone(updates["frozen"])
        chex.assert_tree_all_finite(updates["w"])

    @parameterized.parameters(*sorted(VARIANTS))
    def test_runs_under_strict_promotion(self, variant):
        # The conftest sets strict promotion for the suite; make the point explicit.
        params = {"w": jnp.ones(3), "h": jnp.ones(2, jnp.bfloat16)}
        with jax.numpy_dtype_promotion("strict"):
            tx = VARIANTS[variant][0](1e-3)
            updates, _ = jax.jit(tx.update)(params, tx.init(params), params)
        chex.assert_trees_all_equal_dtypes(updates, params)

    @parameterized.parameters(*sorted(VARIANTS))
    def test_converges_on_a_parabola(self, variant):
        target = jnp.array([1.0, -2.0, 0.5])
        loss = lambda p: jnp.sum((p - target) ** 2)
        # AdEMAMix's default slow EMA (b3=0.9999) remembers ~10,000 steps: shorten it.
        tx = VARIANTS[variant][0](0.05, **({"b3": 0.99} if variant == "ademamix" else {}))

        def step(carry, _):
            params, state = carry
            updates, state = tx.update(jax.grad(loss)(params), state, params)
            return (optax.apply_updates(params, updates), state), None

        (final, _), _ = jax.lax.scan(step, (jnp.zeros(3), tx.init(jnp.zeros(3))), length=1000)
        # AdamW's decay pulls the minimum towards 0 by about weight_decay * |target|.
        chex.assert_trees_all_close(final, target, atol=2e-3)


# What each variant adds to Adam's checks: argument, bad value, valid range.
INVALID = [
    ("adamw", dict(weight_decay=-1e-4), r"weight_decay must be in \[0, inf\)"),
    ("adamw", dict(weight_decay=float("nan")), r"weight_decay must be in \[0, inf\)"),
    ("adamw", dict(b1=1.0), r"b1 must be in \[0, 1\)"),
    ("nadam", dict(b2=1.5), r"b2 must be in \[0, 1\)"),
    ("nadamw", dict(weight_decay=float("inf")), r"weight_decay must be in \[0, inf\)"),
    ("nadamw", dict(eps=-1.0), r"eps must be in \[0, inf\)"),
    ("amsgrad", dict(b1=-0.1), r"b1 must be in \[0, 1\)"),
    ("amsgrad", dict(eps_root=-1.0), r"eps_root must be in \[0, inf\)"),
    ("adabelief", dict(b2=1.0), r"b2 must be in \[0, 1\)"),
    ("adabelief", dict(eps_root=-1e-16), r"eps_root must be in \[0, inf\)"),
    ("adabelief", dict(eps=-1e-16), r"eps must be in \[0, inf\)"),
    ("adopt", dict(b2=1.0), r"b2 must be in \[0, 1\)"),
    ("adopt", dict(eps=-1e-6), r"eps must be in \[0, inf\)"),
    ("ademamix", dict(b3=1.0), r"b3 must be in \[0, 1\)"),
    ("ademamix", dict(alpha=-5.0), r"alpha must be in \[0, inf\)"),
    ("ademamix", dict(weight_decay=-0.1), r"weight_decay must be in \[0, inf\)"),
    ("ademamix", dict(b1=1.0), r"b1 must be in \[0, 1\)"),
]


@pytest.mark.parametrize("variant,kwargs,message", INVALID)
def test_invalid_hyperparameters_raise_value_error(variant, kwargs, message):
    with pytest.raises(ValueError, match=message):
        VARIANTS[variant][0](1e-3, **kwargs)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_invalid_learning_rate_raises_value_error(variant):
    with pytest.raises(ValueError, match=r"learning_rate must be in \[0, inf\)"):
        VARIANTS[variant][0](-1e-3)


@pytest.mark.parametrize(
    "variant,kwargs,message",
    [
        ("amsgrad", dict(bias_correction_mu=1), "bias_correction_mu must be a bool"),
        ("amsgrad", dict(bias_correction_nu="no"), "bias_correction_nu must be a bool"),
        ("adabelief", dict(nesterov=None), "nesterov must be a bool"),
        ("adopt", dict(use_clipping=0), "use_clipping must be a bool"),
        ("adopt", dict(nesterov=1), "nesterov must be a bool"),
        ("adopt", dict(clip_value_fn=0.25), "clip_value_fn must be callable"),
        ("ademamix", dict(mu_dtype=jnp.int32), "mu_dtype must be a floating"),
        ("adamw", dict(weight_decay="0.1"), "weight_decay must be a real number"),
    ],
)
def test_invalid_flags_raise_type_error(variant, kwargs, message):
    with pytest.raises(TypeError, match=message):
        VARIANTS[variant][0](1e-3, **kwargs)


def test_schedules_and_traced_values_pass_unchecked():
    negative = optax.constant_schedule(-1.0)  # a schedule is never called at build time
    optax_snr.adamw(negative, weight_decay=negative)
    optax_snr.ademamix(negative, b3=negative, alpha=negative, weight_decay=negative)
    grads = {"w": jnp.ones(2)}

    @jax.jit
    def step(b3, alpha):
        tx = optax_snr.ademamix(1e-3, b3=b3, alpha=alpha)
        return tx.update(grads, tx.init(grads), grads)[0]

    chex.assert_tree_all_finite(step(jnp.float32(0.999), jnp.float32(5.0)))


def test_adamw_decay_is_decoupled_and_masked():
    # A zero gradient leaves the moments at zero: what is left is the decay alone.
    params = helpers.multi_leaf_params()
    zeros = jax.tree.map(jnp.zeros_like, params)
    tx = optax_snr.adamw(0.1, weight_decay=0.5, mask=MASK)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    expected = jax.tree.map(lambda p, m: -0.05 * p if m else jnp.zeros_like(p), params, MASK)
    chex.assert_trees_all_close(updates, expected, rtol=1e-6)


def test_amsgrad_noise_never_decreases():
    params = helpers.multi_leaf_params()
    tx = optax_snr.amsgrad(1e-2, b2=0.5)  # a short memory, so Adam's noise would fall fast
    state = tx.init(params)
    update = jax.jit(tx.update)
    fell_below = False
    for i in range(50):
        # Shrinking gradients: Adam's nu_hat falls, the running max must not.
        grads = jax.tree.map(lambda g, i=i: g / (1.0 + i), helpers.noisy_grad(params, jnp.int32(i)))
        previous = optax.tree.get(state, "nu_max")
        _, state = update(grads, state, params)
        nu_max = optax.tree.get(state, "nu_max")
        nu_hat = jax.tree.map(lambda v, i=i: v / (1 - 0.5 ** (i + 1)), optax.tree.get(state, "nu"))
        for new, old, adam in zip(*map(jax.tree.leaves, (nu_max, previous, nu_hat)), strict=True):
            assert bool(jnp.all(new >= old))
            # nu_hat recomputed here may differ from the jitted one by an ulp.
            assert bool(jnp.all(new >= adam * (1 - 1e-6)))
            fell_below |= bool(jnp.any(adam < 0.5 * new))
    assert fell_below  # Adam's noise did fall: the max made a difference


def test_adopt_first_step_only_fills_the_noise():
    params = {"w": jnp.array([1.0, -2.0, 3.0])}
    grads = {"w": jnp.array([0.5, -4.0, 2.0])}
    for kwargs in (dict(), dict(use_clipping=False), dict(nesterov=True)):
        tx = optax_snr.adopt(0.1, **kwargs)
        updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
        np.testing.assert_array_equal(updates["w"], 0.0)
        np.testing.assert_array_equal(optax.tree.get(state, "mu")["w"], 0.0)
        np.testing.assert_array_equal(optax.tree.get(state, "nu")["w"], grads["w"] ** 2)


def _readme_custom_variant():
    """Runs the README's "Assemble your own" example and returns its optimizer."""
    readme = helpers.REPO / "README.md"
    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(), flags=re.DOTALL)
    (block,) = [b for b in blocks if "snr.centered_moments" in b]
    namespace: dict = {}
    exec(compile(block, str(readme), "exec"), namespace)
    return namespace["tx"]


def test_readme_custom_variant_runs():
    tx = _readme_custom_variant()
    params = helpers.multi_leaf_params()
    final, state = helpers.run_optimizer(tx, params, NUM_STEPS)
    assert int(optax.tree.get(state, "count")) == NUM_STEPS  # one count, found as in Optax
    for name in ("mu", "nu", "nu_max"):
        chex.assert_trees_all_equal_shapes(optax.tree.get(state, name), params)
    loss = lambda p: sum(jnp.sum(x**2) for x in jax.tree.leaves(p))
    assert float(loss(final)) < 0.1 * float(loss(params))
    # The clipped ratio bounds every step by the learning rate, however large the gradient.
    grads = jax.tree.map(lambda g: 1e3 * g, helpers.noisy_grad(final, jnp.int32(0)))
    updates, _ = tx.update(grads, state, final)
    assert max(float(jnp.max(jnp.abs(u))) for u in jax.tree.leaves(updates)) <= 1e-2
