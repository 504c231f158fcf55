"""Signal and noise: exponential moving averages of the gradient and its square."""

from typing import Any, NamedTuple

import jax
import optax

from optax_snr.common import validation
from optax_snr.common.moments import Moments, squared_magnitude, tree_ema
from optax_snr.storage import base as storage

__all__ = ["EmaMomentsState", "ema_moments"]


class EmaMomentsState(NamedTuple):
    """State of :func:`ema_moments`: the two moment buffers."""

    mu: Any  # EMA of gradients; params' structure, in mu_dtype (a dtype or format) or params'.
    nu: Any  # EMA of |gradient|^2; params' structure, in nu_dtype or params'.


def ema_moments(
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    mu_dtype: jax.typing.DTypeLike | None = None,
    *,
    nu_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformation:
    r"""Tracks the signal and the noise: EMAs of the gradient and of its square.

    This is where the SNR reading of Adam starts. The first moment :math:`m_t`
    averages the gradients :math:`g_t`, so consistent directions add up and
    batch-to-batch fluctuations cancel: it is the *signal*. The second raw
    moment :math:`v_t` averages the squared gradients; its square root measures
    how large the gradients typically are, fluctuations included, and stands in
    for the *noise*.

    .. math::

        m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
        v_t = \beta_2 v_{t-1} + (1 - \beta_2) |g_t|^2

    The updates that come out are a :class:`Moments` (``mu``, ``nu``, ``grad``)
    for the next stage, :func:`optax_snr.bias_correction`. For complex
    gradients the noise uses :math:`|g|^2 = \bar g g`, as Optax does.

    Args:
      b1: decay of the signal EMA, in [0, 1). Larger means longer memory.
      b2: decay of the noise EMA, in [0, 1).
      mu_dtype: dtype of the ``mu`` buffer; ``None`` keeps each param's dtype.
        A storage format (:func:`optax_snr.quantized`,
        :func:`optax_snr.stochastic_rounding`) keeps it in less memory: the
        EMA is still computed in float32 from the decoded buffer, and only
        what is kept between steps is encoded.
      nu_dtype: dtype or storage format of the ``nu`` buffer (also
        :func:`optax_snr.factored`); ``None`` keeps each param's dtype.
        (Optax's ``scale_by_adam`` has no such option.)

    Returns:
      An :class:`optax.GradientTransformation` whose state is an
      :class:`EmaMomentsState`.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax_snr
      >>> stage = optax_snr.ema_moments(b1=0.5, b2=0.5)
      >>> state = stage.init(jnp.zeros(2))
      >>> moments, state = stage.update(jnp.array([2.0, -2.0]), state)
      >>> moments.mu, moments.nu
      (Array([ 1., -1.], dtype=float32), Array([2., 2.], dtype=float32))

    References:
      Kingma & Ba, `Adam: A Method for Stochastic Optimization
      <https://arxiv.org/abs/1412.6980>`_, 2014 (Algorithm 1, lines 7-8).
    """
    validation.check_hyperparameter("b1", b1, low=0.0, high=1.0)
    validation.check_hyperparameter("b2", b2, low=0.0, high=1.0)
    mu_dtype = storage.check_storage("mu_dtype", mu_dtype, signed=True)
    nu_dtype = storage.check_storage("nu_dtype", nu_dtype, signed=False)

    def init_fn(params):
        validation.check_float_leaves(params, "params", "ema_moments.init")
        mu = storage.init_moment(mu_dtype, params, signed=True, field="mu")  # First moment.
        nu = storage.init_moment(nu_dtype, params, signed=False, field="nu")  # Second raw moment.
        return EmaMomentsState(mu=mu, nu=nu)

    def update_fn(updates, state, params=None):
        del params
        updates = storage.checked_moment_updates(
            updates, state, mu_dtype, nu_dtype, stage="ema_moments.update"
        )
        mu = tree_ema(updates, storage.decode_moment(state.mu, updates), b1)
        nu = tree_ema(
            jax.tree.map(squared_magnitude, updates), storage.decode_moment(state.nu, updates), b2
        )
        # The next stages read the moments at full precision; the state keeps
        # its own dtypes (or formats), so its types never change from step to step.
        new_state = EmaMomentsState(
            mu=storage.encode_moment(mu, state.mu), nu=storage.encode_moment(nu, state.nu)
        )
        return Moments(mu=mu, nu=nu, grad=updates), new_state

    return optax.GradientTransformation(init_fn, update_fn)
