"""Ratio: the pseudo signal-to-noise ratio that becomes Adam's step direction."""

from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_snr.common import validation
from optax_snr.common.dtypes import compute_dtype, promote
from optax_snr.common.moments import require_moments

__all__ = ["scale_by_snr", "snr"]


def snr(mu_hat: jax.Array, nu_hat: jax.Array, eps: Any, eps_root: Any) -> jax.Array:
    """``mu_hat / (sqrt(nu_hat + eps_root) + eps)`` for one leaf, with explicit casts.

    The operations and their order are Optax's; the constants are cast to the
    noise's dtype and the quotient is computed in the promoted dtype of signal
    and noise (float32 for 16-bit floats, see :func:`optax_snr.compute_dtype`).
    """
    nu_hat = nu_hat.astype(compute_dtype(nu_hat.dtype))
    noise = jnp.sqrt(nu_hat + jnp.asarray(eps_root, nu_hat.dtype))
    noise = noise + jnp.asarray(eps, noise.dtype)
    dtype = compute_dtype(promote(mu_hat.dtype, noise.dtype))
    return mu_hat.astype(dtype) / noise.astype(dtype)


def scale_by_snr(
    eps: jax.typing.ArrayLike = 1e-8,
    eps_root: jax.typing.ArrayLike = 0.0,
) -> optax.GradientTransformation:
    r"""Divides the signal by the noise: the pseudo signal-to-noise ratio.

    .. math::

        \mathrm{SNR}_t = \frac{\hat m_t}{\sqrt{\hat v_t + \epsilon_{root}} + \epsilon}

    Where the gradient points the same way step after step, :math:`|\hat m|`
    is close to :math:`\sqrt{\hat v}` and the ratio is close to 1 in magnitude:
    a full step. Where it flips sign from batch to batch, :math:`\hat m` averages
    out while :math:`\hat v` does not, and the step shrinks. ``eps`` bounds the
    denominator away from zero; ``eps_root`` (inside the root) keeps the
    derivative of the ratio finite when meta-learning through the optimizer.

    This stage takes the :class:`~optax_snr.Moments` from ``bias_correction``
    and returns plain updates with the gradient's structure, each leaf in its
    gradient's dtype. 16-bit moments are divided in float32 (see
    :func:`optax_snr.compute_dtype`), so float16 with a zero gradient gives
    zero, not ``0 / 0 = NaN`` as in Optax. It holds no state.

    Args:
      eps: added to the noise outside the square root, ``>= 0``.
      eps_root: added to the noise inside the square root, ``>= 0``.

    Returns:
      An :class:`optax.GradientTransformation` with an empty state.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax_snr
      >>> stage = optax_snr.scale_by_snr(eps=0.0)
      >>> m = optax_snr.Moments(jnp.array([3.0]), jnp.array([4.0]), jnp.zeros(1))
      >>> stage.update(m, stage.init(None))[0]
      Array([1.5], dtype=float32)

    References:
      Kingma & Ba, `Adam: A Method for Stochastic Optimization
      <https://arxiv.org/abs/1412.6980>`_, 2014 (Algorithm 1, line 11;
      Section 2.1 calls this ratio the signal-to-noise ratio).
    """
    validation.check_hyperparameter("eps", eps, low=0.0)
    validation.check_hyperparameter("eps_root", eps_root, low=0.0)

    def update_fn(updates, state, params=None):
        del params
        moments = require_moments(updates, "scale_by_snr")

        def ratio(m, v, g):
            if g is None:
                return None
            return snr(m, v, eps, eps_root).astype(g.dtype)

        updates = jax.tree.map(
            ratio, moments.mu, moments.nu, moments.grad, is_leaf=lambda x: x is None
        )
        return updates, state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)
