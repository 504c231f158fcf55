"""AdEMAMix: AdamW whose signal mixes in a slow EMA of the gradient."""

from collections.abc import Callable
from typing import Any

import jax
import optax
import optax.contrib

from optax_snr.common import validation
from optax_snr.common.chain_as import chain_as
from optax_snr.stages.ema_moments import ema_moments
from optax_snr.stages.mixed_signal import mixed_signal
from optax_snr.stages.scale_by_snr import scale_by_snr

__all__ = ["ademamix"]


def ademamix(
    learning_rate: optax.ScalarOrSchedule,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    b3: optax.ScalarOrSchedule = 0.9999,
    alpha: optax.ScalarOrSchedule = 5.0,
    eps: jax.typing.ArrayLike = 1e-8,
    eps_root: jax.typing.ArrayLike = 0.0,
    mu_dtype: jax.typing.DTypeLike | None = None,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask: Any | Callable[[optax.Params], Any] | None = None,
    *,
    nu_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""AdEMAMix: a drop-in for :func:`optax.contrib.ademamix`; AdamW with a slow EMA mixed in.

    .. math::

        w_t = w_{t-1} - \eta \left( \frac{\hat m_t + \alpha \, m^{(2)}_t}
        {\sqrt{\hat v_t + \epsilon_{root}} + \epsilon} + \lambda w_{t-1} \right)

    Adam's chain with :func:`~optax_snr.mixed_signal` in the place of
    ``bias_correction``, then Optax's :func:`optax.add_decayed_weights` and
    :func:`optax.scale_by_learning_rate`, in the order Optax uses; under
    ``jax.jit`` the result is bit-identical to :func:`optax.contrib.ademamix`.

    The state is Optax's own ``ScaleByAdemamixState(count, count_m2, m1, m2,
    nu)``: :func:`~optax_snr.chain_as` files ``ema_moments``' ``mu`` under
    Optax's name ``m1`` and writes the one step count of the chain into both
    counters (Optax increments them together, so they are always equal; the
    stages read ``count``). As in Optax, ``nu`` is kept in ``mu_dtype`` too,
    unless ``nu_dtype`` names its own; unlike Optax, the buffers keep their
    dtype after an update.

    Args:
      learning_rate: a fixed step size (finite, ``>= 0``) or a schedule.
      b1: decay of the fast signal EMA, in [0, 1).
      b2: decay of the noise EMA, in [0, 1).
      b3: decay of the slow signal EMA, in [0, 1), or a schedule.
      alpha: weight of the slow EMA, ``>= 0``, or a schedule.
      eps: added to the noise outside the square root, ``>= 0``.
      eps_root: added to the noise inside the square root, ``>= 0``.
      mu_dtype: dtype or storage format (:func:`optax_snr.quantized`, ...) of
        the two signal buffers ``m1`` and ``m2``, and of ``nu`` unless
        ``nu_dtype`` is given; ``None`` keeps params'.
      weight_decay: :math:`\lambda`, finite and ``>= 0``, or a schedule. The
        update needs ``params`` even when it is 0, as Optax's does.
      mask: which params decay: a tree of booleans with the params' structure
        (or a prefix of it), or a callable returning one; ``None`` decays all.
      nu_dtype: dtype or storage format of the noise buffer ``nu`` (also
        :func:`optax_snr.factored`). ``None`` stores it as ``mu_dtype``, as
        Optax does (it has no such option).

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import optax_snr
      >>> f = lambda x: jnp.sum(x ** 2)
      >>> params = jnp.array([1.0, 2.0, 3.0])
      >>> tx = optax_snr.ademamix(learning_rate=0.05, b3=0.99)  # a short run: a shorter memory
      >>> state = tx.init(params)
      >>> for _ in range(200):
      ...   updates, state = tx.update(jax.grad(f)(params), state, params)
      ...   params = optax.apply_updates(params, updates)
      >>> bool(f(params) < 0.01)
      True

    References:
      Pagliardini, Ablin & Grangier, `The AdEMAMix Optimizer: Better, Faster,
      Older <https://arxiv.org/abs/2409.03137>`_, ICLR 2025.
    """
    validation.check_learning_rate(learning_rate)
    validation.check_scalar_or_schedule("weight_decay", weight_decay, low=0.0)
    if nu_dtype is None:
        nu_dtype = mu_dtype
    return optax.chain(
        chain_as(  # the stages' states as one Optax ScaleByAdemamixState
            optax.contrib.ScaleByAdemamixState,
            ema_moments(b1, b2, mu_dtype, nu_dtype=nu_dtype),  # fast signal m1, noise v
            mixed_signal(b1, b2, b3, alpha, mu_dtype),  # m1_hat + alpha * m2, v_hat; owns count
            scale_by_snr(eps, eps_root),  # mixed signal / (sqrt(v_hat) + eps)
            fields={"m1": "mu", "count_m2": "count"},  # Optax's names for the same buffers
        ),
        optax.add_decayed_weights(weight_decay, mask),  # + weight_decay * params
        optax.scale_by_learning_rate(learning_rate),  # times -learning_rate
    )
