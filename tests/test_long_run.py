"""A long run: 128,000 samples, batch 128, 100 epochs = 100,000 steps.

The note's own example of how far a real run goes: the bias correction must
have reached exactly 1, the step count must be exact, and float32 must stay
close to the same run in float64. ``jax.lax.scan`` keeps the 100,000 steps in
one compiled loop (seconds, not minutes). Marked ``slow``: run it with
``pytest -m slow tests/test_long_run.py``.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_snr
from optax_snr.common.moments import correction

NUM_SAMPLES = 128_000
BATCH = 128
EPOCHS = 100
STEPS = NUM_SAMPLES // BATCH * EPOCHS  # 100,000
FEATURES = 8
LR = 1e-3


def _data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A noisy linear regression, rounded to float32 once so both runs see the same data."""
    rng = np.random.default_rng(0)
    w_true = rng.normal(size=FEATURES)
    x = rng.normal(size=(NUM_SAMPLES, FEATURES)).astype(np.float32)
    y = (x @ w_true + 0.1 * rng.normal(size=NUM_SAMPLES)).astype(np.float32)
    return x, y, w_true


def _train(x: jax.Array, y: jax.Array) -> tuple[jax.Array, tuple, jax.Array]:
    """100 epochs over the batches in a fixed order; returns (params, state, losses)."""
    dtype = x.dtype
    tx = optax_snr.adam(LR)
    xb = x.reshape(-1, BATCH, FEATURES)
    yb = y.reshape(-1, BATCH)

    def loss_fn(w, xi, yi):
        return jnp.mean((xi @ w - yi) ** 2)

    def step(carry, batch):
        w, state = carry
        loss, grads = jax.value_and_grad(loss_fn)(w, *batch)
        updates, state = tx.update(grads, state, w)
        return (optax.apply_updates(w, updates), state), loss

    def epoch(carry, _):
        carry, losses = jax.lax.scan(step, carry, (xb, yb))
        return carry, jnp.mean(losses)

    @jax.jit
    def run(w):
        (w, state), losses = jax.lax.scan(epoch, (w, tx.init(w)), None, length=EPOCHS)
        return w, state, losses

    return run(jnp.zeros(FEATURES, dtype))


@pytest.mark.slow
def test_hundred_thousand_steps_float32_tracks_float64(x64):
    x, y, w_true = _data()
    start = time.perf_counter()
    w32, state32, losses32 = jax.block_until_ready(
        _train(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
    )
    seconds32 = time.perf_counter() - start
    w64, state64, losses64 = jax.block_until_ready(
        _train(jnp.asarray(x, jnp.float64), jnp.asarray(y, jnp.float64))
    )
    assert w32.dtype == jnp.float32 and w64.dtype == jnp.float64

    # The count is exact and int32 in both runs.
    for state in (state32, state64):
        assert state[0].count.dtype == jnp.int32
        assert int(state[0].count) == STEPS == 100_000
    # The bias correction has reached exactly 1 (in float32 arithmetic too).
    count = state32[0].count
    for decay in (0.9, 0.999):
        assert float(correction(jnp.asarray(decay, jnp.float32), count)) == 1.0
        assert float(correction(decay, count)) == 1.0

    # Training worked: the fit is close to the true weights.
    assert np.max(np.abs(np.asarray(w64) - w_true)) < 0.05
    assert float(losses32[-1]) < 0.02  # The noise floor is 0.1 ** 2 = 0.01.

    # After 100,000 steps float32 is within 1% of one step (the learning rate)
    # of float64: rounding errors do not accumulate.
    diff = float(np.max(np.abs(np.asarray(w32, np.float64) - np.asarray(w64))))
    losses64 = np.asarray(losses64)
    loss_diff = float(np.max(np.abs(np.asarray(losses32, np.float64) - losses64) / losses64))
    print(
        f"\n100,000 steps in {seconds32:.2f} s (float32, incl. compile); "
        f"max |w32 - w64| = {diff:.3g}; max relative |loss32 - loss64| = {loss_diff:.3g}"
    )
    assert diff <= 1e-2 * LR
    # Per-epoch mean loss, relative: dominated by the float32 sum of the
    # 128,000 squared residuals themselves, not by the optimizer.
    assert loss_diff <= 1e-4
    assert bool(jnp.all(jnp.isfinite(state32[0].nu)))
