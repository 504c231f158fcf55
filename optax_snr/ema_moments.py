"""Signal and noise: exponential moving averages of the gradient and its square."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_snr import validation
from optax_snr.dtypes import compute_dtype, promote

__all__ = [
    "EmaMomentsState",
    "Moments",
    "cast_like_state",
    "ema",
    "ema_moments",
    "squared_magnitude",
    "tree_ema",
]


class Moments(NamedTuple):
    """What passes between the moment stages in place of plain updates.

    ``ema_moments`` turns the gradient tree into a ``Moments`` of three trees
    with the gradient's structure; the stages after it (``bias_correction``,
    ``scale_by_snr``, the variants' stages) read and rewrite these fields, and
    ``scale_by_snr`` turns them back into an ordinary update tree. Under
    ``jax.jit`` nothing here is materialized: XLA fuses the chain per leaf.
    """

    mu: Any  # Signal: EMA of gradients (biased, then bias-corrected).
    nu: Any  # Noise: EMA of squared gradients (biased, then bias-corrected).
    grad: Any  # This step's raw gradient: for look-ahead momentum and dtypes.


class EmaMomentsState(NamedTuple):
    """State of :func:`ema_moments`: the two moment buffers."""

    mu: Any  # EMA of gradients; params' structure, dtype mu_dtype or params'.
    nu: Any  # EMA of |gradient|^2; params' structure, dtype nu_dtype or params'.


def ema(x: jax.Array, moment: jax.Array, decay: Any) -> jax.Array:
    """One EMA step, ``(1 - decay) * x + decay * moment``, with explicit casts.

    The arithmetic is the one Optax performs with weakly typed Python scalars
    (each product in its operand's dtype, the sum in the promoted dtype), so the
    results are bit-identical, but every cast is spelled out and the function
    runs under ``jax.numpy_dtype_promotion("strict")``. ``1 - decay`` is formed
    before the cast, as Optax does, so a Python ``decay`` keeps its float64
    precision until it meets the array.
    """
    dtype = promote(x.dtype, moment.dtype)
    new = jnp.asarray(1 - decay, x.dtype) * x
    old = jnp.asarray(decay, moment.dtype) * moment
    return new.astype(dtype) + old.astype(dtype)


def tree_ema(updates: Any, moments: Any, decay: Any) -> Any:
    """:func:`ema` over a tree; a ``None`` update leaf gives ``None``."""
    return jax.tree.map(
        lambda x, m: None if x is None else ema(x, m, decay),
        updates,
        moments,
        is_leaf=lambda x: x is None,
    )


def squared_magnitude(g: jax.Array) -> jax.Array:
    """|g|^2: ``g ** 2`` for real ``g``, ``(conj(g) * g).real`` for complex.

    16-bit floats are squared in float32 (:func:`compute_dtype`): in float16,
    ``g ** 2`` overflows to inf for ``|g| >= 256`` and vanishes for
    ``|g| < 2.4e-4``, which turns the step into 0 or into ``g / eps``. Other
    dtypes are squared in their own dtype, as Optax does.
    """
    if jnp.iscomplexobj(g):
        return (g.conj() * g).real
    g = g.astype(compute_dtype(g.dtype))
    return g**2


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
      nu_dtype: dtype of the ``nu`` buffer; ``None`` keeps each param's dtype.
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
    mu_dtype = validation.check_dtype("mu_dtype", mu_dtype)
    nu_dtype = validation.check_dtype("nu_dtype", nu_dtype)

    def init_fn(params):
        validation.check_float_leaves(params, "params", "ema_moments.init")
        mu = optax.tree.zeros_like(params, dtype=mu_dtype)  # First moment.
        nu = optax.tree.zeros_like(params, dtype=nu_dtype)  # Second raw moment.
        return EmaMomentsState(mu=mu, nu=nu)

    def update_fn(updates, state, params=None):
        del params
        validation.check_matching_trees(updates, state.mu, "ema_moments.update")
        validation.check_float_leaves(updates, "updates", "ema_moments.update")
        mu = tree_ema(updates, state.mu, b1)
        nu = tree_ema(jax.tree.map(squared_magnitude, updates), state.nu, b2)
        # The next stages read the moments at full precision; the state keeps
        # its own dtypes, so the state's types never change from step to step.
        new_state = EmaMomentsState(
            mu=cast_like_state(mu, state.mu), nu=cast_like_state(nu, state.nu)
        )
        return Moments(mu=mu, nu=nu, grad=updates), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def cast_like_state(tree: Any, state_tree: Any) -> Any:
    """Casts new moments to the state's dtypes; a ``None`` update keeps the old buffer."""
    return jax.tree.map(
        lambda x, s: s if x is None else x.astype(s.dtype),
        tree,
        state_tree,
        is_leaf=lambda x: x is None,
    )
