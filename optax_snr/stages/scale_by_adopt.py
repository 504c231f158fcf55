"""Ratio first: ADOPT's average of each gradient over the previous step's noise."""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_snr.common import validation
from optax_snr.common.dtypes import compute_dtype, promote
from optax_snr.common.moments import squared_magnitude, tree_ema
from optax_snr.storage import base as storage

__all__ = ["ScaleByAdoptState", "fourth_root", "scale_by_adopt"]


class ScaleByAdoptState(NamedTuple):
    """State of :func:`scale_by_adopt`: Optax's ``ScaleByAdamState`` fields."""

    count: jax.Array  # shape=(), dtype=jnp.int32.
    mu: Any  # EMA of the (clipped) ratios g / noise; params' structure, mu_dtype or params'.
    nu: Any  # EMA of |g|^2, used one step later; params' structure, nu_dtype or params'.


def fourth_root(count: jax.Array) -> jax.Array:
    """ADOPT's default clipping bound, ``count ** 0.25``, under strict promotion too.

    The same value as Optax's default ``lambda x: x**0.25``: the int32 step is
    cast to the default float dtype first, as standard promotion would do.
    """
    return count.astype(jnp.result_type(float)) ** 0.25


def scale_by_adopt(
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.9999,
    eps: jax.typing.ArrayLike = 1e-6,
    mu_dtype: jax.typing.DTypeLike | None = None,
    *,
    nesterov: bool = False,
    use_clipping: bool = True,
    clip_value_fn: Callable[[jax.Array], jax.Array] = fourth_root,
    nu_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformation:
    r"""Averages the per-step ratio of gradient to the previous noise (ADOPT).

    Adam averages first and divides after, so the current gradient is part of
    the noise it is divided by; ADOPT (Taniguchi et al.) shows that this
    correlation is what makes Adam diverge for some :math:`\beta_2`, and
    removes it: each gradient is divided by the noise of the steps *before*
    it, clipped, and only then averaged into the signal.

    .. math::

        r_t = \mathrm{clip}\left(\frac{g_t}{\max(\sqrt{v_{t-1}}, \epsilon)},
        \pm c(t)\right), \quad
        m_t = \beta_1 m_{t-1} + (1 - \beta_1) r_t, \quad
        v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2

    Steps count from :math:`t = 0`, which only initializes :math:`v_0 = g_0^2`
    (its update is zero); no bias correction is needed after that. With
    ``nesterov=True`` the update is :math:`\beta_1 m_t + (1 - \beta_1) r_t`.

    This order (the ratio before the average, against a lagged noise) does
    not fit the ``ema_moments -> bias_correction -> scale_by_snr`` chain, so
    ADOPT is one stage; it reuses the chain's EMA arithmetic and owns the
    ``count``. It performs :func:`optax.contrib.scale_by_adopt`'s float
    operations in the same order (bit-identical under ``jax.jit``); updates
    come back in each gradient's dtype, 16-bit ratios are computed in float32.

    Args:
      b1: decay of the signal EMA (the average ratio), in [0, 1).
      b2: decay of the noise EMA, in [0, 1).
      eps: lower bound of the noise :math:`\sqrt{v}`, ``>= 0``.
      mu_dtype: dtype or storage format (:func:`optax_snr.quantized`, ...) of
        the ``mu`` buffer; ``None`` keeps params'.
      nesterov: whether to use the look-ahead (Nesterov) signal.
      use_clipping: whether to clip the ratio to :math:`\pm c(t)`.
      clip_value_fn: :math:`c`, from the int32 step index (0 at the first
        step) to the clipping bound. Default :func:`fourth_root`.
      nu_dtype: dtype or storage format of the ``nu`` buffer; ``None`` keeps
        params' (Optax's ADOPT has no such option).

    Returns:
      An :class:`optax.GradientTransformation` whose state is a
      :class:`ScaleByAdoptState`.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax_snr
      >>> stage = optax_snr.scale_by_adopt(b1=0.5, use_clipping=False)
      >>> state = stage.init(jnp.zeros(2))
      >>> for g in ([2.0, -1.0], [4.0, 1.0]):
      ...   updates, state = stage.update(jnp.array(g), state)
      >>> updates  # (1 - 0.5) * g_1 / |g_0|
      Array([1. , 0.5], dtype=float32)

    References:
      Taniguchi et al., `ADOPT: Modified Adam Can Converge with Any beta2 with
      the Optimal Rate <https://arxiv.org/abs/2411.02853>`_, NeurIPS 2024.
    """
    validation.check_hyperparameter("b1", b1, low=0.0, high=1.0)
    validation.check_hyperparameter("b2", b2, low=0.0, high=1.0)
    validation.check_hyperparameter("eps", eps, low=0.0)
    mu_dtype = storage.check_storage("mu_dtype", mu_dtype, signed=True)
    nu_dtype = storage.check_storage("nu_dtype", nu_dtype, signed=False)
    nesterov = validation.check_bool("nesterov", nesterov)
    use_clipping = validation.check_bool("use_clipping", use_clipping)
    if not callable(clip_value_fn):
        raise TypeError(f"clip_value_fn must be callable, got {clip_value_fn!r}.")

    def init_fn(params):
        validation.check_float_leaves(params, "params", "scale_by_adopt.init")
        mu = storage.init_moment(mu_dtype, params, signed=True, field="mu")  # Of the ratio.
        nu = storage.init_moment(nu_dtype, params, signed=False, field="nu")  # Of the gradient.
        return ScaleByAdoptState(count=jnp.zeros([], jnp.int32), mu=mu, nu=nu)

    def update_fn(updates, state, params=None):
        del params
        updates = storage.checked_moment_updates(
            updates, state, mu_dtype, nu_dtype, stage="scale_by_adopt.update"
        )
        old_mu = storage.decode_moment(state.mu, updates)
        old_nu = storage.decode_moment(state.nu, updates)
        is_none = lambda x: x is None
        started = state.count > 0
        # First step: nu_0 = g_0^2 (decay 0) and mu stays 0 (decay 1).
        b1_t = jnp.where(started, b1, 1)
        b2_t = jnp.where(started, b2, 0)
        clip_value = clip_value_fn(state.count) if use_clipping else None

        def ratio(g, v):  # g / max(sqrt(v_{t-1}), eps), clipped
            dtype = compute_dtype(promote(g.dtype, v.dtype))
            noise = jnp.maximum(jnp.sqrt(v.astype(dtype)), jnp.asarray(eps, dtype))
            r = g.astype(dtype) / noise
            if clip_value is None:
                return r
            c = jnp.asarray(clip_value, dtype)
            return jnp.clip(r, -c, c)

        ratios = jax.tree.map(
            lambda g, v: None if g is None else ratio(g, v), updates, old_nu, is_leaf=is_none
        )
        mu = tree_ema(ratios, old_mu, b1_t)
        nu = tree_ema(jax.tree.map(squared_magnitude, updates), old_nu, b2_t)
        if nesterov:  # one more EMA step with the same ratio: the signal one step ahead
            signal = tree_ema(ratios, mu, b1_t)
        else:
            signal = mu
        step = jax.tree.map(
            lambda s, g: None if g is None else s.astype(g.dtype), signal, updates, is_leaf=is_none
        )
        new_state = ScaleByAdoptState(
            count=optax.safe_increment(state.count),
            mu=storage.encode_moment(mu, state.mu),
            nu=storage.encode_moment(nu, state.nu),
        )
        return step, new_state

    return optax.GradientTransformation(init_fn, update_fn)
