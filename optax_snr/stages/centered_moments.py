"""Signal and centered noise: EMAs of the gradient and of its squared deviation (AdaBelief)."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_snr.common import validation
from optax_snr.common.dtypes import promote
from optax_snr.common.moments import Moments, ema, squared_magnitude, tree_ema
from optax_snr.storage import base as storage

__all__ = ["CenteredMomentsState", "centered_moments"]


class CenteredMomentsState(NamedTuple):
    """State of :func:`centered_moments`: the two moment buffers."""

    mu: Any  # EMA of gradients (signal); params' structure, in mu_dtype or params' dtype.
    nu: Any  # EMA of |g - mu|^2, plus eps_root each step (centered noise); in nu_dtype or params'.


def centered_moments(
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps_root: jax.typing.ArrayLike = 1e-16,
    mu_dtype: jax.typing.DTypeLike | None = None,
    *,
    nu_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformation:
    r"""Tracks the signal and a centered noise: the EMA of the squared deviation (AdaBelief).

    Adam's noise, the EMA of :math:`g^2`, contains the signal itself:
    :math:`E[g^2] = E[g]^2 + \mathrm{Var}[g]`, so a large, steady gradient
    looks "noisy" and its step is shrunk. This stage replaces it by the EMA of
    the squared deviation of the gradient from the signal, the quantity the
    SNR reading means by noise:

    .. math::

        m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
        s_t = \beta_2 s_{t-1} + (1 - \beta_2) |g_t - m_t|^2 + \epsilon_{root}

    What :math:`s_t` estimates: not the variance of :math:`g`, and not an
    unbiased estimate of anything. The deviation is taken from :math:`m_t`,
    which already contains :math:`g_t`, so :math:`g_t - m_t = \beta_1 (g_t -
    m_{t-1})`: :math:`s_t` is :math:`\beta_1^2` times the EMA of the squared
    error of the previous step's prediction :math:`m_{t-1}` (AdaBelief's
    "belief" in the gradient). For i.i.d. gradients with variance
    :math:`\sigma^2`, once the EMAs have settled,
    :math:`E[(g_t - m_t)^2] = 2 \beta_1^2 \sigma^2 / (1 + \beta_1)`, about
    :math:`0.85\,\sigma^2` at :math:`\beta_1 = 0.9`; when the mean drifts the
    lag of :math:`m` adds to it. ``eps_root`` is added to the *state* every
    step (as in :func:`optax.scale_by_belief`), so after bias correction the
    noise has a floor of :math:`\epsilon_{root} / (1 - \beta_2)`.

    Chain it where :func:`~optax_snr.ema_moments` would go; the updates that
    come out are :class:`~optax_snr.Moments` for
    :func:`~optax_snr.bias_correction`. Complex gradients use :math:`|z|^2 =
    \bar z z`, as Optax does.

    Args:
      b1: decay of the signal EMA, in [0, 1).
      b2: decay of the centered-noise EMA, in [0, 1).
      eps_root: added to the noise buffer every step, ``>= 0``. Keep it
        positive if gradients flow through the optimizer (meta-learning): the
        derivative of :math:`\sqrt{s}` is infinite at 0.
      mu_dtype: dtype or storage format (:func:`optax_snr.quantized`, ...)
        of the ``mu`` buffer; ``None`` keeps params'. The EMAs are computed
        at full precision either way.
      nu_dtype: dtype or storage format of the ``nu`` buffer (also
        :func:`optax_snr.factored`); ``None`` keeps params'.

    Returns:
      An :class:`optax.GradientTransformation` whose state is a
      :class:`CenteredMomentsState`.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax_snr
      >>> stage = optax_snr.centered_moments(b1=0.5, b2=0.5, eps_root=0.0)
      >>> state = stage.init(jnp.zeros(2))
      >>> moments, state = stage.update(jnp.array([2.0, -2.0]), state)
      >>> moments.mu, moments.nu  # g - m = [1, -1]
      (Array([ 1., -1.], dtype=float32), Array([0.5, 0.5], dtype=float32))

    References:
      Zhuang et al., `AdaBelief Optimizer: Adapting Stepsizes by the Belief in
      Observed Gradients <https://arxiv.org/abs/2010.07468>`_, NeurIPS 2020
      (Algorithm 2).
    """
    validation.check_hyperparameter("b1", b1, low=0.0, high=1.0)
    validation.check_hyperparameter("b2", b2, low=0.0, high=1.0)
    validation.check_hyperparameter("eps_root", eps_root, low=0.0)
    mu_dtype = storage.check_storage("mu_dtype", mu_dtype, signed=True)
    nu_dtype = storage.check_storage("nu_dtype", nu_dtype, signed=False)

    def init_fn(params):
        validation.check_float_leaves(params, "params", "centered_moments.init")
        mu = storage.init_moment(mu_dtype, params, signed=True, field="mu")  # First moment.
        # Second central moment (of the prediction error).
        nu = storage.init_moment(nu_dtype, params, signed=False, field="nu")
        return CenteredMomentsState(mu=mu, nu=nu)

    def update_fn(updates, state, params=None):
        del params
        updates = storage.checked_moment_updates(
            updates, state, mu_dtype, nu_dtype, stage="centered_moments.update"
        )
        is_none = lambda x: x is None
        mu = tree_ema(updates, storage.decode_moment(state.mu, updates), b1)

        def centered_noise(g, m, s):
            if g is None:
                return None
            dtype = promote(g.dtype, m.dtype)
            deviation = g.astype(dtype) - m.astype(dtype)
            s = ema(squared_magnitude(deviation), s, b2)
            return s + jnp.asarray(eps_root, s.dtype)

        old_nu = storage.decode_moment(state.nu, updates)
        nu = jax.tree.map(centered_noise, updates, mu, old_nu, is_leaf=is_none)
        new_state = CenteredMomentsState(
            mu=storage.encode_moment(mu, state.mu), nu=storage.encode_moment(nu, state.nu)
        )
        return Moments(mu=mu, nu=nu, grad=updates), new_state

    return optax.GradientTransformation(init_fn, update_fn)
