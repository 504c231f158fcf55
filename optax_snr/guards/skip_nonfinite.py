"""Faults: skip a step whose gradients or new optimizer state are not finite."""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = ["SkipNonfiniteState", "all_finite", "skip_nonfinite"]


class SkipNonfiniteState(NamedTuple):
    """State of :func:`skip_nonfinite`: the inner state and the skip counters."""

    inner_state: Any  # The wrapped optimizer's state, as of the last applied step.
    skipped: jax.Array  # shape=(), dtype=jnp.int32: steps skipped (saturating).
    last_finite: jax.Array  # shape=(), dtype=jnp.bool_: whether the last step was applied.


def all_finite(tree: Any) -> jax.Array:
    """A scalar ``bool``: whether every floating leaf of ``tree`` is finite.

    Integer and boolean leaves (a step count, a flag) cannot hold NaN or inf and
    are not read; ``None`` leaves are skipped; an empty tree is finite.
    """
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    ]
    return functools.reduce(jnp.logical_and, leaves, jnp.asarray(True))


def skip_nonfinite(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    r"""Wraps an optimizer so that a step with NaN or inf is skipped and counted.

    In the SNR reading the state is the optimizer's memory: the signal
    :math:`m`, the noise :math:`v` and the step :math:`t`. One NaN gradient
    poisons :math:`m` and :math:`v` for good, and so does one finite but huge
    gradient whose square overflows the noise buffer (float32 holds
    :math:`v` only up to about :math:`3.4 \times 10^{38}`): :math:`v` becomes
    inf, every later step of that parameter is :math:`m / \infty = 0`, and the
    parameter silently stops training. This wrapper runs the inner step and
    keeps its result only if everything is finite:

    .. math::

        (u_t, s_t) = \begin{cases}
          \mathrm{inner}(g_t, s_{t-1}) & \text{if } g_t, u_t, s_t \text{ are finite} \\
          (0, s_{t-1}) & \text{otherwise (skipped += 1)}
        \end{cases}

    A skipped step returns zero updates, so ``optax.apply_updates`` leaves the
    params unchanged, and the inner state (step count included) is the one
    from before the bad batch. Unlike :func:`optax.apply_if_finite`, the new
    inner *state* is checked too (which catches the overflowed noise buffer,
    whose update is a finite zero), and a bad step is never applied, however
    many come in a row: watch ``skipped`` instead.

    The check reads the gradients, the updates and the new state once per
    step; under ``jax.jit`` it fuses with the update. On a sharded state the
    ``all`` reductions are global, so every device takes the same decision.

    The state has no field named ``count``, so ``optax.tree.get(state,
    "count")`` still finds the one step counter, in the inner state: the
    number of *applied* steps. ``optax.tree.get(state, "skipped")`` is the
    number of skipped ones.

    Args:
      inner: the optimizer to protect, e.g. ``optax_snr.adam(1e-3)``.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` whose state is a
      :class:`SkipNonfiniteState`; extra keyword arguments are passed to
      ``inner``.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import optax_snr
      >>> tx = optax_snr.skip_nonfinite(optax_snr.adam(1e-3))
      >>> state = tx.init(jnp.zeros(2))
      >>> updates, state = tx.update(jnp.array([1.0, jnp.nan]), state)
      >>> updates, state.skipped, optax.tree.get(state, "count")
      (Array([0., 0.], dtype=float32), Array(1, dtype=int32), Array(0, dtype=int32))

    References:
      Micikevicius et al., `Mixed Precision Training
      <https://arxiv.org/abs/1710.03740>`_, 2018 (skipping steps whose
      gradients overflow, Section 3.2).
    """
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return SkipNonfiniteState(
            inner_state=inner.init(params),
            skipped=jnp.zeros([], jnp.int32),
            last_finite=jnp.asarray(True),
        )

    def update_fn(updates, state, params=None, **extra_args):
        new_updates, new_inner = inner.update(updates, state.inner_state, params, **extra_args)
        finite = all_finite((updates, new_updates, new_inner))
        new_inner = jax.tree.map(
            lambda new, old: jnp.where(finite, new, old), new_inner, state.inner_state
        )
        new_updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), new_updates)
        skipped = jnp.where(finite, state.skipped, optax.safe_increment(state.skipped))
        return new_updates, SkipNonfiniteState(new_inner, skipped, finite)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
