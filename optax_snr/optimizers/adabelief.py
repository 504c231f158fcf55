"""AdaBelief: Adam whose noise is centered on the signal."""

import jax
import optax

from optax_snr.common import validation
from optax_snr.common.chain_as import chain_as
from optax_snr.stages.bias_correction import bias_correction
from optax_snr.stages.centered_moments import centered_moments
from optax_snr.stages.scale_by_snr import scale_by_snr

__all__ = ["adabelief"]


def adabelief(
    learning_rate: optax.ScalarOrSchedule,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-16,
    eps_root: jax.typing.ArrayLike = 1e-16,
    *,
    nesterov: bool = False,
    mu_dtype: jax.typing.DTypeLike | None = None,
    nu_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""AdaBelief: a drop-in for :func:`optax.adabelief`; Adam's chain with a centered noise.

    .. math::

        w_t = w_{t-1} - \alpha \, \frac{\hat m_t}{\sqrt{\hat s_t} + \epsilon}, \qquad
        s_t = \beta_2 s_{t-1} + (1 - \beta_2) (g_t - m_t)^2 + \epsilon_{root}

    Only the first stage differs from :func:`optax_snr.adam`:
    :func:`~optax_snr.centered_moments` estimates the noise from the gradient's
    deviation from the signal instead of from the raw gradient, so a large but
    consistent gradient keeps a large step. ``eps_root`` goes into the noise
    buffer (Optax's convention), so ``scale_by_snr`` gets none. The state is
    Optax's own ``ScaleByBeliefState(count, mu, nu)``; under ``jax.jit`` the
    result is bit-identical to :func:`optax.adabelief`.

    Args:
      learning_rate: a fixed step size (finite, ``>= 0``) or a schedule.
      b1: decay of the signal EMA (first moment), in [0, 1).
      b2: decay of the centered-noise EMA, in [0, 1).
      eps: added to the noise outside the square root, ``>= 0``. The paper's
        default is ``1e-8`` with ``eps_root=0``.
      eps_root: added to the noise buffer at every step, ``>= 0``.
      nesterov: whether to use the look-ahead (Nesterov) signal.
      mu_dtype: dtype or storage format (:func:`optax_snr.quantized`, ...)
        of the signal buffer ``mu``; ``None`` keeps params'.
      nu_dtype: dtype or storage format of the centered-noise buffer ``nu``
        (also :func:`optax_snr.factored`); ``None`` keeps params'. (Optax's
        ``adabelief`` has neither option; both are keyword-only here.)

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import optax_snr
      >>> f = lambda x: jnp.sum(x ** 2)
      >>> params = jnp.array([1.0, 2.0, 3.0])
      >>> tx = optax_snr.adabelief(learning_rate=0.1)
      >>> state = tx.init(params)
      >>> for _ in range(100):
      ...   updates, state = tx.update(jax.grad(f)(params), state)
      ...   params = optax.apply_updates(params, updates)
      >>> bool(f(params) < 0.01)
      True

    References:
      Zhuang et al., `AdaBelief Optimizer: Adapting Stepsizes by the Belief in
      Observed Gradients <https://arxiv.org/abs/2010.07468>`_, NeurIPS 2020.
    """
    validation.check_learning_rate(learning_rate)
    return optax.chain(
        chain_as(  # the three stages' states as one optax.ScaleByBeliefState(count, mu, nu)
            optax.ScaleByBeliefState,
            centered_moments(b1, b2, eps_root, mu_dtype, nu_dtype=nu_dtype),  # signal m, noise s
            bias_correction(b1, b2, nesterov=nesterov),  # m_hat, s_hat; owns count
            scale_by_snr(eps, eps_root=0.0),  # m_hat / (sqrt(s_hat) + eps)
        ),
        optax.scale_by_learning_rate(learning_rate),  # times -learning_rate
    )
