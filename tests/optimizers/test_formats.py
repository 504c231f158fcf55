"""Every ready-made optimizer with every storage format, through its own arguments.

``mu_dtype=`` and ``nu_dtype=`` of each optimizer take a storage format as
they take a dtype. For each optimizer and format: the state after ``init``
and after jitted updates keeps its types (one trace), each moment buffer is
stored in the format its argument names, a small least-squares problem
trains to float32's loss, and bad arguments fail naming themselves.
"""

import functools
import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_snr

LEARNING_RATE = 0.1
NUM_STEPS = 100  # per call of the jitted loop; the test calls it twice

# name: a builder from (mu_dtype, nu_dtype), and which state fields each argument stores.
OPTIMIZERS = {
    "adam": (optax_snr.adam, {"mu": "mu", "nu": "nu"}),
    "adamw": (optax_snr.adamw, {"mu": "mu", "nu": "nu"}),
    "nadam": (optax_snr.nadam, {"mu": "mu", "nu": "nu"}),
    "nadamw": (optax_snr.nadamw, {"mu": "mu", "nu": "nu"}),
    "amsgrad": (optax_snr.amsgrad, {"mu": "mu", "nu": "nu", "nu_max": "nu"}),
    "adabelief": (optax_snr.adabelief, {"mu": "mu", "nu": "nu"}),
    "ademamix": (
        functools.partial(optax_snr.ademamix, b3=0.99),  # a short run: a shorter memory
        {"m1": "mu", "m2": "mu", "nu": "nu"},
    ),
    "adopt": (optax_snr.adopt, {"mu": "mu", "nu": "nu"}),
    "fused_adam": (optax_snr.fused_adam, {"mu": "mu", "nu": "nu"}),
}

# name: (mu_dtype, nu_dtype, the stored leaf's class). factored keeps the noise only.
FORMATS = {
    "8bit": (optax_snr.quantized(bits=8, block_size=32, min_size=0),) * 2
    + (optax_snr.QuantizedMoment,),
    "4bit": (optax_snr.quantized(bits=4, block_size=32, min_size=0),) * 2
    + (optax_snr.QuantizedMoment,),
    "sr_bf16": (optax_snr.stochastic_rounding(jnp.bfloat16),) * 2 + (optax_snr.RoundedMoment,),
    "factored": (None, optax_snr.factored(min_dim_size=8), optax_snr.FactoredMoment),
}
# The final loss, relative to float32's (all of them reach the noise floor, about 0.079).
TOLERANCE = {"8bit": 0.01, "4bit": 0.03, "sr_bf16": 0.01, "factored": 0.01}

_KX, _KW, _KN = jax.random.split(jax.random.PRNGKey(0), 3)
X = jax.random.normal(_KX, (128, 16), jnp.float32)
Y = X @ jax.random.normal(_KW, (16, 32), jnp.float32) + 0.3 * jax.random.normal(_KN, (128, 32))


def loss(params):
    """Least squares with a noise floor: a (16, 32) matrix and a (32,) bias to fit."""
    return jnp.mean(jnp.square(X @ params["w"] + params["b"][None, :] - Y))


def init_params():
    return {"w": jnp.zeros((16, 32), jnp.float32), "b": jnp.zeros((32,), jnp.float32)}


def build(opt, fmt):
    mu_dtype, nu_dtype = FORMATS[fmt][:2] if fmt else (None, None)
    return OPTIMIZERS[opt][0](LEARNING_RATE, mu_dtype=mu_dtype, nu_dtype=nu_dtype)


def training_loop(tx):
    """``NUM_STEPS`` steps of ``tx`` on :func:`loss`, in one jitted call."""

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(params, state):
        def body(_, carry):
            params, state = carry
            updates, state = tx.update(jax.grad(loss)(params), state, params)
            return optax.apply_updates(params, updates), state

        return jax.lax.fori_loop(0, NUM_STEPS, body, (params, state))

    return run


@functools.cache
def float32_loss(opt):
    run = training_loop(build(opt, None))
    params, state = run(init_params(), build(opt, None).init(init_params()))
    params, _ = run(params, state)
    return float(loss(params))


def stored_fields(state, opt):
    """Each moment field of the state (Optax's names), as {field: {leaf: buffer}}."""
    return {name: optax.tree.get(state, name) for name in OPTIMIZERS[opt][1]}


def cases():
    return [(opt, fmt) for opt in OPTIMIZERS for fmt in FORMATS]


@pytest.mark.parametrize(("opt", "fmt"), cases())
def test_trains_under_jit_with_the_moments_stored_in_the_format(opt, fmt):
    mu_dtype, nu_dtype, stored_class = FORMATS[fmt]
    tx = build(opt, fmt)
    params = init_params()
    state = tx.init(params)
    run = training_loop(tx)
    params, new_state = run(params, state)
    # The state's tree, shapes and dtypes are those of init: the second call does not retrace.
    chex.assert_trees_all_equal_structs(new_state, state)
    chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
    params, state = run(params, new_state)
    chex.assert_tree_all_finite((params, state))
    assert int(optax.tree.get(state, "count")) == 2 * NUM_STEPS

    # Each buffer in the format its argument names: the matrix stored, the bias
    # dense (factored keeps matrices only) or stored.
    for name, fields in stored_fields(state, opt).items():
        spec = {"mu": mu_dtype, "nu": nu_dtype}[OPTIMIZERS[opt][1][name]]
        w, b = fields["w"], fields["b"]
        if spec is None:
            chex.assert_type([w, b], jnp.float32)
            continue
        assert isinstance(w, stored_class), (name, type(w))
        assert w.format == spec and w.shape == (16, 32), name
        if fmt == "factored":
            chex.assert_shape([w.row, w.col], [(16,), (32,)])
            chex.assert_type([w.row, w.col, b], jnp.float32)
        elif fmt == "sr_bf16":
            chex.assert_type([w.value, b.value], jnp.bfloat16)
        else:  # 8 bits: one code per entry; 4 bits: two per byte. One scale per 32.
            chex.assert_shape(
                [w.codes, b.codes], [(16, 32 // (8 // spec.bits)), (32 // (8 // spec.bits),)]
            )
            chex.assert_type([w.codes, b.codes], jnp.uint8)
            chex.assert_shape(w.scales, (16, 1))
        nbytes = sum(x.nbytes for x in jax.tree.leaves(w))
        assert nbytes < 16 * 32 * 4, name  # less than float32's buffer

    # Trained: the loss fell from about 17 to float32's final loss.
    got, want = float(loss(params)), float32_loss(opt)
    assert want < 0.1
    np.testing.assert_allclose(got, want, rtol=TOLERANCE[fmt])


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_defaults_none_keep_the_params_dtype_in_every_buffer(opt):
    params = {"w": jnp.zeros((4, 3), jnp.bfloat16)}
    state = OPTIMIZERS[opt][0](LEARNING_RATE).init(params)
    for fields in stored_fields(state, opt).values():
        chex.assert_type(fields["w"], jnp.bfloat16)


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_both_moment_arguments_exist_and_nu_dtype_is_keyword_only(opt):
    parameters = inspect.signature(OPTIMIZERS[opt][0]).parameters
    assert {"mu_dtype", "nu_dtype"} <= set(parameters)
    assert parameters["nu_dtype"].kind is inspect.Parameter.KEYWORD_ONLY
    assert parameters["mu_dtype"].default is None and parameters["nu_dtype"].default is None


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
@pytest.mark.parametrize("argument", ["mu_dtype", "nu_dtype"])
@pytest.mark.parametrize("dtype", [jnp.int8, jnp.uint8, jnp.int32, bool])
def test_an_integer_moment_dtype_raises_naming_the_argument(opt, argument, dtype):
    with pytest.raises(TypeError, match=f"{argument} must be a floating"):
        OPTIMIZERS[opt][0](LEARNING_RATE, **{argument: dtype})


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_factored_signal_raises_naming_mu_dtype(opt):
    # The signal is signed: it cannot be rebuilt from row and column means.
    with pytest.raises(ValueError, match="mu_dtype: factored"):
        OPTIMIZERS[opt][0](LEARNING_RATE, mu_dtype=optax_snr.factored())


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_a_format_class_raises_naming_the_argument(opt):
    from optax_snr.storage.quantized import Quantized

    for argument in ("mu_dtype", "nu_dtype"):
        with pytest.raises(TypeError, match=f"{argument} takes a storage format object"):
            OPTIMIZERS[opt][0](LEARNING_RATE, **{argument: Quantized})


def test_amsgrad_keeps_nu_and_nu_max_in_nu_dtype():
    nu_dtype = optax_snr.stochastic_rounding(jnp.bfloat16)
    tx = optax_snr.amsgrad(LEARNING_RATE, nu_dtype=nu_dtype)
    state = tx.init(init_params())
    assert isinstance(state[0].nu["w"], optax_snr.RoundedMoment)
    assert isinstance(state[0].nu_max["w"], optax_snr.RoundedMoment)
    chex.assert_type(state[0].mu["w"], jnp.float32)
    # After one step the maximum is the bias-corrected noise itself (each
    # stored in bfloat16, rounded independently: within two of its spacings).
    _, state = jax.jit(tx.update)(jax.grad(loss)(init_params()), state)
    decoded = optax_snr.decode_moments(state[0])
    nu_hat = decoded.nu["w"] / jnp.float32(1 - 0.999)
    np.testing.assert_allclose(decoded.nu_max["w"], nu_hat, rtol=2**-6)


def test_ademamix_nu_follows_mu_dtype_unless_nu_dtype_is_given():
    q8 = optax_snr.quantized(bits=8, min_size=0)
    state = optax_snr.ademamix(LEARNING_RATE, mu_dtype=q8).init(init_params())
    for field in ("m1", "m2", "nu"):
        assert isinstance(getattr(state[0], field)["w"], optax_snr.QuantizedMoment), field
    state = optax_snr.ademamix(LEARNING_RATE, mu_dtype=q8, nu_dtype=jnp.float32).init(init_params())
    chex.assert_type(state[0].nu["w"], jnp.float32)
    assert isinstance(state[0].m2["w"], optax_snr.QuantizedMoment)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_fused_adam_step_with_a_format_equals_update_and_apply(fmt):
    # Stored leaves take the reference chain inside ``step``; dense float32
    # leaves (factored's bias) take the kernel.
    opt = build("fused_adam", fmt)
    params = {"w": jnp.full((16, 32), 0.5, jnp.float32), "b": jnp.full((32,), -0.5, jnp.float32)}
    state = opt.init(params)
    grads = jax.grad(loss)(params)

    @jax.jit
    def reference(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    want = reference(params, state, grads)
    got = jax.jit(opt.step)(params, state, grads)
    chex.assert_trees_all_equal_structs(got, want)
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-7)
    assert isinstance(got[1][0].nu["w"], FORMATS[fmt][2])
