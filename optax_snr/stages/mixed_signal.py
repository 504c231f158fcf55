"""Signal with a long memory: AdEMAMix's slow EMA mixed into the bias-corrected signal."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_snr.common import validation
from optax_snr.common.dtypes import promote
from optax_snr.common.moments import require_moments, tree_ema
from optax_snr.stages.bias_correction import BiasCorrectionState, bias_correction
from optax_snr.storage import base as storage

__all__ = ["MixedSignalState", "mixed_signal"]


class MixedSignalState(NamedTuple):
    """State of :func:`mixed_signal`: the chain's step counter and the slow EMA."""

    count: jax.Array  # shape=(), dtype=jnp.int32.
    m2: Any  # Slow EMA of gradients, never bias-corrected; params' structure, mu_dtype or params'.


def mixed_signal(
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    b3: optax.ScalarOrSchedule = 0.9999,
    alpha: optax.ScalarOrSchedule = 5.0,
    mu_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformation:
    r"""Corrects the moments' bias, then adds a slow EMA of the gradient to the signal (AdEMAMix).

    One EMA of the gradient cannot both react fast and remember far back:
    with :math:`\beta_1 = 0.9` a gradient's weight halves in 7 steps.
    AdEMAMix keeps a second, slow EMA (:math:`\beta_3 = 0.9999`, a half-life
    of about 7,000 steps) and adds it, weighted by :math:`\alpha`, to the fast
    signal:

    .. math::

        m^{(2)}_t = \beta_3 m^{(2)}_{t-1} + (1 - \beta_3) g_t, \qquad
        \hat m_t \leftarrow \frac{m_t}{1 - \beta_1^t} + \alpha \, m^{(2)}_t, \qquad
        \hat v_t = \frac{v_t}{1 - \beta_2^t}

    The slow EMA is not bias-corrected, on purpose: it fills in slowly, which
    acts as a warm-up of its weight. ``b3`` and ``alpha`` may be schedules of
    the step (0 at the first step), as in :func:`optax.contrib.ademamix`,
    whose paper warms both up.

    The schedules need the step count, and a chain has one count, so this
    stage takes the place of :func:`~optax_snr.bias_correction` (it runs one
    inside and owns the ``count``) rather than following it. Chain it after
    :func:`~optax_snr.ema_moments`, whose ``mu`` is AdEMAMix's fast EMA
    (Optax names it ``m1``); it takes and returns
    :class:`~optax_snr.Moments`.

    Args:
      b1: decay of the fast signal EMA, the value given to ``ema_moments``.
      b2: decay of the noise EMA, the value given to ``ema_moments``.
      b3: decay of the slow EMA, in [0, 1), or a schedule.
      alpha: weight of the slow EMA in the signal, ``>= 0``, or a schedule.
      mu_dtype: dtype or storage format (:func:`optax_snr.quantized`, ...) of
        the ``m2`` buffer; ``None`` keeps params'.

    Returns:
      An :class:`optax.GradientTransformation` taking and returning
      :class:`~optax_snr.Moments`, whose state is a :class:`MixedSignalState`.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax_snr
      >>> stage = optax_snr.mixed_signal(b1=0.5, b2=0.5, b3=0.75, alpha=2.0)
      >>> m = optax_snr.Moments(jnp.ones(1), jnp.ones(1), jnp.ones(1))
      >>> mixed, state = stage.update(m, stage.init(jnp.zeros(1)))
      >>> mixed.mu, state.m2  # 1 / (1 - 0.5) + 2 * (1 - 0.75) * 1
      (Array([2.5], dtype=float32), Array([0.25], dtype=float32))

    References:
      Pagliardini, Ablin & Grangier, `The AdEMAMix Optimizer: Better, Faster,
      Older <https://arxiv.org/abs/2409.03137>`_, ICLR 2025 (Algorithm 1).
    """
    correct = bias_correction(b1, b2)
    validation.check_scalar_or_schedule("b3", b3, low=0.0, high=1.0)
    validation.check_scalar_or_schedule("alpha", alpha, low=0.0)
    mu_dtype = storage.check_storage("mu_dtype", mu_dtype, signed=True)

    def init_fn(params):
        count = correct.init(params).count
        m2 = storage.init_moment(mu_dtype, params, signed=True, field="m2")
        return MixedSignalState(count=count, m2=m2)

    def update_fn(updates, state, params=None):
        del params
        moments = require_moments(updates, "mixed_signal")
        b3_t = b3(state.count) if callable(b3) else b3
        alpha_t = alpha(state.count) if callable(alpha) else alpha
        corrected, counted = correct.update(moments, BiasCorrectionState(count=state.count))
        is_none = lambda x: x is None
        storage.check_moment_state(
            state.m2, mu_dtype, moments.grad, stage="mixed_signal.update", field="m2"
        )
        m2 = tree_ema(moments.grad, storage.decode_moment(state.m2, moments.grad), b3_t)

        def mix(fast, slow):  # m1_hat + alpha * m2
            if fast is None:
                return None
            dtype = promote(fast.dtype, slow.dtype)
            slow = jnp.asarray(alpha_t, slow.dtype) * slow
            return fast.astype(dtype) + slow.astype(dtype)

        mu = jax.tree.map(mix, corrected.mu, m2, is_leaf=is_none)
        new_state = MixedSignalState(count=counted.count, m2=storage.encode_moment(m2, state.m2))
        return corrected._replace(mu=mu), new_state

    return optax.GradientTransformation(init_fn, update_fn)
