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

from optax_snr.common.dtypes import compute_dtype, promote
from optax_snr.common.moments import correction, debias
from optax_snr.readers import lookup

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


def _is_sharded(x: jax.Array) -> bool:
    """Whether ``x`` has a sharded type (a mesh with Explicit axes shards it)."""
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
    return spec is not None and any(axis is not None for axis in spec)


def _gather(x: jax.Array, position: jax.Array) -> jax.Array:
    """``x.ravel()[position]``, replicated even where ``x`` is sharded."""
    if not _is_sharded(x):
        return jnp.take(jnp.ravel(x), position)
    index = jnp.unravel_index(position, x.shape)
    return x.at[index].get(out_sharding=jax.sharding.PartitionSpec())


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
        sample = jnp.where(leaf == i, _gather(x, position), sample)
    return sample


def _all_entries(xs: list[jax.Array]) -> jax.Array:
    """Every entry of ``xs`` in one replicated vector (the set is small).

    Sorting needs the sorted dimension unsharded, so a leaf sharded over a mesh
    with Explicit axes is resharded to replicated first: an all-gather of at
    most ``_SAMPLE`` entries.
    """
    replicated = jax.sharding.PartitionSpec()
    return jnp.concatenate(
        [jnp.ravel(jax.sharding.reshard(x, replicated) if _is_sharded(x) else x) for x in xs]
    )


def _summary(xs: list[jax.Array], dtype: jnp.dtype) -> Summary:
    """Mean, min, max and quantiles over all entries of ``xs`` (NaN if there are none)."""
    xs = [x for x in xs if x.size]
    total = sum(x.size for x in xs)
    if total == 0:
        nan = jnp.full((), jnp.nan, dtype)
        return Summary(nan, nan, nan, nan, nan, nan)
    # Reductions work on sharded arrays as they are; only the sample is gathered.
    mean = functools.reduce(jnp.add, [jnp.sum(x) for x in xs]) / jnp.asarray(total, dtype)
    low = functools.reduce(jnp.minimum, [jnp.min(x) for x in xs])
    high = functools.reduce(jnp.maximum, [jnp.max(x) for x in xs])
    sample = _all_entries(xs) if total <= _SAMPLE else _sample(xs, total)
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
    NamedTuple (Optax's ``ScaleByAdamState`` and its variants' states,
    :class:`optax_snr.EmaMomentsState`), anywhere in the state: inside
    :func:`optax.chain`, :func:`optax.inject_hyperparams`,
    :class:`optax.MultiSteps`, :func:`optax.masked` (masked-out leaves are
    left out), a Linen ``TrainState`` or a Flax NNX ``Optimizer``'s
    ``opt_state``; and in Flax NNX functional states (``nnx.state(optimizer)``,
    ``nnx.split(optimizer)[1]``), where the NamedTuples have become mappings
    with the same keys. The step ``t`` is the ``count`` beside them or, in a
    chain of optax_snr stages, in :class:`optax_snr.BiasCorrectionState`.
    Where the optimizer divides by another noise, that one is reported:
    AMSGrad's running maximum of :math:`\hat v_t` (a ``nu_max`` field) and
    AdaBelief's centered noise (its ``nu``). For AdEMAMix the signal is the
    fast EMA (``mu``, or ``m1`` in Optax's state) alone. A
    :func:`~optax_snr.scale_by_adopt` state, whose ``mu`` is already a ratio, is
    refused; ``optax_snr.adopt``'s state is Optax's ``ScaleByAdamState``, as
    ``optax.contrib.adopt``'s is, and cannot be told from Adam's.

    Each leaf is named by its path, ``"dense/kernel"``; where two paths would
    give the same name (``{"a/b": x, "a": {"b": y}}``) both are named by
    :func:`jax.tree_util.keystr` instead (``"['a/b']"``, ``"['a']['b']"``), so
    every leaf keeps its own entry.

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

    Sharded states work as they are, eagerly and under ``jax.jit``, also on a
    mesh with Explicit axes (``jax.make_mesh(..., axis_types=(Explicit,))``):
    means, minima and maxima reduce the sharded arrays in place, and only the
    entries that the quantiles sort (at most 32,768 per set) are gathered to
    every device, as a replicated array, first (a sort needs its dimension
    unsharded). No leaf is ever gathered whole unless it is that small.

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
      ValueError: if the state holds no moments or more than one set of them,
        or if ``b1``/``b2`` is outside [0, 1) or ``eps`` is negative.

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
    lookup.check_hyperparameters(b1=b1, b2=b2, eps=eps)
    return _snr_diagnostics(state, b1, b2, eps)


@jax.jit
def _snr_diagnostics(state: Any, b1: Any, b2: Any, eps: Any) -> SnrDiagnostics:
    """The computation, compiled as one program even when called eagerly.

    Eagerly, each of its few hundred small operations would be a program of
    its own, which costs more than compiling once, and on a sharded state each
    would run collectives of its own.
    """
    found = lookup.read_moments(state, b1=b1, b2=b2, eps=eps, caller="snr_diagnostics")
    count = found.count

    # Before the first step the moments are zero; t = 1 reports them as zero.
    t = jnp.maximum(count, jnp.ones_like(count))
    c1, c2 = correction(found.b1, t), correction(found.b2, t)

    signals, noises = [], []
    for i, m in enumerate(found.mu):
        signals.append(jnp.abs(debias(m, c1)))
        if found.nu_max is not None:  # AMSGrad divides by the running max of v_hat.
            v_hat = found.nu_max[i].astype(compute_dtype(found.nu_max[i].dtype))
        else:
            v_hat = debias(found.nu[i], c2)
        noises.append(jnp.sqrt(jnp.real(v_hat)))
    dtypes = [x.dtype for x in signals + noises]
    dtype = compute_dtype(promote(jnp.float32, *dtypes))
    signals = [x.astype(dtype) for x in signals]
    noises = [x.astype(dtype) for x in noises]
    eps = jnp.asarray(found.eps, dtype)
    ratios = [s / (n + eps) for s, n in zip(signals, noises, strict=True)]

    per_leaf = {
        name: _snr_summary([s], [n], [r], dtype)
        for name, s, n, r in zip(found.names, signals, noises, ratios, strict=True)
    }
    overall = _snr_summary(signals, noises, ratios, dtype)
    return SnrDiagnostics(count=count, overall=overall, per_leaf=per_leaf)


def flatten_diagnostics(
    diagnostics: SnrDiagnostics | None,
    noise_scale: Any = None,
    *,
    per_leaf: bool = False,
) -> dict[str, float]:
    """Turns :class:`SnrDiagnostics` (and a noise scale) into a flat dict of floats.

    The default row is compact, overall figures only: ``"count"`` and
    ``"<quantity>/<statistic>"`` for the signal, noise and SNR (``"snr/median"``;
    19 values), plus ``"noise_scale/b_simple"``, ``"noise_scale/trace_sigma"``
    and ``"noise_scale/grad_sq_norm"`` when a :class:`~optax_snr.NoiseScale`
    is given. With ``per_leaf=True`` it adds ``"<leaf>/<quantity>/<statistic>"``
    for every leaf (``"dense/kernel/signal/mean"``) and
    ``"<leaf>/noise_scale/b_simple"`` and the like: 18 or 21 more values per
    leaf, thousands for a large model. Call it outside ``jax.jit``: it moves
    the values to the host. :func:`~optax_snr.plot_diagnostics` draws a list
    of such rows.

    Args:
      diagnostics: what :func:`snr_diagnostics` returned, or None to log only
        the noise scale.
      noise_scale: what :func:`~optax_snr.noise_scale` returned, or None.
      per_leaf: whether to add the per-leaf figures.

    Returns:
      A dict from names to floats, ready for a CSV row or a metrics logger.

    Raises:
      ValueError: if both ``diagnostics`` and ``noise_scale`` are None.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax_snr
      >>> tx = optax_snr.adam(learning_rate=0.1, b1=0.5, b2=0.5)
      >>> state = tx.init({"w": jnp.zeros(3)})
      >>> _, state = tx.update({"w": jnp.ones(3)}, state)
      >>> diag = optax_snr.snr_diagnostics(state, b1=0.5, b2=0.5)
      >>> row = optax_snr.flatten_diagnostics(diag)
      >>> row["count"], row["snr/mean"], len(row)
      (1.0, 1.0, 19)
      >>> optax_snr.flatten_diagnostics(diag, per_leaf=True)["w/noise/max"]
      1.0
    """
    if diagnostics is None and noise_scale is None:
        raise ValueError("flatten_diagnostics: pass diagnostics, a noise scale, or both.")
    diagnostics, noise_scale = jax.device_get((diagnostics, noise_scale))
    count = diagnostics.count if diagnostics is not None else noise_scale.count
    row = {"count": float(count)}

    def add(prefix: str, summary: SnrSummary) -> None:
        for quantity, stats in summary._asdict().items():
            for statistic, value in stats._asdict().items():
                row[f"{prefix}{quantity}/{statistic}"] = float(value)

    def add_noise_scale(prefix: str, figures: Any) -> None:
        for name in ("b_simple", "trace_sigma", "grad_sq_norm"):
            row[f"{prefix}noise_scale/{name}"] = float(getattr(figures, name))

    if diagnostics is not None:
        add("", diagnostics.overall)
    if noise_scale is not None:
        add_noise_scale("", noise_scale)
    if per_leaf:
        leaves = diagnostics.per_leaf if diagnostics is not None else noise_scale.per_leaf
        for leaf in leaves:
            if diagnostics is not None:
                add(f"{leaf}/", diagnostics.per_leaf[leaf])
            if noise_scale is not None:
                add_noise_scale(f"{leaf}/", noise_scale.per_leaf[leaf])
    return row
