"""AdamW: Adam's chain with decoupled weight decay before the learning rate."""

from collections.abc import Callable
from typing import Any

import jax
import optax

from optax_snr.common import validation
from optax_snr.common.chain_as import chain_as
from optax_snr.stages.bias_correction import bias_correction
from optax_snr.stages.ema_moments import ema_moments
from optax_snr.stages.scale_by_snr import scale_by_snr

__all__ = ["adamw"]


def adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    eps_root: jax.typing.ArrayLike = 0.0,
    mu_dtype: jax.typing.DTypeLike | None = None,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    mask: Any | Callable[[optax.Params], Any] | None = None,
    *,
    nesterov: bool = False,
    nu_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""AdamW: a drop-in for :func:`optax.adamw`; Adam's chain plus decoupled weight decay.

    .. math::

        w_t = w_{t-1} - \alpha \left( \frac{\hat m_t}
        {\sqrt{\hat v_t + \epsilon_{root}} + \epsilon} + \lambda w_{t-1} \right)

    The decay :math:`\lambda w` is added to the SNR after the ratio, not to the
    gradient, so it does not pass through the moments (Loshchilov & Hutter's
    "decoupled" decay); it is Optax's own :func:`optax.add_decayed_weights`,
    placed where :func:`optax.adamw` places it, so under ``jax.jit`` the result
    is bit-identical. As in Optax and PyTorch, the decay is multiplied by the
    learning rate. The update needs ``params``.

    Args:
      learning_rate: a fixed step size (finite, ``>= 0``) or a schedule.
      b1: decay of the signal EMA (first moment), in [0, 1).
      b2: decay of the noise EMA (second raw moment), in [0, 1).
      eps: added to the noise outside the square root, ``>= 0``.
      eps_root: added to the noise inside the square root, ``>= 0``.
      mu_dtype: dtype or storage format (:func:`optax_snr.quantized`, ...)
        of the first-moment buffer; ``None`` keeps params'.
      weight_decay: :math:`\lambda`, finite and ``>= 0``, or a schedule.
      mask: which params decay: a tree of booleans with the params' structure
        (or a prefix of it), or a callable returning one from the params.
        ``None`` decays all. The moments always cover every parameter.
      nesterov: whether to use the look-ahead (Nesterov) signal (NAdamW).
      nu_dtype: dtype or storage format of the second-moment buffer (also
        :func:`optax_snr.factored`); ``None`` keeps params'.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax_snr
      >>> params = {"w": jnp.ones(2), "b": jnp.ones(2)}
      >>> tx = optax_snr.adamw(0.1, weight_decay=0.5, mask={"w": True, "b": False})
      >>> zeros = {"w": jnp.zeros(2), "b": jnp.zeros(2)}
      >>> updates, _ = tx.update(zeros, tx.init(params), params)
      >>> updates["w"]  # a zero gradient leaves the decay alone: -0.1 * 0.5 * w
      Array([-0.05, -0.05], dtype=float32)
      >>> bool((updates["b"] == 0).all())  # masked out
      True

    References:
      Loshchilov & Hutter, `Decoupled Weight Decay Regularization
      <https://arxiv.org/abs/1711.05101>`_, ICLR 2019.
    """
    validation.check_learning_rate(learning_rate)
    validation.check_scalar_or_schedule("weight_decay", weight_decay, low=0.0)
    return optax.chain(
        chain_as(  # the three stages' states as one optax.ScaleByAdamState(count, mu, nu)
            optax.ScaleByAdamState,
            ema_moments(b1, b2, mu_dtype, nu_dtype=nu_dtype),  # signal m, noise v
            bias_correction(b1, b2, nesterov=nesterov),  # m_hat, v_hat; owns count
            scale_by_snr(eps, eps_root),  # m_hat / (sqrt(v_hat) + eps)
        ),
        optax.add_decayed_weights(weight_decay, mask),  # + weight_decay * params
        optax.scale_by_learning_rate(learning_rate),  # times -learning_rate
    )
