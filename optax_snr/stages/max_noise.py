"""Noise that never shrinks: AMSGrad's running maximum of the noise estimate."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_snr.common.dtypes import promote
from optax_snr.common.moments import require_moments
from optax_snr.storage import base as storage

__all__ = ["MaxNoiseState", "max_noise"]


class MaxNoiseState(NamedTuple):
    """State of :func:`max_noise`: the largest noise estimate seen so far."""

    nu_max: Any  # Running elementwise max of the noise; params' structure, nu_dtype or params'.


def max_noise(nu_dtype: jax.typing.DTypeLike | None = None) -> optax.GradientTransformation:
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
    passes through untouched. It has no hyperparameters.

    Args:
      nu_dtype: dtype or storage format (:func:`optax_snr.quantized`, ...) of
        the ``nu_max`` buffer; ``None`` keeps params' dtype, as Optax's
        ``nu_max``. The maximum is taken at full precision.

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

    nu_dtype = storage.check_storage("nu_dtype", nu_dtype, signed=False)

    def init_fn(params):
        return MaxNoiseState(
            nu_max=storage.init_moment(nu_dtype, params, signed=False, field="nu_max")
        )

    def update_fn(updates, state, params=None):
        del params
        moments = require_moments(updates, "max_noise")
        storage.check_moment_state(
            state.nu_max, nu_dtype, moments.nu, stage="max_noise.update", field="nu_max"
        )
        old = storage.decode_moment(state.nu_max, moments.nu)

        def running_max(v, v_max):
            if v is None:
                return None
            dtype = promote(v.dtype, v_max.dtype)
            return jnp.maximum(v_max.astype(dtype), v.astype(dtype))

        nu_max = jax.tree.map(running_max, moments.nu, old, is_leaf=lambda x: x is None)
        new_state = MaxNoiseState(nu_max=storage.encode_moment(nu_max, state.nu_max))
        return moments._replace(nu=nu_max), new_state

    return optax.GradientTransformation(init_fn, update_fn)
