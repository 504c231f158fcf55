"""The gradient noise scale, read from Adam's own moments.

McCandlish et al.'s simple noise scale ``B_simple = tr(Sigma) / |G|^2`` (the
per-example gradient variance summed over parameters, over the squared true
gradient) predicts the critical batch size: the largest batch that still cuts
the number of steps about in proportion. Adam's state already tracks both
parts, so :func:`noise_scale` reads it from there with no extra gradients.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from optax_snr.common.dtypes import compute_dtype, promote
from optax_snr.common.moments import correction, debias
from optax_snr.readers import lookup

__all__ = ["NoiseScale", "NoiseScaleLeaf", "noise_scale"]

# Holders whose ``nu`` is not the EMA of |g|^2: AdaBelief's is centered.
_CENTERED = dict.fromkeys(
    ("ScaleByBeliefState", "CenteredMomentsState"),
    "AdaBelief's `nu` is the EMA of (g - m)^2, a centered noise, not the EMA of "
    "g^2 that the estimator reads.",
)


class NoiseScaleLeaf(NamedTuple):
    """The noise scale of one set of parameters (a leaf, or all of them)."""

    b_simple: jax.Array  # shape=(); tr(Sigma) / |G|^2, in examples; inf if |G|^2 <= 0.
    trace_sigma: jax.Array  # shape=(); tr(Sigma): one example's gradient variance, summed.
    grad_sq_norm: jax.Array  # shape=(); |G|^2: the true gradient's squared norm (>= 0).


class NoiseScale(NamedTuple):
    """What :func:`noise_scale` returns: the estimate overall and per leaf."""

    count: jax.Array  # shape=(), int32; the step t of the state read.
    b_simple: jax.Array  # shape=(); the simple noise scale over all parameters.
    trace_sigma: jax.Array  # shape=(); tr(Sigma) over all parameters.
    grad_sq_norm: jax.Array  # shape=(); |G|^2 over all parameters.
    per_leaf: dict[str, NoiseScaleLeaf]  # Keyed by the leaf's path, e.g. "dense/kernel".


def _check_batch_size(batch_size: Any) -> None:
    if isinstance(batch_size, jax.core.Tracer):
        if not jnp.issubdtype(batch_size.dtype, jnp.integer) or batch_size.shape != ():
            raise TypeError(
                f"batch_size must be a positive integer, got a traced {batch_size.dtype}"
                f"{list(batch_size.shape)}."
            )
        return
    is_int = isinstance(batch_size, (int, np.integer)) or (
        isinstance(batch_size, (np.ndarray, jax.Array))
        and batch_size.shape == ()
        and jnp.issubdtype(batch_size.dtype, jnp.integer)
    )
    if isinstance(batch_size, bool) or not is_int:
        raise TypeError(
            f"batch_size must be a positive integer (examples per gradient), got "
            f"{type(batch_size).__name__} {batch_size!r}."
        )
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be a positive integer, got {int(batch_size)}.")


def _finish(
    trace_batch: jax.Array, grad_sq: jax.Array, batch_size: jax.Array, valid: jax.Array
) -> NoiseScaleLeaf:
    """From the batch noise ``tr(Sigma)/B`` and ``|G|^2`` estimates to the reported numbers."""
    nan = jnp.full_like(grad_sq, jnp.nan)
    trace_sigma = jnp.maximum(trace_batch, jnp.zeros_like(trace_batch)) * batch_size
    positive = grad_sq > 0
    b_simple = jnp.where(
        positive,
        trace_sigma / jnp.where(positive, grad_sq, jnp.ones_like(grad_sq)),
        jnp.full_like(grad_sq, jnp.inf),
    )
    grad_sq = jnp.maximum(grad_sq, jnp.zeros_like(grad_sq))
    return NoiseScaleLeaf(
        b_simple=jnp.where(valid, b_simple, nan),
        trace_sigma=jnp.where(valid, trace_sigma, nan),
        grad_sq_norm=jnp.where(valid, grad_sq, nan),
    )


def noise_scale(
    state: Any,
    batch_size: int,
    *,
    b1: jax.typing.ArrayLike | None = None,
    b2: jax.typing.ArrayLike | None = None,
) -> NoiseScale:
    r"""Estimates the gradient noise scale ``B_simple`` from an Adam-like state.

    The simple noise scale of McCandlish et al. (2018),

    .. math::

        B_\text{simple} = \frac{\operatorname{tr} \Sigma}{|G|^2},

    is the per-example gradient variance summed over all parameters
    (:math:`\Sigma` is the covariance of one example's gradient) over the
    squared norm of the true gradient :math:`G`. Batches much smaller than
    :math:`B_\text{simple}` are noise-dominated: doubling them about halves the
    steps needed. Batches much larger mostly repeat what one step already
    knows. It is the batch size at which the noise of a mini-batch gradient,
    :math:`\operatorname{tr}\Sigma / B`, equals the signal :math:`|G|^2`.

    **The estimator.** A mini-batch gradient of ``batch_size`` examples is
    :math:`g_t = G + \xi_t` per coordinate, with :math:`\xi_t` of mean 0 and
    variance :math:`\sigma^2 / B`. Adam's bias-corrected EMAs then have
    expectations

    .. math::

        \mathbb E[\hat v_t] = G^2 + \frac{\sigma^2}{B}, \qquad
        \mathbb E[\hat m_t^2] = G^2 + k_t \frac{\sigma^2}{B}, \qquad
        k_t = \frac{1 - \beta_1}{1 + \beta_1} \cdot \frac{1 + \beta_1^t}{1 - \beta_1^t},

    because :math:`\hat m_t` averages the last :math:`\approx (1+\beta_1)/(1-\beta_1)`
    gradients and keeps the fraction :math:`k_t` of their variance (:math:`k_1 = 1`:
    after one step :math:`\hat m = g`; :math:`k_\infty = (1-\beta_1)/(1+\beta_1)`,
    0.053 for :math:`\beta_1 = 0.9`). So :math:`\hat v - \hat m^2` holds the
    fraction :math:`1 - k_t` of the mini-batch variance, and :math:`\hat m^2`
    holds :math:`G^2` plus the fraction :math:`k_t` of it. Summed over all
    coordinates:

    .. math::

        \frac{\operatorname{tr}\Sigma}{B} \approx
            \frac{\sum (\hat v - \hat m^2)}{1 - k_t}, \qquad
        |G|^2 \approx \sum \hat m^2 - k_t \frac{\operatorname{tr}\Sigma}{B}, \qquad
        B_\text{simple} \approx B \cdot
            \frac{\sum (\hat v - \hat m^2) / (1 - k_t)}
                 {\sum \hat m^2 - k_t \sum (\hat v - \hat m^2) / (1 - k_t)}.

    Both sums are unbiased under the assumptions below; their ratio is not
    exactly, but with many parameters the sums' fluctuations average out. The
    bias correction (dividing by :math:`1 - \beta^t`) removes the EMAs' zero
    start, and :math:`k_t` removes the noise that the short signal EMA keeps:
    without it :math:`\sum \hat m^2` alone would overstate :math:`|G|^2` by
    :math:`k_t \operatorname{tr}\Sigma / B`, which dominates whenever the noise
    scale exceeds :math:`B / k_t` (about :math:`19 B` at :math:`\beta_1 = 0.9`).

    **Assumptions.** The gradients are unbiased mini-batch means of
    ``batch_size`` independent examples (with data parallelism, ``batch_size``
    is the global batch that one optimizer step averages; with
    :class:`optax.MultiSteps`, the micro-batch times the number of
    accumulation steps); the noise is uncorrelated from step to step; and
    :math:`G` and :math:`\Sigma` change little over the noise EMA's memory,
    about :math:`1/(1 - \beta_2)` steps (1,000 at the default 0.999). Adam's
    preconditioning does not enter: the estimate is of the raw gradients'
    noise scale, as McCandlish's :math:`B_\text{simple}` is.

    **When the gradient itself moves.** :math:`\hat m` averages the gradients
    of the last :math:`\approx (1+\beta_1)/(1-\beta_1)` steps (19 at 0.9),
    so the estimator takes for :math:`G` the part of the gradient that persists
    over that window. Where the optimizer's own steps make the true gradient
    change direction within it (a learning rate high for the curvature, where
    iterates bounce across a valley), that change is counted as noise:
    :math:`|G|^2` comes out too small and :math:`B_\text{simple}` too large,
    up to ``inf``. On the digits MLP of ``python -m optax_snr.demo``
    (``benchmarks/noise_scale.py``) the state's figure agrees with per-example
    gradients at learning rate 1e-4 but reads ``inf`` after a few hundred steps
    at 1e-3. Compare it with a two-batch estimate before relying on it.

    **Lag.** Where training moves :math:`G` faster than that, :math:`\hat v`
    still remembers the larger gradients of up to a few thousand steps ago
    while :math:`\hat m` follows within about 10 steps, so early in training,
    while the gradient shrinks fast, the noise is overstated and the estimate
    is too large; it lags the truth by about :math:`1/(1 - \beta_2)` steps.
    Read it once the loss moves slowly on that scale, or use a smaller ``b2``.

    **Special values.** Where the :math:`|G|^2` estimate is not positive, the
    noise dominates the signal so completely that the true gradient cannot be
    told from zero with this state: ``b_simple`` is ``inf`` (read: noise
    dominates; by this state, larger batches would still help, but see the
    caveat above on a moving gradient) and ``grad_sq_norm`` is 0; a negative
    estimate is never returned. Likewise a negative noise estimate (possible when ``b2`` is much
    shorter than ``b1``) gives ``trace_sigma = 0`` and ``b_simple = 0``. Before
    the second step (``count < 2``, or ``b1 = 0``, where :math:`\hat m^2` and
    :math:`\hat v` carry the same sample) every figure is NaN: nothing can
    be estimated yet.

    The moments are found as :func:`~optax_snr.snr_diagnostics` finds them
    (chains, :func:`optax.inject_hyperparams`, :class:`optax.MultiSteps`,
    :func:`optax.masked`, Flax NNX and Linen states, sharded arrays), and
    ``b1`` and ``b2`` default in the same way. AdaBelief's centered noise and
    ADOPT's ratio are refused (AMSGrad's state is read through its ``nu``, the
    EMA, not its running maximum). Under Flax NNX's functional states (plain
    mappings) the optimizer's type is no longer visible, so there the caller
    must make sure the state is an Adam-like one.

    Args:
      state: an optimizer state holding Adam-like moments.
      batch_size: the examples per gradient, a positive integer.
      b1: the signal EMA's decay the optimizer uses.
      b2: the noise EMA's decay the optimizer uses.

    Returns:
      A :class:`NoiseScale`: the ``count``, ``b_simple``, ``trace_sigma`` and
      ``grad_sq_norm`` over all parameters, and a ``per_leaf`` dict of
      :class:`NoiseScaleLeaf` with the same figures per leaf. The overall
      figures are formed from the per-leaf sums, so ``trace_sigma`` is the
      per-leaf ones' sum, and so is ``grad_sq_norm`` while every leaf's is
      positive. Computed in float32 (float64 for float64 moments).

    Raises:
      TypeError: if ``batch_size`` is not an integer, or a hyperparameter is
        not a real scalar.
      ValueError: if ``batch_size < 1``; if ``b1`` is outside (0, 1) or ``b2``
        outside [0, 1); if the state holds no moments, more than one set of
        them, or moments that mean something else (AdaBelief, ADOPT).

    Example:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import optax_snr
      >>> tx = optax_snr.adam(1e-3)
      >>> G = jnp.full(1000, 0.1)  # |G|^2 = 10; per-example variance 1: tr(Sigma) = 1000
      >>> state = tx.init(G)
      >>> def step(state, key):  # g: the mean gradient of a batch of 10
      ...     g = G + jax.random.normal(key, G.shape) / jnp.sqrt(jnp.float32(10.0))
      ...     return tx.update(g, state)[1], None
      >>> keys = jax.random.split(jax.random.PRNGKey(0), 2000)
      >>> state, _ = jax.lax.scan(step, state, keys)
      >>> est = optax_snr.noise_scale(state, batch_size=10)
      >>> print(round(float(est.b_simple), -1))  # the truth is 1000 / 10 = 100
      100.0

    References:
      McCandlish, Kaplan, Amodei et al., `An Empirical Model of Large-Batch
      Training <https://arxiv.org/abs/1812.06162>`_, 2018 (Section 2.2 and
      Appendix A); Balles & Hennig, `Dissecting Adam
      <https://arxiv.org/abs/1705.07774>`_, 2018 (``v - m^2`` as a variance).
    """
    _check_batch_size(batch_size)
    lookup.check_hyperparameters(b1=b1, b2=b2)
    if b1 is not None and not isinstance(b1, jax.core.Tracer) and float(b1) == 0.0:
        raise ValueError(
            "noise_scale: b1 must be in (0, 1); with b1 = 0 the signal is the last "
            "gradient itself and holds no average to compare the noise with."
        )
    return _noise_scale(state, batch_size, b1, b2)


@jax.jit
def _noise_scale(state: Any, batch_size: Any, b1: Any, b2: Any) -> NoiseScale:
    """The computation, compiled as one program even when called eagerly."""
    found = lookup.read_moments(state, b1=b1, b2=b2, caller="noise_scale", refuse=_CENTERED)
    dtypes = [x.dtype for x in found.mu + found.nu]
    dtype = compute_dtype(promote(jnp.float32, *dtypes)) if dtypes else jnp.dtype(jnp.float32)
    count = found.count
    t = jnp.maximum(count, jnp.ones_like(count))
    c1, c2 = correction(found.b1, t), correction(found.b2, t)
    b = jnp.asarray(found.b1, dtype)
    one = jnp.ones((), dtype)
    power = jax.lax.pow(b, t.astype(dtype))
    k = (one - b) * (one + power) / ((one + b) * (one - power))
    valid = (count >= 2) & (b > 0)
    keep = jnp.where(valid, one - k, one)  # 1 - k, or 1 where it is 0 (masked later).
    k = jnp.where(valid, k, jnp.zeros_like(k))
    batch = jnp.asarray(batch_size, dtype)

    per_leaf, traces, grads = {}, [], []
    for name, m, v in zip(found.names, found.mu, found.nu, strict=True):
        m_hat = debias(m, c1).astype(promote(dtype, m.dtype))
        square = jnp.real(m_hat * jnp.conj(m_hat)).astype(dtype)
        v_hat = jnp.real(debias(v, c2)).astype(dtype)
        trace_batch = jnp.sum(v_hat - square) / keep  # tr(Sigma) / B
        grad_sq = jnp.sum(square) - k * trace_batch  # |G|^2
        traces.append(trace_batch)
        grads.append(grad_sq)
        per_leaf[name] = _finish(trace_batch, grad_sq, batch, valid)
    zero = jnp.zeros((), dtype)
    overall = _finish(
        sum(traces, start=zero) if traces else zero,
        sum(grads, start=zero) if grads else zero,
        batch,
        valid,
    )
    return NoiseScale(count=count, per_leaf=per_leaf, **overall._asdict())
