"""Noise that never shrinks: AMSGrad's running maximum of the noise estimate."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_snr.common.dtypes import promote
from optax_snr.common.moments import cast_like_state, require_moments

__all__ = ["MaxNoiseState", "max_noise"]


class MaxNoiseState(NamedTuple):
    """State of :func:`max_noise`: the largest noise estimate seen so far."""

    nu_max: Any  # Running elementwise max of the noise it receives; params' structure and dtype.


def max_noise() -> optax.GradientTransformation:
    r"""Replaces the noise by its running maximum, so the ratio never grows back (AMSGrad).

    Adam's noise :math:`\hat v_t` forgets: after a few quiet steps it shrinks
    and the ratio :math:`\hat m_t / \sqrt{\hat v_t}` can jump up on the next
    large gradient. AMSGrad divides by the largest noise seen so far instead,
    which makes the effective step size per coordinate non-increasing (the
    property its convergence proof needs).

    .. math::

        \hat v^{\max}_t = \max\left(\hat v^{\max}_{t-1}, \hat v_t\right),
        \qquad \hat v^{\max}_0 = 0

    Chain it between :func:`~optax_snr.bias_correction` and
    :func:`~optax_snr.scale_by_snr`: it takes and returns
    :class:`~optax_snr.Moments`, replacing ``nu`` by the running maximum of
    whatever noise it is given (bias-corrected, as in :func:`optax.amsgrad`'s
    default; raw, if ``bias_correction`` was built with ``b2=0``). The signal
    passes through untouched. It has no hyperparameters; the buffer has the
    params' dtype, as Optax's ``nu_max``.

    Returns:
      An :class:`optax.GradientTransformation` whose state is a
      :class:`MaxNoiseState`.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax_snr
      >>> stage = optax_snr.max_noise()
      >>> state = stage.init(jnp.zeros(2))
      >>> for v in ([4.0, 1.0], [1.0, 9.0]):
      ...   m = optax_snr.Moments(jnp.ones(2), jnp.array(v), jnp.ones(2))
      ...   out, state = stage.update(m, state)
      >>> out.nu
      Array([4., 9.], dtype=float32)

    References:
      Reddi, Kale & Kumar, `On the Convergence of Adam and Beyond
      <https://openreview.net/forum?id=ryQu7f-RZ>`_, ICLR 2018 (Algorithm 2).
    """

    def init_fn(params):
        return MaxNoiseState(nu_max=optax.tree.zeros_like(params))

    def update_fn(updates, state, params=None):
        del params
        moments = require_moments(updates, "max_noise")

        def running_max(v, v_max):
            if v is None:
                return None
            dtype = promote(v.dtype, v_max.dtype)
            return jnp.maximum(v_max.astype(dtype), v.astype(dtype))

        nu_max = jax.tree.map(running_max, moments.nu, state.nu_max, is_leaf=lambda x: x is None)
        new_state = MaxNoiseState(nu_max=cast_like_state(nu_max, state.nu_max))
        return moments._replace(nu=nu_max), new_state

    return optax.GradientTransformation(init_fn, update_fn)
