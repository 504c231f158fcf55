"""Faults: skip a step whose gradients, updates or moments turn non-finite."""

import functools
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = ["SkipNonfiniteState", "all_finite", "newly_nonfinite", "skip_nonfinite"]

# NamedTuple states whose ``count`` is a schedule's clock (named as
# ``optax.tree.get`` names them, by ``tuple_name``). A skipped step still spends
# one step of the schedule, as a learning-rate scheduler keeps stepping when a
# mixed-precision step is skipped; so a schedule that is NaN at one step costs
# one skipped step instead of being asked for that step again forever.
_SCHEDULE_CLOCKS = frozenset(
    {
        "ScaleByScheduleState",  # optax.scale_by_schedule, scale_by_learning_rate(schedule).
        "InjectHyperparamsState",  # optax.inject_hyperparams (older optax).
        "InjectStatefulHyperparamsState",  # optax.inject_hyperparams.
        "WrappedScheduleState",  # A schedule inside inject_hyperparams.
    }
)


def _is_clock(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields") and type(x).__name__ in _SCHEDULE_CLOCKS


class SkipNonfiniteState(NamedTuple):
    """State of :func:`skip_nonfinite`: the inner state and the skip counters."""

    inner_state: Any  # The wrapped optimizer's state, as of the last applied step.
    skipped: jax.Array  # shape=(), dtype=jnp.int32: steps skipped in all (saturating).
    consecutive_skips: jax.Array  # shape=(), dtype=jnp.int32: skipped since the last applied.
    last_finite: jax.Array  # shape=(), dtype=jnp.bool_: whether the last step was finite.


def _is_float(x: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def all_finite(tree: Any) -> jax.Array:
    """A scalar ``bool``: whether every floating leaf of ``tree`` is finite.

    Integer and boolean leaves (a step count, a flag) cannot hold NaN or inf and
    are not read; ``None`` leaves are skipped; an empty tree is finite.
    """
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if _is_float(x)]
    return functools.reduce(jnp.logical_and, leaves, jnp.asarray(True))


def newly_nonfinite(old: Any, new: Any) -> jax.Array:
    """A scalar ``bool``: whether a float element finite in ``old`` is not finite in ``new``.

    ``old`` and ``new`` are two versions of one state (same tree). Values that
    were already inf or NaN do not count: ``optax.contrib.reduce_on_plateau``
    starts its ``best_value`` at ``inf`` on purpose, and a marker like that
    must not make every step look bad.
    """
    flags = []
    for o, n in zip(jax.tree.leaves(old), jax.tree.leaves(new), strict=True):
        if not _is_float(n):
            continue
        if _is_float(o) and jnp.shape(o) == jnp.shape(n):
            flags.append(jnp.any(jnp.isfinite(o) & ~jnp.isfinite(n)))
        else:  # No element to compare with: every element must be finite.
            flags.append(~jnp.all(jnp.isfinite(n)))
    return functools.reduce(jnp.logical_or, flags, jnp.asarray(False))


def _keep_or_roll_back(apply: jax.Array, new: Any, old: Any) -> Any:
    """``new`` where ``apply``, else ``old``; the clock of a schedule always takes ``new``."""

    def select(n, o):
        if _is_clock(n):
            rest = {
                f: _keep_or_roll_back(apply, getattr(n, f), getattr(o, f))
                for f in n._fields
                if f != "count"
            }
            return type(n)(count=n.count, **rest)
        return jnp.where(apply, n, o)

    return jax.tree.map(select, new, old, is_leaf=_is_clock)


def _check_bound(bound: Any) -> None:
    """``max_consecutive_skips``: an int >= 0 (NumPy ints too, not bools) or None."""
    if bound is None:
        return
    if isinstance(bound, bool) or not isinstance(bound, numbers.Integral):
        raise TypeError(
            "skip_nonfinite: max_consecutive_skips must be an int >= 0 or None, got "
            f"{bound!r} of type {type(bound).__name__}."
        )
    if bound < 0:
        raise ValueError(
            f"skip_nonfinite: max_consecutive_skips must be >= 0 (or None), got {bound}."
        )


def skip_nonfinite(
    inner: optax.GradientTransformation,
    max_consecutive_skips: int | None = 100,
) -> optax.GradientTransformationExtraArgs:
    r"""Wraps an optimizer so that a step with NaN or inf is skipped and counted.

    In the SNR reading the state is the optimizer's memory: the signal
    :math:`m`, the noise :math:`v` and the step :math:`t`. One NaN gradient
    poisons :math:`m` and :math:`v` for good, and so does one finite but huge
    gradient whose square overflows the noise buffer (float32 holds
    :math:`v` only up to about :math:`3.4 \times 10^{38}`): :math:`v` becomes
    inf, every later step of that parameter is :math:`m / \infty = 0`, and the
    parameter silently stops training. This wrapper runs the inner step and
    keeps its result only if the step is *finite*:

    .. math::

        (u_t, s_t) = \begin{cases}
          \mathrm{inner}(g_t, s_{t-1}) & \text{if the step is finite} \\
          (0, s_{t-1}) & \text{otherwise (skipped += 1)}
        \end{cases}

    A step is finite when the gradients :math:`g_t` and the updates :math:`u_t`
    are finite, and no float value of the state that was finite before the step
    is inf or NaN after it (the moments :math:`m`, :math:`v`, and whatever
    other buffers the inner transformations keep). Values that were already
    non-finite are not judged: ``optax.contrib.reduce_on_plateau`` keeps
    ``best_value = inf`` until it sees a loss, and such a marker must not make
    every step look bad. (Checking the gradients alone, as
    :func:`optax.apply_if_finite` does, misses a huge but finite gradient
    that overflows the noise buffer, whose update is a finite zero.)

    A skipped step returns zero updates, so ``optax.apply_updates`` leaves the
    params unchanged, and the inner state is rolled back to the one from before
    the bad batch, Adam's step count included, with one exception: the clocks
    of schedules (the ``count`` of :class:`optax.ScaleByScheduleState`, which
    ``optax.scale_by_learning_rate`` keeps for a schedule, and of
    ``optax.inject_hyperparams``'s state) move on. A schedule is a function of
    time, and a schedule that is NaN at one step would otherwise be asked for
    that same step again forever.

    Skips are bounded: after ``max_consecutive_skips`` skipped steps in a row
    the next non-finite step is *applied anyway* (its updates and state, NaN
    included, as :func:`optax.apply_if_finite` does after
    ``max_consecutive_errors``), and the count of consecutive skips starts
    over. A run that can no longer make a finite step thus ends up with NaN
    params, which a training loop notices, instead of stalling silently with
    unchanged params. ``max_consecutive_skips=None`` skips forever: then watch
    ``consecutive_skips``.

    With :class:`optax.MultiSteps` (gradient accumulation), put this wrapper
    *outside*: ``skip_nonfinite(optax.MultiSteps(tx, k))`` drops a bad
    micro-batch, accumulator and all, and the accumulation goes on with the
    next one. Inside, ``optax.MultiSteps(skip_nonfinite(tx), k)`` sees only the
    mean of ``k`` micro-batches, and Optax's accumulator, reset by multiplying
    by zero, keeps the NaN for good (``NaN * 0`` is NaN): every later step is
    skipped, until the bound applies a NaN step.

    The check reads the gradients, the updates and the old and new state once
    per step; under ``jax.jit`` it fuses with the update. On a sharded state the
    reductions are global, so every device takes the same decision.

    The state has no field named ``count``, so ``optax.tree.get(state,
    "count")`` still finds the inner optimizer's step counter: the number of
    *applied* steps. ``skipped`` is the number of skipped steps,
    ``consecutive_skips`` those since the last applied step, and
    ``last_finite`` whether the last step was finite.

    Args:
      inner: the optimizer to protect, e.g. ``optax_snr.adam(1e-3)``.
      max_consecutive_skips: how many non-finite steps in a row are skipped
        before the next one is applied anyway; an int ``>= 0``, or ``None``
        for no bound.

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
    _check_bound(max_consecutive_skips)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return SkipNonfiniteState(
            inner_state=inner.init(params),
            skipped=jnp.zeros([], jnp.int32),
            consecutive_skips=jnp.zeros([], jnp.int32),
            last_finite=jnp.asarray(True),
        )

    def update_fn(updates, state, params=None, **extra_args):
        if not isinstance(state, SkipNonfiniteState):
            raise TypeError(
                "skip_nonfinite: expected the SkipNonfiniteState that this wrapper's init "
                f"returns, got {type(state).__name__}."
            )
        old_inner = state.inner_state
        new_updates, new_inner = inner.update(updates, old_inner, params, **extra_args)
        finite = (
            all_finite(updates) & all_finite(new_updates) & ~newly_nonfinite(old_inner, new_inner)
        )
        if max_consecutive_skips is None:
            skip = ~finite
        else:
            bound = jnp.asarray(int(max_consecutive_skips), jnp.int32)
            skip = ~finite & (state.consecutive_skips < bound)
        apply = ~skip
        new_inner = _keep_or_roll_back(apply, new_inner, old_inner)
        new_updates = jax.tree.map(lambda u: jnp.where(apply, u, jnp.zeros_like(u)), new_updates)
        return new_updates, SkipNonfiniteState(
            inner_state=new_inner,
            skipped=jnp.where(skip, optax.safe_increment(state.skipped), state.skipped),
            consecutive_skips=jnp.where(
                skip, optax.safe_increment(state.consecutive_skips), jnp.zeros([], jnp.int32)
            ),
            last_finite=finite,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
