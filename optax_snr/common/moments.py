"""What the moment stages share: the ``Moments`` they pass on and their arithmetic.

Every stage in :mod:`optax_snr.stages` and every reader in
:mod:`optax_snr.readers` builds on these few functions, so the EMA, the
bias-correction factor and the casts are written once.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from optax_snr.common.dtypes import compute_dtype, promote

__all__ = [
    "Moments",
    "cast_like_state",
    "correction",
    "debias",
    "ema",
    "require_moments",
    "squared_magnitude",
    "tree_ema",
]


class Moments(NamedTuple):
    """What passes between the moment stages in place of plain updates.

    ``ema_moments`` turns the gradient tree into a ``Moments`` of three trees
    with the gradient's structure; the stages after it (``bias_correction``,
    ``scale_by_snr``, the variants' stages) read and rewrite these fields, and
    ``scale_by_snr`` turns them back into an ordinary update tree. Under
    ``jax.jit`` nothing here is materialized: XLA fuses the chain per leaf.
    """

    mu: Any  # Signal: EMA of gradients (biased, then bias-corrected).
    nu: Any  # Noise: EMA of squared gradients (biased, then bias-corrected).
    grad: Any  # This step's raw gradient: for look-ahead momentum and dtypes.


def ema(x: jax.Array, moment: jax.Array, decay: Any) -> jax.Array:
    """One EMA step, ``(1 - decay) * x + decay * moment``, with explicit casts.

    The arithmetic is the one Optax performs with weakly typed Python scalars
    (each product in its operand's dtype, the sum in the promoted dtype), so the
    results are bit-identical, but every cast is spelled out and the function
    runs under ``jax.numpy_dtype_promotion("strict")``. ``1 - decay`` is formed
    before the cast, as Optax does, so a Python ``decay`` keeps its float64
    precision until it meets the array.
    """
    dtype = promote(x.dtype, moment.dtype)
    new = jnp.asarray(1 - decay, x.dtype) * x
    old = jnp.asarray(decay, moment.dtype) * moment
    return new.astype(dtype) + old.astype(dtype)


def tree_ema(updates: Any, moments: Any, decay: Any) -> Any:
    """:func:`ema` over a tree; a ``None`` update leaf gives ``None``."""
    return jax.tree.map(
        lambda x, m: None if x is None else ema(x, m, decay),
        updates,
        moments,
        is_leaf=lambda x: x is None,
    )


def squared_magnitude(g: jax.Array) -> jax.Array:
    """|g|^2: ``g ** 2`` for real ``g``, ``(conj(g) * g).real`` for complex.

    16-bit floats are squared in float32 (:func:`compute_dtype`): in float16,
    ``g ** 2`` overflows to inf for ``|g| >= 256`` and vanishes for
    ``|g| < 2.4e-4``, which turns the step into 0 or into ``g / eps``. Other
    dtypes are squared in their own dtype, as Optax does.
    """
    if jnp.iscomplexobj(g):
        return (g.conj() * g).real
    g = g.astype(compute_dtype(g.dtype))
    return g**2


def cast_like_state(tree: Any, state_tree: Any) -> Any:
    """Casts new moments to the state's dtypes; a ``None`` update keeps the old buffer."""
    return jax.tree.map(
        lambda x, s: s if x is None else x.astype(s.dtype),
        tree,
        state_tree,
        is_leaf=lambda x: x is None,
    )


def correction(decay: Any, count: jax.Array) -> jax.Array:
    """The bias-correction factor ``1 - decay ** count``, once for a whole tree.

    The power is taken in float32 (float64 under ``jax_enable_x64``), as in
    ``optax.tree.bias_correction``: in low precision ``decay ** count`` rounds
    to 1 and the correction to 0. Computing it once per tree, as Optax does,
    also gives XLA the same graph to simplify, which keeps results bit-exact.
    """
    decay = jnp.asarray(decay)
    if not jnp.issubdtype(decay.dtype, jnp.floating):
        decay = decay.astype(jnp.result_type(float))
    return 1 - _power(decay, count)


@jax.custom_jvp
def _power(decay: jax.Array, count: jax.Array) -> jax.Array:
    """``decay ** count`` for an integer ``count``, differentiable under strict promotion.

    The value is ``jax.lax.pow``'s, as in Optax. Its derivative in JAX promotes
    the int32 ``count`` to ``decay``'s dtype implicitly, which
    ``jax.numpy_dtype_promotion("strict")`` refuses; the rule below performs
    the same operations with the cast spelled out, so ``jax.grad`` with
    respect to ``b1`` or ``b2`` works and equals Optax's gradient.
    """
    return jax.lax.pow(decay, count)


@_power.defjvp
def _power_jvp(primals, tangents):
    decay, count = primals
    decay_dot, _ = tangents
    y = count.astype(decay.dtype)
    safe_y = jnp.where(y == 0, jnp.ones_like(y), y)  # as lax.pow's rule, no 0 * inf
    jac = jnp.where(y == 0, jnp.zeros_like(y), safe_y * jax.lax.pow(decay, y - 1))
    return _power(decay, count), decay_dot * jac


def debias(moment: jax.Array, factor: jax.Array) -> jax.Array:
    """``moment / factor``, divided in the moment's :func:`compute_dtype`."""
    dtype = compute_dtype(moment.dtype)
    return moment.astype(dtype) / factor.astype(dtype)


def require_moments(updates: Any, stage: str) -> Moments:
    """Raises a clear ``TypeError`` when a stage is chained without moments."""
    if not isinstance(updates, Moments):
        raise TypeError(
            f"{stage} expects the Moments produced by ema_moments (or another "
            f"moment stage) earlier in the chain, got {type(updates).__name__}. "
            "Chain it as optax.chain(ema_moments(...), bias_correction(...), "
            "scale_by_snr(...), ...)."
        )
    return updates
