"""Adam: signal, bias correction, ratio and learning rate, chained."""

import jax
import optax

from optax_snr.common import validation
from optax_snr.common.chain_as import chain_as
from optax_snr.stages.bias_correction import bias_correction
from optax_snr.stages.ema_moments import ema_moments
from optax_snr.stages.scale_by_snr import scale_by_snr

__all__ = ["adam", "scale_by_adam"]


def scale_by_adam(
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    eps_root: jax.typing.ArrayLike = 0.0,
    mu_dtype: jax.typing.DTypeLike | None = None,
    *,
    nesterov: bool = False,
    nu_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Rescales updates by Adam's pseudo signal-to-noise ratio (no learning rate).

    A drop-in for :func:`optax.scale_by_adam`, built from three stages whose
    states :func:`~optax_snr.chain_as` keeps in one
    ``optax.ScaleByAdamState(count, mu, nu)``, as Optax's:

    .. math::

        \mathrm{SNR}_t = \frac{\hat m_t}{\sqrt{\hat v_t + \epsilon_{root}} + \epsilon}

    Args:
      b1: decay of the signal EMA (first moment), in [0, 1).
      b2: decay of the noise EMA (second raw moment), in [0, 1).
      eps: added to the noise outside the square root, ``>= 0``.
      eps_root: added to the noise inside the square root, ``>= 0``.
      mu_dtype: dtype or storage format (:func:`optax_snr.quantized`, ...)
        of the first-moment buffer; ``None`` keeps params'.
      nesterov: whether to use the look-ahead (Nadam) signal.
      nu_dtype: dtype or storage format of the second-moment buffer (also
        :func:`optax_snr.factored`); ``None`` keeps params'.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax_snr
      >>> tx = optax_snr.scale_by_adam()
      >>> updates, _ = tx.update(jnp.array([0.5, -2.0]), tx.init(jnp.zeros(2)))
      >>> updates  # the first step is about +-1: |m_hat| equals sqrt(v_hat)
      Array([ 0.9999934, -0.9999934], dtype=float32)
    """
    return chain_as(
        optax.ScaleByAdamState,  # the stages' states packed as Optax's (count, mu, nu)
        ema_moments(b1, b2, mu_dtype, nu_dtype=nu_dtype),
        bias_correction(b1, b2, nesterov=nesterov),
        scale_by_snr(eps, eps_root),
    )


def adam(
    learning_rate: optax.ScalarOrSchedule,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    eps_root: jax.typing.ArrayLike = 0.0,
    mu_dtype: jax.typing.DTypeLike | None = None,
    *,
    nesterov: bool = False,
    nu_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Adam, read as a pseudo signal-to-noise ratio: a drop-in for :func:`optax.adam`.

    .. math::

        w_t = w_{t-1} - \alpha \, \frac{\hat m_t}{\sqrt{\hat v_t + \epsilon_{root}} + \epsilon}

    The body is the SNR reading, one stage per line: the EMAs of the gradient
    (signal) and of its square (noise), their bias correction, the ratio, and
    the learning rate (Optax's own :func:`optax.scale_by_learning_rate`). Under
    ``jax.jit`` with default options the result is bit-identical to
    :func:`optax.adam`.

    Args:
      learning_rate: a fixed step size (finite, ``>= 0``) or a schedule.
      b1: decay of the signal EMA (first moment), in [0, 1).
      b2: decay of the noise EMA (second raw moment), in [0, 1).
      eps: added to the noise outside the square root, ``>= 0``.
      eps_root: added to the noise inside the square root, ``>= 0``.
      mu_dtype: dtype or storage format (:func:`optax_snr.quantized`, ...)
        of the first-moment buffer; ``None`` keeps params'.
      nesterov: whether to use the look-ahead (Nadam) signal.
      nu_dtype: dtype or storage format of the second-moment buffer (also
        :func:`optax_snr.factored`); ``None`` keeps params'.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import optax_snr
      >>> f = lambda x: jnp.sum(x ** 2)
      >>> params = jnp.array([1.0, 2.0, 3.0])
      >>> tx = optax_snr.adam(learning_rate=0.1)
      >>> state = tx.init(params)
      >>> for _ in range(100):
      ...   updates, state = tx.update(jax.grad(f)(params), state)
      ...   params = optax.apply_updates(params, updates)
      >>> bool(f(params) < 0.01)
      True

    References:
      Kingma & Ba, `Adam: A Method for Stochastic Optimization
      <https://arxiv.org/abs/1412.6980>`_, 2014.
    """
    validation.check_learning_rate(learning_rate)
    return optax.chain(
        chain_as(  # the three stages' states as one optax.ScaleByAdamState(count, mu, nu)
            optax.ScaleByAdamState,
            ema_moments(b1, b2, mu_dtype, nu_dtype=nu_dtype),  # signal m, noise v
            bias_correction(b1, b2, nesterov=nesterov),  # m_hat, v_hat; owns count
            scale_by_snr(eps, eps_root),  # m_hat / (sqrt(v_hat) + eps)
        ),
        optax.scale_by_learning_rate(learning_rate),  # times -learning_rate
    )
