"""Dtype rules shared by the stages, spelled out so they run under strict promotion."""

import jax
import jax.numpy as jnp

__all__ = ["compute_dtype", "promote"]


def promote(*dtypes: jax.typing.DTypeLike) -> jnp.dtype:
    """JAX's standard promotion of ``dtypes``, whatever the promotion mode.

    Under ``jax.numpy_dtype_promotion("strict")`` no implicit promotion exists,
    so the stages name the dtype they compute in and cast every operand to it.
    This function picks that dtype with the standard rules (the ones Optax's
    arithmetic implicitly follows), which keeps results bit-identical.

    8-bit floats (``float8_e4m3fn``, ``float8_e5m2``, ...) have no implicit
    promotion at all, not even the standard one. Mixed with another dtype,
    each counts as float32 here (:func:`compute_dtype`): every 8-bit float is
    exact in float32, so nothing is lost before the cast back to the buffer's
    own dtype. Two of the same 8-bit dtype stay in it, as in Optax.
    """
    with jax.numpy_dtype_promotion("standard"):
        try:
            return jnp.promote_types(*dtypes) if len(dtypes) == 2 else jnp.result_type(*dtypes)
        except jax.dtypes.TypePromotionError:
            return jnp.result_type(*(_widen_narrow_float(d) for d in dtypes))


def _widen_narrow_float(dtype: jax.typing.DTypeLike) -> jnp.dtype:
    """float32 for floats narrower than 16 bits (which promote with nothing), else ``dtype``."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 16:
        return jnp.dtype(jnp.float32)
    return dtype


def compute_dtype(dtype: jax.typing.DTypeLike) -> jnp.dtype:
    """The dtype a moment is debiased and divided in: float32 for 16- and 8-bit floats.

    float16 cannot represent the default ``eps=1e-8`` (it rounds to zero) and
    overflows at 65504, so 16-bit moments (and 8-bit ones, which are coarser
    still) are promoted to float32 for the arithmetic after the EMA. The
    buffers in the state keep their own dtype.
    """
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32:
        return jnp.dtype(jnp.float32)
    return dtype
