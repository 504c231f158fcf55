"""ADOPT: the ratio first, against the previous step's noise, then its average."""

from collections.abc import Callable

import jax
import optax

from optax_snr.common import validation
from optax_snr.common.chain_as import chain_as
from optax_snr.stages.scale_by_adopt import fourth_root, scale_by_adopt

__all__ = ["adopt"]


def adopt(
    learning_rate: optax.ScalarOrSchedule,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.9999,
    eps: jax.typing.ArrayLike = 1e-6,
    mu_dtype: jax.typing.DTypeLike | None = None,
    *,
    nesterov: bool = False,
    use_clipping: bool = True,
    clip_value_fn: Callable[[jax.Array], jax.Array] = fourth_root,
    nu_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""ADOPT: a drop-in for :func:`optax.contrib.adopt`.

    .. math::

        w_t = w_{t-1} - \alpha \, m_t, \qquad
        m_t = \mathrm{EMA}_{\beta_1}\left[\mathrm{clip}\left(
        \frac{g_t}{\max(\sqrt{v_{t-1}}, \epsilon)}\right)\right]

    :func:`scale_by_adopt` followed by Optax's
    :func:`optax.scale_by_learning_rate`; see :func:`scale_by_adopt` for why
    ADOPT is one stage. The state holds ``count``, ``mu`` and ``nu`` in
    Optax's own ``ScaleByAdamState``, as :func:`optax.contrib.adopt`'s;
    under ``jax.jit`` the result is bit-identical to it.

    Args:
      learning_rate: a fixed step size (finite, ``>= 0``) or a schedule.
      b1: decay of the signal EMA (the average ratio), in [0, 1).
      b2: decay of the noise EMA, in [0, 1).
      eps: lower bound of the noise :math:`\sqrt{v}`, ``>= 0``.
      mu_dtype: dtype or storage format (:func:`optax_snr.quantized`, ...) of
        the ``mu`` buffer (the averaged ratio); ``None`` keeps params'.
      nesterov: whether to use the look-ahead (Nesterov) signal.
      use_clipping: whether to clip the ratio to :math:`\pm c(t)`; the
        paper recommends it when training from scratch.
      clip_value_fn: :math:`c`, from the int32 step index to the clipping
        bound. Default :func:`fourth_root` (Optax's ``lambda x: x**0.25``).
      nu_dtype: dtype or storage format of the noise buffer ``nu`` (also
        :func:`optax_snr.factored`); ``None`` keeps params'. (Optax's
        ``adopt`` has no such option.)

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import optax_snr
      >>> f = lambda x: jnp.sum(x ** 2)
      >>> params = jnp.array([1.0, 2.0, 3.0])
      >>> tx = optax_snr.adopt(learning_rate=0.1)
      >>> state = tx.init(params)
      >>> for _ in range(200):
      ...   updates, state = tx.update(jax.grad(f)(params), state)
      ...   params = optax.apply_updates(params, updates)
      >>> bool(f(params) < 0.01)
      True

    References:
      Taniguchi et al., `ADOPT: Modified Adam Can Converge with Any beta2 with
      the Optimal Rate <https://arxiv.org/abs/2411.02853>`_, NeurIPS 2024.
    """
    validation.check_learning_rate(learning_rate)
    return optax.chain(
        chain_as(  # its state as Optax's: optax.ScaleByAdamState(count, mu, nu)
            optax.ScaleByAdamState,
            scale_by_adopt(  # averaged ratio g / previous noise; owns count
                b1,
                b2,
                eps,
                mu_dtype,
                nesterov=nesterov,
                use_clipping=use_clipping,
                clip_value_fn=clip_value_fn,
                nu_dtype=nu_dtype,
            ),
        ),
        optax.scale_by_learning_rate(learning_rate),  # times -learning_rate
    )
