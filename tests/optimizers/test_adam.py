"""optax_snr.adam against optax.adam and against Kingma & Ba's Algorithm 1."""

from __future__ import annotations

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

PARITY_CASES = {
    "defaults": dict(learning_rate=1e-2),
    "b1_b2_eps": dict(learning_rate=3e-3, b1=0.8, b2=0.95, eps=1e-3),
    "eps_root": dict(learning_rate=1e-2, eps_root=1e-8),
    "nesterov": dict(learning_rate=1e-2, nesterov=True),
    "schedule": dict(learning_rate=optax.linear_schedule(1e-2, 1e-4, 200)),
    # Optax's own schedules promote int32 counts implicitly; this one is strict-safe.
    "schedule_nesterov": dict(
        learning_rate=lambda count: 1e-2 * jnp.exp(count.astype(jnp.float32) / -100.0),
        b1=0.7,
        nesterov=True,
    ),
}


def _run_optax(kwargs, params, num_steps, *, jit=True):
    with helpers.standard_promotion():
        return helpers.run_optimizer(optax.adam(**kwargs), params, num_steps, jit=jit)


@pytest.mark.parametrize("name", sorted(PARITY_CASES))
def test_bit_identical_to_optax_under_jit(name):
    kwargs = PARITY_CASES[name]
    params = helpers.multi_leaf_params()
    expected_params, expected_state = _run_optax(kwargs, params, NUM_STEPS)
    got_params, got_state = helpers.run_optimizer(optax_snr.adam(**kwargs), params, NUM_STEPS)
    helpers.assert_trees_bitwise_equal(got_params, expected_params)
    # The moments and the count match too, not only the parameters.
    helpers.assert_trees_bitwise_equal(
        optax.tree.get(got_state, "mu"), optax.tree.get(expected_state, "mu")
    )
    helpers.assert_trees_bitwise_equal(
        optax.tree.get(got_state, "nu"), optax.tree.get(expected_state, "nu")
    )
    assert int(got_state[0].count) == int(expected_state[0].count) == NUM_STEPS


@pytest.mark.parametrize("name", ["defaults", "b1_b2_eps", "nesterov"])
def test_eager_matches_optax_within_1e6_relative(name):
    # Both run op by op on the same gradients; each step's updates agree to 1e-6
    # relative. (Optax jits its bias correction even in eager mode, so the two
    # are not always bit-identical outside jax.jit.) Where the Nesterov signal
    # cancels to ~1e-3 of a typical step, relative error is measured against
    # the step size instead: atol = 1e-6 * learning_rate.
    kwargs = PARITY_CASES[name]
    params = helpers.multi_leaf_params()
    ours, ref = optax_snr.adam(**kwargs), optax.adam(**kwargs)
    ours_state, ref_state = ours.init(params), ref.init(params)
    for i in range(30):
        grads = helpers.noisy_grad(params, jnp.asarray(i, jnp.int32))
        updates, ours_state = ours.update(grads, ours_state, params)
        with helpers.standard_promotion():
            expected, ref_state = ref.update(grads, ref_state, params)
        atol = 1e-6 * kwargs["learning_rate"]
        chex.assert_trees_all_close(updates, expected, rtol=1e-6, atol=atol)
        params = optax.apply_updates(params, updates)


def test_eager_and_jit_updates_agree_step_by_step():
    # Under jit XLA may turn a division by the bias correction into a product
    # with its reciprocal, so eager and jitted updates can differ by an ulp.
    params = helpers.multi_leaf_params()
    tx = optax_snr.adam(1e-2)
    state = tx.init(params)
    jitted = jax.jit(tx.update)
    for i in range(20):
        grads = helpers.noisy_grad(params, jnp.asarray(i, jnp.int32))
        eager_updates, _ = tx.update(grads, state, params)
        updates, state = jitted(grads, state, params)
        chex.assert_trees_all_close(eager_updates, updates, rtol=1e-6, atol=0.0)
        params = optax.apply_updates(params, updates)


def _algorithm_1(theta0, grad_fn, num_steps, alpha, b1, b2, eps):
    """Kingma & Ba (2014), Algorithm 1, transcribed in float64 NumPy."""
    theta = np.array(theta0, dtype=np.float64)
    m = np.zeros_like(theta)  # Initialize 1st moment vector.
    v = np.zeros_like(theta)  # Initialize 2nd moment vector.
    for t in range(1, num_steps + 1):
        g = grad_fn(theta, t - 1)  # Get gradients w.r.t. stochastic objective.
        m = b1 * m + (1 - b1) * g  # Update biased first moment estimate.
        v = b2 * v + (1 - b2) * g**2  # Update biased second raw moment estimate.
        m_hat = m / (1 - b1**t)  # Compute bias-corrected first moment estimate.
        v_hat = v / (1 - b2**t)  # Compute bias-corrected second raw moment estimate.
        theta = theta - alpha * m_hat / (np.sqrt(v_hat) + eps)  # Update parameters.
    return theta


def _numpy_noisy_grad(theta, step):
    phase = np.arange(theta.size, dtype=np.float64).reshape(theta.shape)
    return theta + 0.3 * np.sin(phase * 1.7 + step * 0.9)


@pytest.mark.parametrize("alpha,b1,b2,eps", [(1e-2, 0.9, 0.999, 1e-8), (5e-2, 0.5, 0.9, 1e-4)])
def test_float64_matches_algorithm_1(x64, alpha, b1, b2, eps):
    theta0 = np.linspace(-2.0, 3.0, 12).reshape(3, 4)
    expected = _algorithm_1(theta0, _numpy_noisy_grad, 200, alpha, b1, b2, eps)

    def grad_fn(p, step):
        phase = jnp.arange(p.size, dtype=jnp.float64).reshape(p.shape)
        return p + 0.3 * jnp.sin(phase * 1.7 + step.astype(jnp.float64) * 0.9)

    tx = optax_snr.adam(alpha, b1=b1, b2=b2, eps=eps)
    got, state = helpers.run_optimizer(tx, jnp.asarray(theta0, jnp.float64), 200, grad_fn=grad_fn)
    assert got.dtype == jnp.float64
    assert state[0].mu.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-12)


class AdamBehaviourTest(chex.TestCase):
    """The behaviours Optax's own tests probe in an optimizer."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("parabola", "parabola"),
        ("rosenbrock", "rosenbrock"),
    )
    def test_converges(self, problem):
        if problem == "parabola":
            target = jnp.array([1.0, -2.0])
            loss = lambda p: jnp.sum((p - target) ** 2)
            init, minimum, lr, steps, tol = jnp.zeros(2), target, 0.1, 600, 1e-3
        else:
            a, b = 1.0, 100.0

            def loss(p):
                x, y = p[0], p[1]
                return (a - x) ** 2 + b * (y - x**2) ** 2

            init, minimum, lr, steps, tol = jnp.array([-1.0, 1.5]), jnp.ones(2), 0.02, 4000, 1e-2

        tx = optax_snr.adam(lr)

        def step(carry, _):
            params, state = carry
            updates, state = tx.update(jax.grad(loss)(params), state, params)
            return (optax.apply_updates(params, updates), state), None

        run = self.variant(lambda p: jax.lax.scan(step, (p, tx.init(p)), length=steps)[0][0])
        final = run(init)
        chex.assert_trees_all_close(final, minimum, atol=tol)

    @chex.variants(with_jit=True, without_jit=True)
    def test_extra_args_are_accepted(self):
        tx = optax_snr.adam(1e-3)
        self.assertIsInstance(tx, optax.GradientTransformationExtraArgs)
        params = {"w": jnp.ones(3)}
        state = tx.init(params)
        update = self.variant(lambda g, s, p: tx.update(g, s, p, loss=jnp.float32(1.0), rng=None))
        updates, _ = update(params, state, params)
        chex.assert_tree_all_finite(updates)

    @chex.variants(with_jit=True, without_jit=True)
    def test_dtype_preserved(self):
        params = {
            "bf16": jnp.ones((3,), jnp.bfloat16),
            "f32": jnp.ones((2,), jnp.float32),
            "f16": jnp.ones((2,), jnp.float16),
        }
        tx = optax_snr.adam(1e-3)
        state = tx.init(params)
        updates, new_state = self.variant(tx.update)(params, state, params)
        chex.assert_trees_all_equal_dtypes(updates, params)
        chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)

    @chex.variants(with_jit=True, without_jit=True)
    def test_mu_and_nu_dtype(self):
        params = {"w": jnp.ones((4,), jnp.float32)}
        tx = optax_snr.adam(1e-3, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16)
        state = tx.init(params)
        self.assertEqual(state[0].mu["w"].dtype, jnp.bfloat16)
        self.assertEqual(state[0].nu["w"].dtype, jnp.bfloat16)
        updates, new_state = self.variant(tx.update)(params, state, params)
        self.assertEqual(updates["w"].dtype, jnp.float32)
        chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)

    def test_mu_dtype_matches_optax(self):
        params = helpers.multi_leaf_params()
        kwargs = dict(learning_rate=1e-2, mu_dtype=jnp.bfloat16)
        expected, _ = _run_optax(kwargs, params, 100)
        got, _ = helpers.run_optimizer(optax_snr.adam(**kwargs), params, 100)
        helpers.assert_trees_bitwise_equal(got, expected)

    def test_state_is_stable_between_init_and_update(self):
        params = helpers.multi_leaf_params()
        tx = optax_snr.adam(1e-3)
        state = tx.init(params)
        _, new_state = jax.jit(tx.update)(params, state, params)
        chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
        chex.assert_trees_all_equal_structs(new_state, state)
        shardings = lambda t: jax.tree.map(lambda x: x.sharding, t)
        self.assertEqual(shardings(new_state), shardings(state))

    def test_init_accepts_shape_dtype_structs(self):
        params = {"w": jax.ShapeDtypeStruct((3, 2), jnp.float32), "b": jnp.zeros(2)}
        state = optax_snr.adam(1e-3).init(params)
        chex.assert_shape(state[0].mu["w"], (3, 2))
        chex.assert_type(state[0].nu["w"], jnp.float32)
        abstract = jax.eval_shape(optax_snr.adam(1e-3).init, params)
        self.assertEqual(abstract[0].mu["w"].shape, (3, 2))

    @chex.variants(with_jit=True, without_jit=True)
    def test_none_leaves_and_empty_trees_pass_through(self):
        tx = optax_snr.adam(1e-3)
        params = {"frozen": None, "w": jnp.ones(2)}
        state = tx.init(params)
        updates, _ = self.variant(tx.update)({"frozen": None, "w": jnp.ones(2)}, state, params)
        self.assertIsNone(updates["frozen"])
        chex.assert_tree_all_finite(updates["w"])
        empty_state = tx.init({})
        empty_updates, _ = self.variant(tx.update)({}, empty_state)
        self.assertEqual(empty_updates, {})

    def test_complex_params_match_optax(self):
        key = jax.random.PRNGKey(0)
        params = {"z": jax.random.normal(key, (5,), jnp.complex64)}

        def grad_fn(p, step):
            return jax.tree.map(lambda z: z * jnp.asarray(1.0 + 0.5j, z.dtype), p)

        with helpers.standard_promotion():
            expected, _ = helpers.run_optimizer(optax.adam(1e-2), params, 50, grad_fn=grad_fn)
        got, state = helpers.run_optimizer(optax_snr.adam(1e-2), params, 50, grad_fn=grad_fn)
        helpers.assert_trees_bitwise_equal(got, expected)
        # The noise is |g|^2: real-valued, kept in the params' dtype as Optax does.
        np.testing.assert_array_equal(np.imag(np.asarray(state[0].nu["z"])), 0.0)

    def test_count_is_found_like_optax(self):
        tx = optax_snr.adam(1e-3)
        params = {"w": jnp.ones(2)}
        _, state = helpers.run_optimizer(tx, params, 7)
        count = optax.tree.get(state, "count")
        chex.assert_type(count, jnp.int32)
        self.assertEqual(int(count), 7)

    def test_state_memory_equals_optax(self):
        params = helpers.multi_leaf_params()
        nbytes = lambda t: sum(x.nbytes for x in jax.tree.leaves(t))
        self.assertEqual(
            nbytes(optax_snr.adam(1e-3).init(params)), nbytes(optax.adam(1e-3).init(params))
        )


class InjectHyperparamsTest(chex.TestCase):
    def test_changed_at_run_time_without_recompiling(self):
        settings = [(1e-2, 0.9, 0.999, 1e-8), (3e-3, 0.5, 0.99, 1e-4), (1e-3, 0.0, 0.5, 0.1)]

        def run(factory):
            chex.clear_trace_counter()
            params = helpers.multi_leaf_params()
            tx = optax.inject_hyperparams(factory)(learning_rate=1e-2, b1=0.9, b2=0.999, eps=1e-8)
            state = tx.init(params)

            @jax.jit
            @chex.assert_max_traces(n=1)
            def step(p, s, i):
                updates, s = tx.update(helpers.noisy_grad(p, i), s, p)
                return optax.apply_updates(p, updates), s

            for i, (lr, b1, b2, eps) in enumerate(settings * 2):
                for name, value in [("learning_rate", lr), ("b1", b1), ("b2", b2), ("eps", eps)]:
                    state.hyperparams[name] = jnp.asarray(value, jnp.float32)
                params, state = step(params, state, jnp.asarray(i, jnp.int32))
            return params, state

        got, state = run(optax_snr.adam)
        with helpers.standard_promotion():
            expected, _ = run(optax.adam)
        helpers.assert_trees_bitwise_equal(got, expected)
        self.assertEqual(int(state.inner_state[0].count), 2 * len(settings))

    def test_values_take_effect(self):
        params = {"w": jnp.array([1.0, -2.0, 3.0])}
        grads = {"w": jnp.array([0.5, 0.25, -1.0])}
        injected = optax.inject_hyperparams(optax_snr.adam)(learning_rate=1.0, b1=0.9)
        state = injected.init(params)
        state.hyperparams["learning_rate"] = jnp.asarray(0.25, jnp.float32)
        state.hyperparams["b1"] = jnp.asarray(0.5, jnp.float32)
        got, _ = jax.jit(injected.update)(grads, state, params)
        # inject_hyperparams hands the factory float32 arrays; so does this reference.
        f32 = lambda x: jnp.asarray(x, jnp.float32)
        plain = optax_snr.adam(f32(0.25), b1=f32(0.5), b2=f32(0.999), eps=f32(1e-8))
        expected, _ = plain.update(grads, plain.init(params), params)
        chex.assert_trees_all_close(got, expected, rtol=1e-6)


def test_multi_steps_equals_big_batch():
    key = jax.random.PRNGKey(3)
    kx, ky, kw = jax.random.split(key, 3)
    x = jax.random.normal(kx, (4, 8, 5))  # 4 micro-batches of 8 examples
    y = jax.random.normal(ky, (4, 8))
    params = {"w": jax.random.normal(kw, (5,)), "b": jnp.zeros(())}

    def loss(p, xb, yb):
        return jnp.mean((xb @ p["w"] + p["b"] - yb) ** 2)

    big = optax_snr.adam(1e-2)
    big_state = big.init(params)
    acc = optax.MultiSteps(optax_snr.adam(1e-2), every_k_schedule=4)
    acc_state = acc.init(params)
    acc_update = jax.jit(acc.update)
    big_params, acc_params = params, params
    for _ in range(3):
        g = jax.grad(loss)(big_params, x.reshape(32, 5), y.reshape(32))
        updates, big_state = big.update(g, big_state, big_params)
        big_params = optax.apply_updates(big_params, updates)
        for k in range(4):
            g = jax.grad(loss)(acc_params, x[k], y[k])
            with helpers.standard_promotion():  # MultiSteps divides an int32 count implicitly.
                updates, acc_state = acc_update(g, acc_state, acc_params)
            acc_params = optax.apply_updates(acc_params, updates)
    chex.assert_trees_all_close(acc_params, big_params, atol=1e-6)


def test_runs_under_strict_promotion_where_optax_does_not():
    # The suite's conftest already sets strict promotion; make the point explicit.
    params = {"w": jnp.ones(3), "h": jnp.ones(2, jnp.bfloat16)}
    with jax.numpy_dtype_promotion("strict"):
        with pytest.raises(jax.dtypes.TypePromotionError):
            tx = optax.adam(1e-3)
            tx.update(params, tx.init(params))
        tx = optax_snr.adam(1e-3)
        updates, _ = jax.jit(tx.update)(params, tx.init(params))
    chex.assert_trees_all_equal_dtypes(updates, params)


def test_float16_zero_gradient_is_finite_where_optax_gives_nan():
    params = {"w": jnp.ones(4, jnp.float16)}
    zeros = {"w": jnp.zeros(4, jnp.float16)}
    with helpers.standard_promotion():
        tx = optax.adam(1e-3)
        optax_updates, _ = tx.update(zeros, tx.init(params))
    assert bool(jnp.isnan(optax_updates["w"]).all())  # Optax issue 1754.
    tx = optax_snr.adam(1e-3)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(params))
    chex.assert_tree_all_finite(updates)
    np.testing.assert_array_equal(np.asarray(updates["w"], np.float32), 0.0)
    assert updates["w"].dtype == jnp.float16


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(learning_rate=-1e-3), r"learning_rate must be in \[0, inf\)"),
        (dict(learning_rate=float("nan")), r"learning_rate must be in \[0, inf\)"),
        (dict(learning_rate=float("inf")), r"learning_rate must be in \[0, inf\)"),
        (dict(learning_rate=1e-3, b1=1.0), r"b1 must be in \[0, 1\)"),
        (dict(learning_rate=1e-3, b1=-0.1), r"b1 must be in \[0, 1\)"),
        (dict(learning_rate=1e-3, b2=1.5), r"b2 must be in \[0, 1\)"),
        (dict(learning_rate=1e-3, eps=-1e-8), r"eps must be in \[0, inf\)"),
        (dict(learning_rate=1e-3, eps_root=-1.0), r"eps_root must be in \[0, inf\)"),
    ],
)
def test_invalid_hyperparameters_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        optax_snr.adam(**kwargs)


@pytest.mark.parametrize("bad", ["0.1", None, True])
def test_non_numeric_hyperparameters_raise_type_error(bad):
    with pytest.raises(TypeError, match="learning_rate must be a real number"):
        optax_snr.adam(bad)
    with pytest.raises(TypeError, match="b1 must be a real number"):
        optax_snr.adam(1e-3, b1=bad)


def test_traced_hyperparameters_and_schedules_pass_unchecked():
    optax_snr.adam(optax.constant_schedule(-1.0))  # A schedule is never called at build time.
    grads = {"w": jnp.ones(2)}

    @jax.jit
    def step(lr, b1):
        tx = optax_snr.adam(lr, b1=b1)
        return tx.update(grads, tx.init(grads))[0]

    chex.assert_tree_all_finite(step(jnp.float32(1e-3), jnp.float32(0.9)))


def test_integer_leaves_are_rejected_with_their_path():
    params = {"layer": {"w": jnp.ones(2), "steps": jnp.array([1, 2], jnp.int32)}}
    with pytest.raises(TypeError, match=r"\['layer'\]\['steps'\] has dtype int32"):
        optax_snr.adam(1e-3).init(params)
    with pytest.raises(TypeError, match=r"\['flag'\] has dtype bool"):
        optax_snr.adam(1e-3).init({"flag": jnp.array(True)})


def test_scale_by_adam_matches_optax():
    params = helpers.multi_leaf_params()
    with helpers.standard_promotion():
        expected, _ = helpers.run_optimizer(
            optax.chain(optax.scale_by_adam(b1=0.8), optax.scale(-1e-2)), params, 100
        )
    got, _ = helpers.run_optimizer(
        optax.chain(optax_snr.scale_by_adam(b1=0.8), optax.scale(-1e-2)), params, 100
    )
    helpers.assert_trees_bitwise_equal(got, expected)
