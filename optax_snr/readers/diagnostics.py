"""Seeing the SNR: signal, noise and their ratio, read from an optimizer state.

The state of Adam (and of its variants) already holds everything needed: the
signal EMA ``mu``, the noise EMA ``nu`` and the step ``count``. The functions
here are pure functions of that state: they add no buffers to the optimizer,
compute nothing unless called, and run under ``jax.jit``, so a training loop
can log them every N steps.
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_snr.common import validation
from optax_snr.common.dtypes import compute_dtype, promote
from optax_snr.common.moments import correction, debias

__all__ = [
    "SnrDiagnostics",
    "SnrSummary",
    "Summary",
    "flatten_diagnostics",
    "snr_diagnostics",
]

# The quantile levels of a Summary, between its ``min`` and ``max`` fields.
_LEVELS = (0.1, 0.5, 0.9)

# Quantiles are exact over up to this many entries and estimated from a random
# sample of this many beyond: a sort of millions of entries would cost hundreds
# of times an optimizer step on CPU, and a logged median needs no more.
_SAMPLE = 1 << 15

# Adam's defaults, used when neither the caller nor an inject_hyperparams state
# gives a value.
_DEFAULTS = {"b1": 0.9, "b2": 0.999, "eps": 1e-8}

# States of wrappers and schedules that count steps of their own.
_WRAPPER_COUNTS = (
    "InjectHyperparamsState",
    "InjectStatefulHyperparamsState",
    "ScaleByScheduleState",
    "WrappedScheduleState",
)


class Summary(NamedTuple):
    """Mean and quantiles of one quantity over a set of parameters."""

    mean: jax.Array  # shape=(); the average over all entries (exact).
    min: jax.Array  # shape=(); the smallest entry (exact).
    q10: jax.Array  # shape=(); quantile 0.1 (sampled beyond 32,768 entries).
    median: jax.Array  # shape=(); quantile 0.5 (sampled beyond 32,768 entries).
    q90: jax.Array  # shape=(); quantile 0.9 (sampled beyond 32,768 entries).
    max: jax.Array  # shape=(); the largest entry (exact).


class SnrSummary(NamedTuple):
    """Signal, noise and SNR of one set of parameters (a leaf, or all of them)."""

    signal: Summary  # |m_hat|: the bias-corrected EMA of gradients, in magnitude.
    noise: Summary  # sqrt(v_hat): root of the bias-corrected EMA of |gradient|^2.
    snr: Summary  # |m_hat| / (sqrt(v_hat) + eps): the step per unit learning rate.


class SnrDiagnostics(NamedTuple):
    """What :func:`snr_diagnostics` returns: one summary overall and one per leaf."""

    count: jax.Array  # shape=(), int32; the step t used in the bias correction.
    overall: SnrSummary  # Over every entry of every parameter.
    per_leaf: dict[str, SnrSummary]  # Keyed by the leaf's path, e.g. "dense/kernel".


def _is_field(path: tuple[Any, ...], value: Any) -> bool:
    """Keeps matches that are NamedTuple fields, not dict keys inside params."""
    del value
    return bool(path) and isinstance(path[-1], optax.tree_utils.NamedTupleKey)


def _find_one(state: Any, name: str) -> list[tuple[tuple[Any, ...], Any]]:
    return optax.tree.get_all_with_path(state, name, filtering=_is_field)


def _parent(path: tuple[Any, ...]) -> tuple[Any, ...]:
    """The path of the NamedTuple holding a field, and that tuple's type name."""
    return (*path[:-1], path[-1].tuple_name)


def _leaf_name(path: tuple[Any, ...]) -> str:
    """A readable "a/b/0" name; a trailing ``.value`` (Flax NNX Variables) is dropped."""
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    return jax.tree_util.keystr(path, simple=True, separator="/") or "<root>"


def _find_moments(state: Any) -> tuple[Any, Any, bool, jax.Array]:
    """Finds ``(mu, nu, is_max, count)``: the moments and the step count that goes with them.

    ``is_max`` tells that ``nu`` is AMSGrad's running maximum of the corrected
    noise (a ``nu_max`` field), which is divided by as it is.
    """
    mus = {_parent(p): v for p, v in _find_one(state, "mu")}
    mus.update({_parent(p): v for p, v in _find_one(state, "m1")})  # AdEMAMix's fast EMA
    nus = {_parent(p): v for p, v in _find_one(state, "nu")}
    holders = [p for p in mus if p in nus]
    if not holders:
        raise ValueError(
            "snr_diagnostics: the optimizer state holds no moments (a NamedTuple "
            "with fields `mu` and `nu`, such as optax_snr.EmaMomentsState or "
            f"optax.ScaleByAdamState); got a state of type {type(state).__name__}. "
            "Diagnostics need Adam or one of its variants (optax_snr.adam, "
            "optax.adam, ...), possibly inside optax.chain, inject_hyperparams, "
            "MultiSteps or masked."
        )
    if len(holders) > 1:
        where = ", ".join(jax.tree_util.keystr(p[:-1]) or "<root>" for p in holders)
        raise ValueError(
            "snr_diagnostics: the optimizer state holds more than one set of "
            f"moments (at {where}); pass the sub-state of the optimizer you want "
            "to inspect."
        )
    (holder,) = holders
    if holder[-1] == "ScaleByAdoptState":
        raise ValueError(
            "snr_diagnostics: ADOPT's `mu` averages gradients already divided by "
            "the noise, so it is not a signal to compare with the noise."
        )
    counts = {_parent(p): v for p, v in _find_one(state, "count")}
    if holder in counts:  # The moments and the count share a state (optax.adam).
        count = counts[holder]
    else:  # Chained stages: one stage owns the count, normally bias_correction.
        owners = {p: v for p, v in counts.items() if p[-1] not in _WRAPPER_COUNTS}
        own = [v for p, v in owners.items() if p[-1] == "BiasCorrectionState"]
        if len(own) != 1:
            own = list(owners.values())
        if len(own) != 1:
            raise ValueError(
                "snr_diagnostics: found the moments but not the one step count "
                "that goes with them (in a BiasCorrectionState, or a `count` field "
                f"beside `mu` and `nu`); found {len(owners)} candidate counts."
            )
        (count,) = own
    # Flax NNX wraps each state leaf in a Variable: take the array inside.
    (count,) = jax.tree.leaves(count)
    maxima = _find_one(state, "nu_max")
    if len(maxima) == 1:  # AMSGrad divides by the running max of v_hat instead.
        return mus[holder], maxima[0][1], True, count
    return mus[holder], nus[holder], False, count


def _hyperparameter(state: Any, name: str, given: Any) -> Any:
    """The caller's value, else the inject_hyperparams value, else Adam's default."""
    if given is not None:
        return given
    for _, hyperparams in _find_one(state, "hyperparams"):
        if isinstance(hyperparams, dict) and name in hyperparams:
            (value,) = jax.tree.leaves(hyperparams[name])
            return value
    return _DEFAULTS[name]


def _sample(xs: list[jax.Array], total: int) -> jax.Array:
    """``_SAMPLE`` entries drawn uniformly, with replacement, from all of ``xs``.

    A fixed key makes the draw the same at every call, so the estimates do not
    jitter from one logged step to the next for want of a new sample.
    """
    key_leaf, key_position = jax.random.split(jax.random.PRNGKey(0))
    weights = jnp.asarray([x.size / total for x in xs], jnp.float32)
    leaf = jax.random.choice(key_leaf, len(xs), (_SAMPLE,), p=weights)
    u = jax.random.uniform(key_position, (_SAMPLE,), jnp.float32)
    sample = jnp.zeros((_SAMPLE,), xs[0].dtype)
    for i, x in enumerate(xs):
        position = jnp.minimum((u * x.size).astype(jnp.int32), x.size - 1)
        sample = jnp.where(leaf == i, jnp.take(x, position), sample)
    return sample


def _summary(xs: list[jax.Array], dtype: jnp.dtype) -> Summary:
    """Mean, min, max and quantiles over all entries of ``xs`` (NaN if there are none)."""
    xs = [jnp.ravel(x) for x in xs if x.size]
    total = sum(x.size for x in xs)
    if total == 0:
        nan = jnp.full((), jnp.nan, dtype)
        return Summary(nan, nan, nan, nan, nan, nan)
    mean = functools.reduce(jnp.add, [jnp.sum(x) for x in xs]) / jnp.asarray(total, dtype)
    low = functools.reduce(jnp.minimum, [jnp.min(x) for x in xs])
    high = functools.reduce(jnp.maximum, [jnp.max(x) for x in xs])
    sample = jnp.concatenate(xs) if total <= _SAMPLE else _sample(xs, total)
    q10, median, q90 = jnp.quantile(sample, jnp.asarray(_LEVELS, dtype))
    return Summary(mean, low, q10, median, q90, high)


def _snr_summary(signal: list, noise: list, ratio: list, dtype: jnp.dtype) -> SnrSummary:
    return SnrSummary(_summary(signal, dtype), _summary(noise, dtype), _summary(ratio, dtype))


def snr_diagnostics(
    state: Any,
    *,
    b1: jax.typing.ArrayLike | None = None,
    b2: jax.typing.ArrayLike | None = None,
    eps: jax.typing.ArrayLike | None = None,
) -> SnrDiagnostics:
    r"""Summarizes the signal, the noise and the SNR held in an Adam-like state.

    As training converges the gradients' consistent part shrinks while their
    batch-to-batch fluctuation stays, so the signal :math:`|\hat m|` falls,
    the noise :math:`\sqrt{\hat v}` stays roughly level, and the SNR, which is
    Adam's step per unit learning rate, falls with them. This function makes
    that visible, per parameter leaf and over all parameters:

    .. math::

        \text{signal} = |\hat m_t|, \qquad
        \text{noise} = \sqrt{\hat v_t}, \qquad
        \text{SNR} = \frac{|\hat m_t|}{\sqrt{\hat v_t} + \epsilon},
        \qquad \hat m_t = \frac{m_t}{1 - \beta_1^t}, \;
        \hat v_t = \frac{v_t}{1 - \beta_2^t}

    The moments are found by name, as the fields ``mu`` and ``nu`` of a
    NamedTuple (:class:`optax_snr.EmaMomentsState`, Optax's
    ``ScaleByAdamState`` and the variants' states), anywhere in the state:
    inside :func:`optax.chain`, :func:`optax.inject_hyperparams`,
    :class:`optax.MultiSteps`, :func:`optax.masked` (masked-out leaves are
    left out), or a Flax NNX ``Optimizer``'s ``opt_state``. The step ``t`` is
    the ``count`` beside them or in :class:`optax_snr.BiasCorrectionState`.
    Where the optimizer divides by another noise, that one is reported:
    AMSGrad's running maximum of :math:`\hat v_t` (a ``nu_max`` field) and
    AdaBelief's centered noise (its ``nu``). For AdEMAMix the signal is the
    fast EMA (``m1``) alone. A :func:`~optax_snr.scale_by_adopt` state, whose
    ``mu`` is already a ratio, is refused; ``optax_snr.adopt``'s state is
    Optax's ``ScaleByAdamState`` and cannot be told from Adam's.

    The state does not hold ``b1``, ``b2`` or ``eps``: pass the values the
    optimizer was built with. Left as ``None``, each is read from an
    :func:`optax.inject_hyperparams` state when it holds one, and is Adam's
    default (0.9, 0.999, 1e-8) otherwise. Before the first step (``t = 0``)
    the moments are zero and everything is reported as 0. For ``nesterov``
    (Nadam) the reported signal is still :math:`\hat m_t`, not the look-ahead.

    It is a pure function with no state of its own. Under ``jax.jit`` it costs
    a few passes over the moments plus, for the quantiles, a sort of at most
    32,768 entries per leaf and one for all leaves together: a set with more
    entries than that has its quantiles estimated from 32,768 of them drawn at
    random (with a fixed key, so the same state gives the same numbers); the
    mean, min and max are always exact. That is cheap enough to log every N
    steps, not necessarily every step.

    Args:
      state: an optimizer state holding Adam-like moments.
      b1: the signal EMA's decay the optimizer uses.
      b2: the noise EMA's decay the optimizer uses.
      eps: the constant added to the noise in the SNR.

    Returns:
      A :class:`SnrDiagnostics`: the ``count``, an ``overall``
      :class:`SnrSummary` and a ``per_leaf`` dict of them keyed by path
      (``"dense/kernel"``). Each :class:`Summary` holds the mean, min, 10%
      quantile, median, 90% quantile and max, computed in float32 (float64
      for float64 moments), with the quantiles sampled as said above.
      :func:`flatten_diagnostics` turns it into a flat dict of floats for
      logging.

    Raises:
      ValueError: if the state holds no moments, or more than one set of them.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax_snr
      >>> tx = optax_snr.adam(learning_rate=0.1, b1=0.5, b2=0.5)
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> _, state = tx.update({"w": jnp.array([0.5, -4.0])}, state)
      >>> diag = optax_snr.snr_diagnostics(state, b1=0.5, b2=0.5)
      >>> diag.per_leaf["w"].signal.max  # |m_hat| is |g| after one step
      Array(4., dtype=float32)
      >>> diag.overall.snr.median  # and the SNR is 1: a full step
      Array(1., dtype=float32)

    References:
      Kingma & Ba, `Adam: A Method for Stochastic Optimization
      <https://arxiv.org/abs/1412.6980>`_, 2014 (Section 2.1 reads the ratio as
      a signal-to-noise ratio and notes that it shrinks near an optimum).
    """
    for name, value, high in (("b1", b1, 1.0), ("b2", b2, 1.0), ("eps", eps, np.inf)):
        if value is not None:
            validation.check_hyperparameter(name, value, low=0.0, high=high)
    mu, nu, is_max, count = _find_moments(state)
    b1 = _hyperparameter(state, "b1", b1)
    b2 = _hyperparameter(state, "b2", b2)
    eps = _hyperparameter(state, "eps", eps)

    # Before the first step the moments are zero; t = 1 reports them as zero.
    t = jnp.maximum(count, jnp.ones_like(count))
    c1, c2 = correction(b1, t), correction(b2, t)

    mu_leaves = jax.tree_util.tree_leaves_with_path(mu)
    nu_leaves = jax.tree.leaves(nu)
    if len(mu_leaves) != len(nu_leaves):
        raise ValueError("snr_diagnostics: `mu` and `nu` have different tree structures.")
    signals, noises = [], []
    for (_, m), v in zip(mu_leaves, nu_leaves, strict=True):
        signals.append(jnp.abs(debias(m, c1)))
        v_hat = v.astype(compute_dtype(v.dtype)) if is_max else debias(v, c2)
        noises.append(jnp.sqrt(jnp.real(v_hat)))
    dtypes = [x.dtype for x in signals + noises]
    dtype = compute_dtype(promote(jnp.float32, *dtypes))
    signals = [x.astype(dtype) for x in signals]
    noises = [x.astype(dtype) for x in noises]
    ratios = [s / (n + jnp.asarray(eps, dtype)) for s, n in zip(signals, noises, strict=True)]

    per_leaf = {
        _leaf_name(path): _snr_summary([s], [n], [r], dtype)
        for (path, _), s, n, r in zip(mu_leaves, signals, noises, ratios, strict=True)
    }
    overall = _snr_summary(signals, noises, ratios, dtype)
    return SnrDiagnostics(count=count, overall=overall, per_leaf=per_leaf)


def flatten_diagnostics(diagnostics: SnrDiagnostics, *, per_leaf: bool = True) -> dict[str, float]:
    """Turns :class:`SnrDiagnostics` into a flat dict of Python floats, for logging.

    Keys are ``"<quantity>/<statistic>"`` for the overall summary (for example
    ``"snr/median"``) and ``"<leaf>/<quantity>/<statistic>"`` per leaf (for
    example ``"dense/kernel/signal/mean"``), plus ``"count"``. Call it outside
    ``jax.jit``: it moves the values to the host.

    Args:
      diagnostics: what :func:`snr_diagnostics` returned.
      per_leaf: whether to include the per-leaf summaries.

    Returns:
      A dict from names to floats, ready for a CSV row or a metrics logger.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax_snr
      >>> tx = optax_snr.adam(learning_rate=0.1, b1=0.5, b2=0.5)
      >>> state = tx.init({"w": jnp.zeros(3)})
      >>> _, state = tx.update({"w": jnp.ones(3)}, state)
      >>> diag = optax_snr.snr_diagnostics(state, b1=0.5, b2=0.5)
      >>> row = optax_snr.flatten_diagnostics(diag)
      >>> row["count"], row["snr/mean"], row["w/noise/max"]
      (1.0, 1.0, 1.0)
    """
    diagnostics = jax.device_get(diagnostics)
    row = {"count": float(diagnostics.count)}

    def add(prefix: str, summary: SnrSummary) -> None:
        for quantity, stats in summary._asdict().items():
            for statistic, value in stats._asdict().items():
                row[f"{prefix}{quantity}/{statistic}"] = float(value)

    add("", diagnostics.overall)
    if per_leaf:
        for leaf, summary in diagnostics.per_leaf.items():
            add(f"{leaf}/", summary)
    return row
