"""Bias: undo the EMAs' pull towards their zero initialization."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_snr.common import validation
from optax_snr.common.dtypes import promote
from optax_snr.common.moments import Moments, correction, debias, require_moments

__all__ = ["BiasCorrectionState", "bias_correction"]


class BiasCorrectionState(NamedTuple):
    """State of :func:`bias_correction`: the one step counter of the chain."""

    count: jax.Array  # shape=(), dtype=jnp.int32.


def bias_correction(
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    *,
    nesterov: bool = False,
) -> optax.GradientTransformation:
    r"""Corrects the moments' bias towards zero and counts the steps.

    Both EMAs start at zero, so for the first few steps they underestimate the
    signal and the noise: after :math:`t` steps of a constant gradient :math:`g`
    the signal is :math:`(1 - \beta_1^t) g`, not :math:`g`. Dividing by that
    factor removes the bias; the correction matters only while :math:`t` is
    small and tends to 1 as training goes on.

    .. math::

        \hat m_t = \frac{m_t}{1 - \beta_1^t}, \qquad
        \hat v_t = \frac{v_t}{1 - \beta_2^t}

    With ``nesterov=True`` the signal looks one step ahead (Nadam, Dozat 2016):
    :math:`\hat m_t = \beta_1 \frac{m_t}{1 - \beta_1^{t+1}} +
    (1 - \beta_1) \frac{g_t}{1 - \beta_1^t}`.

    This stage owns the chain's step ``count`` (int32, saturating at its
    maximum instead of wrapping), so ``optax.tree.get(state, "count")`` works.

    Args:
      b1: the signal EMA's decay, the same value given to ``ema_moments``.
      b2: the noise EMA's decay, the same value given to ``ema_moments``.
      nesterov: whether to use the look-ahead (Nesterov) signal.

    Returns:
      An :class:`optax.GradientTransformation` taking and returning
      :class:`Moments`, whose state is a :class:`BiasCorrectionState`.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax_snr
      >>> stage = optax_snr.bias_correction(b1=0.5, b2=0.5)
      >>> state = stage.init(jnp.zeros(1))
      >>> m = optax_snr.Moments(jnp.ones(1), jnp.ones(1), jnp.ones(1))
      >>> corrected, state = stage.update(m, state)
      >>> corrected.mu, state.count
      (Array([2.], dtype=float32), Array(1, dtype=int32))

    References:
      Kingma & Ba, `Adam: A Method for Stochastic Optimization
      <https://arxiv.org/abs/1412.6980>`_, 2014 (Algorithm 1, lines 9-10;
      Section 3).
    """
    validation.check_hyperparameter("b1", b1, low=0.0, high=1.0)
    validation.check_hyperparameter("b2", b2, low=0.0, high=1.0)
    nesterov = validation.check_bool("nesterov", nesterov)

    def init_fn(params):
        del params
        return BiasCorrectionState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        del params
        moments = require_moments(updates, "bias_correction")
        count = optax.safe_increment(state.count)
        is_none = lambda x: x is None

        c1 = correction(b1, count)
        c2 = correction(b2, count)

        if nesterov:
            c1_next = correction(b1, optax.safe_increment(count))

            def signal(m, g):
                if g is None:
                    return None
                ahead = debias(m, c1_next)
                ahead = jnp.asarray(b1, ahead.dtype) * ahead
                now = debias(g, c1)
                now = jnp.asarray(1 - b1, now.dtype) * now
                dtype = promote(ahead.dtype, now.dtype)
                return ahead.astype(dtype) + now.astype(dtype)

            mu_hat = jax.tree.map(signal, moments.mu, moments.grad, is_leaf=is_none)
        else:
            mu_hat = jax.tree.map(
                lambda m: None if m is None else debias(m, c1), moments.mu, is_leaf=is_none
            )
        nu_hat = jax.tree.map(
            lambda v: None if v is None else debias(v, c2), moments.nu, is_leaf=is_none
        )
        corrected = Moments(mu=mu_hat, nu=nu_hat, grad=moments.grad)
        return corrected, BiasCorrectionState(count=count)

    return optax.GradientTransformation(init_fn, update_fn)
