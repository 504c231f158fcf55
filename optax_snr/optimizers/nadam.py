"""Nadam and NAdamW: Adam and AdamW with the look-ahead (Nesterov) signal."""

from collections.abc import Callable
from typing import Any

import jax
import optax

from optax_snr.optimizers.adam import adam
from optax_snr.optimizers.adamw import adamw

__all__ = ["nadam", "nadamw"]


def nadam(
    learning_rate: optax.ScalarOrSchedule,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    eps_root: jax.typing.ArrayLike = 0.0,
    mu_dtype: jax.typing.DTypeLike | None = None,
    *,
    nesterov: bool = True,
    nu_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Nadam: a drop-in for :func:`optax.nadam`, which is Adam with ``nesterov=True``.

    The signal looks one step ahead: the momentum that the next step will
    apply is used now, with the current gradient's share corrected on its own
    (``bias_correction(nesterov=True)``).

    .. math::

        \hat m_t = \beta_1 \frac{m_t}{1 - \beta_1^{t+1}}
        + (1 - \beta_1) \frac{g_t}{1 - \beta_1^t}

    As in Optax, Dozat's extra factor :math:`\beta_2` on :math:`\hat v_t` is
    left out. Under ``jax.jit`` the result is bit-identical to
    :func:`optax.nadam`.

    Args:
      learning_rate: a fixed step size (finite, ``>= 0``) or a schedule.
      b1: decay of the signal EMA (first moment), in [0, 1).
      b2: decay of the noise EMA (second raw moment), in [0, 1).
      eps: added to the noise outside the square root, ``>= 0``.
      eps_root: added to the noise inside the square root, ``>= 0``.
      mu_dtype: dtype or storage format (:func:`optax_snr.quantized`, ...)
        of the first-moment buffer; ``None`` keeps params'.
      nesterov: kept for the signature of :func:`optax.nadam` (a
        ``functools.partial`` of ``adam``); ``False`` gives plain Adam.
      nu_dtype: dtype or storage format of the second-moment buffer (also
        :func:`optax_snr.factored`); ``None`` keeps params'.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax_snr
      >>> tx = optax_snr.nadam(learning_rate=1.0)
      >>> updates, _ = tx.update(jnp.array([0.5, -2.0]), tx.init(jnp.zeros(2)))
      >>> updates  # Adam's first step is -sign(g); the look-ahead adds 0.9 * 0.1 / 0.19 of it
      Array([-1.4736743,  1.4736743], dtype=float32)

    References:
      Dozat, `Incorporating Nesterov Momentum into Adam
      <https://openreview.net/pdf?id=OM0jvwB8jIp57ZJjtNEZ>`_, ICLR 2016 workshop.
    """
    return adam(
        learning_rate, b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov, nu_dtype=nu_dtype
    )


def nadamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    eps_root: jax.typing.ArrayLike = 0.0,
    mu_dtype: jax.typing.DTypeLike | None = None,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    mask: Any | Callable[[optax.Params], Any] | None = None,
    *,
    nesterov: bool = True,
    nu_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""NAdamW: a drop-in for :func:`optax.nadamw`, which is AdamW with ``nesterov=True``.

    The look-ahead signal of :func:`nadam` plus the decoupled weight decay of
    :func:`~optax_snr.adamw`:

    .. math::

        w_t = w_{t-1} - \alpha \left( \frac{\hat m_t}
        {\sqrt{\hat v_t + \epsilon_{root}} + \epsilon} + \lambda w_{t-1} \right),
        \quad \hat m_t = \beta_1 \frac{m_t}{1 - \beta_1^{t+1}}
        + (1 - \beta_1) \frac{g_t}{1 - \beta_1^t}

    Under ``jax.jit`` the result is bit-identical to :func:`optax.nadamw`.

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
        (or a prefix of it), or a callable returning one; ``None`` decays all.
      nesterov: kept for the signature of :func:`optax.nadamw`; ``False``
        gives plain AdamW.
      nu_dtype: dtype or storage format of the second-moment buffer (also
        :func:`optax_snr.factored`); ``None`` keeps params'.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax_snr
      >>> params = jnp.ones(2)
      >>> tx = optax_snr.nadamw(learning_rate=1.0, weight_decay=0.5)
      >>> updates, _ = tx.update(jnp.array([0.5, -2.0]), tx.init(params), params)
      >>> updates  # -(1.47 * sign(g) + 0.5 * w), the first step of nadam plus the decay
      Array([-1.9736743,  0.9736743], dtype=float32)

    References:
      Loshchilov & Hutter, `Decoupled Weight Decay Regularization
      <https://arxiv.org/abs/1711.05101>`_, ICLR 2019.

      Dozat, `Incorporating Nesterov Momentum into Adam
      <https://openreview.net/pdf?id=OM0jvwB8jIp57ZJjtNEZ>`_, ICLR 2016 workshop.
    """
    return adamw(
        learning_rate,
        b1,
        b2,
        eps,
        eps_root,
        mu_dtype,
        weight_decay,
        mask,
        nesterov=nesterov,
        nu_dtype=nu_dtype,
    )
