"""AMSGrad: Adam whose noise is the running maximum of its noise."""

import jax
import optax

from optax_snr.common import validation
from optax_snr.common.chain_as import chain_as
from optax_snr.stages.bias_correction import bias_correction
from optax_snr.stages.ema_moments import ema_moments
from optax_snr.stages.max_noise import max_noise
from optax_snr.stages.scale_by_snr import scale_by_snr

__all__ = ["amsgrad"]


def amsgrad(
    learning_rate: optax.ScalarOrSchedule,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    eps_root: jax.typing.ArrayLike = 0.0,
    mu_dtype: jax.typing.DTypeLike | None = None,
    bias_correction_mu: bool = True,
    bias_correction_nu: bool = True,
    *,
    nu_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""AMSGrad: a drop-in for :func:`optax.amsgrad`, as Adam's chain plus :func:`max_noise`.

    .. math::

        w_t = w_{t-1} - \alpha \, \frac{\hat m_t}
        {\sqrt{\max_{s \le t} \hat v_s + \epsilon_{root}} + \epsilon}

    The state holds ``mu``, ``nu`` (from ``ema_moments``), ``count`` (from
    ``bias_correction``) and ``nu_max`` (from ``max_noise``), packed by
    :func:`~optax_snr.chain_as` into Optax's own ``ScaleByAmsgradState``: the
    same tree as Optax's. Under ``jax.jit`` the result is bit-identical to
    :func:`optax.amsgrad`.

    Args:
      learning_rate: a fixed step size (finite, ``>= 0``) or a schedule.
      b1: decay of the signal EMA (first moment), in [0, 1).
      b2: decay of the noise EMA (second raw moment), in [0, 1).
      eps: added to the noise outside the square root, ``>= 0``.
      eps_root: added to the noise inside the square root, ``>= 0``.
      mu_dtype: dtype or storage format (:func:`optax_snr.quantized`, ...)
        of the first-moment buffer; ``None`` keeps params'.
      bias_correction_mu: whether to bias-correct the signal. ``False``, with
        ``bias_correction_nu=False``, is the original paper's algorithm.
      bias_correction_nu: whether the running maximum is taken over the
        bias-corrected noise (``True``) or the raw EMA (``False``).
      nu_dtype: dtype or storage format of both noise buffers, ``nu`` and
        ``nu_max`` (also :func:`optax_snr.factored`); ``None`` keeps params',
        as Optax does. Both hold the same kind of positive quantity, so one
        argument serves them; the running maximum is taken at full precision
        against the decoded ``nu_max``. (Optax's ``amsgrad`` has no such option.)

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import optax_snr
      >>> f = lambda x: jnp.sum(x ** 2)
      >>> params = jnp.array([1.0, 2.0, 3.0])
      >>> tx = optax_snr.amsgrad(learning_rate=0.1)
      >>> state = tx.init(params)
      >>> for _ in range(100):
      ...   updates, state = tx.update(jax.grad(f)(params), state)
      ...   params = optax.apply_updates(params, updates)
      >>> bool(f(params) < 0.01)
      True

    References:
      Reddi, Kale & Kumar, `On the Convergence of Adam and Beyond
      <https://openreview.net/forum?id=ryQu7f-RZ>`_, ICLR 2018.
    """
    validation.check_learning_rate(learning_rate)
    bias_correction_mu = validation.check_bool("bias_correction_mu", bias_correction_mu)
    bias_correction_nu = validation.check_bool("bias_correction_nu", bias_correction_nu)
    # Skipping a correction is correcting with a decay of 0: 1 - 0^t = 1, and
    # m / 1 is m exactly, so the flags need no stage of their own.
    return optax.chain(
        chain_as(  # the stages' states as one optax.ScaleByAmsgradState(count, mu, nu, nu_max)
            optax.ScaleByAmsgradState,
            ema_moments(b1, b2, mu_dtype, nu_dtype=nu_dtype),  # signal m, noise v
            bias_correction(
                b1 if bias_correction_mu else 0.0, b2 if bias_correction_nu else 0.0
            ),  # m_hat, v_hat; owns count
            max_noise(nu_dtype),  # v_max: the largest v_hat so far
            scale_by_snr(eps, eps_root),  # m_hat / (sqrt(v_max) + eps)
        ),
        optax.scale_by_learning_rate(learning_rate),  # times -learning_rate
    )
