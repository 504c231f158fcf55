"""Checks shared by every stage and optimizer: hyperparameters and input trees.

A hyperparameter that is a concrete number is checked when the stage is built,
so that a bad value fails at once with a message naming the argument and its
valid range, instead of producing NaNs a thousand steps later. Traced values
(inside ``jax.jit`` or ``optax.inject_hyperparams``) and schedules (callables)
cannot be inspected without a host round trip and pass through unchecked.

Tree checks run at trace time on static information only (structure, shape,
dtype), so they cost nothing inside a compiled step.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "array_leaves",
    "check_bool",
    "check_dtype",
    "check_float_leaves",
    "check_hyperparameter",
    "check_learning_rate",
    "check_matching_trees",
    "check_scalar_or_schedule",
]


def _concrete_value(name: str, value: Any) -> float | None:
    """Returns ``value`` as a Python float, or ``None`` if it is traced."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}.")
    if isinstance(value, jax.core.Tracer):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, (np.ndarray, np.generic, jax.Array)):
        if np.shape(value) != ():
            raise TypeError(f"{name} must be a scalar, got an array of shape {np.shape(value)}.")
        if not jnp.issubdtype(value.dtype, jnp.number) or jnp.issubdtype(
            value.dtype, jnp.complexfloating
        ):
            raise TypeError(f"{name} must be a real number, got dtype {value.dtype}.")
        return float(value)
    raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}.")


def check_hyperparameter(
    name: str,
    value: Any,
    *,
    low: float,
    high: float = math.inf,
    high_inclusive: bool = False,
) -> None:
    """Raises ``ValueError`` unless a concrete ``value`` lies in ``[low, high)``.

    Args:
      name: the argument's name, used in the message.
      value: a Python number, a NumPy or JAX scalar, or a tracer (not checked).
      low: the smallest valid value (inclusive).
      high: the bound above (exclusive unless ``high_inclusive``).
      high_inclusive: whether ``high`` itself is valid.

    Raises:
      TypeError: if ``value`` is not a real scalar (a string, ``None``, a bool).
      ValueError: if ``value`` is NaN or outside the valid range.
    """
    x = _concrete_value(name, value)
    if x is None:
        return
    closing = "]" if high_inclusive else ")"
    valid = f"[{low:g}, {high:g}{closing}"
    in_range = low <= x and (x <= high if high_inclusive else x < high)
    if math.isnan(x) or not in_range:
        raise ValueError(f"{name} must be in {valid}, got {value!r}.")


def check_scalar_or_schedule(
    name: str,
    value: Any,
    *,
    low: float,
    high: float = math.inf,
    high_inclusive: bool = False,
) -> None:
    """Like :func:`check_hyperparameter`, but a schedule (a callable) passes."""
    if not callable(value):
        check_hyperparameter(name, value, low=low, high=high, high_inclusive=high_inclusive)


def check_learning_rate(learning_rate: Any) -> None:
    """Checks a learning rate: a schedule passes, a number must be finite >= 0."""
    check_scalar_or_schedule("learning_rate", learning_rate, low=0.0)


def check_bool(name: str, value: Any) -> bool:
    """Returns ``value`` as a Python bool; raises ``TypeError`` unless it is a concrete bool.

    A Python bool, a NumPy bool (``np.True_``) or a scalar NumPy or JAX bool
    array (``jnp.array(True)``) is accepted, as Optax accepts them. Flags
    decide the structure of the computation, so a traced value is refused,
    and so are numbers (``1`` is not a flag).
    """
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"{name} must be a concrete bool, got a traced value; it decides the "
            "structure of the computation, so pass it as a Python bool (under "
            "optax.inject_hyperparams, list it in static_args)."
        )
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (np.ndarray, jax.Array)) and value.dtype == bool and value.shape == ():
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {value!r}.")


def check_dtype(name: str, dtype: Any) -> jnp.dtype | None:
    """Canonicalizes an optional accumulator dtype; it must be inexact."""
    if dtype is None:
        return None
    if hasattr(dtype, "encode") and hasattr(dtype, "decode"):
        raise TypeError(
            f"{name} takes a plain dtype here, not the storage format {dtype!r}: "
            "storage formats apply to the moment buffers of the moment stages."
        )
    try:
        canonical = jax.dtypes.canonicalize_dtype(dtype)
    except TypeError as e:
        raise TypeError(f"{name} must be a floating dtype or None, got {dtype!r}.") from e
    if not jnp.issubdtype(canonical, jnp.inexact):
        raise TypeError(f"{name} must be a floating or complex dtype or None, got {canonical}.")
    return canonical


def check_float_leaves(tree: Any, what: str, stage: str) -> None:
    """Raises ``TypeError`` naming the first leaf that is not float or complex.

    Integer and boolean parameters cannot take fractional steps: Optax silently
    truncates their updates to zero, which is never what the user meant.
    """
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        dtype = getattr(leaf, "dtype", None)
        if dtype is None:  # A Python number (or a string, an object: not a number).
            dtype = np.asarray(leaf).dtype
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(
                f"{stage}: {what} leaf {jax.tree_util.keystr(path) or '<root>'} has "
                f"dtype {dtype}; only floating and complex leaves can be optimized. "
                "Keep integer and boolean leaves out of the optimized tree (for "
                "example with optax.masked or nnx.Param filtering)."
            )


def check_matching_trees(updates: Any, reference: Any, stage: str) -> None:
    """Raises ``ValueError`` naming the path where two trees' structures or shapes differ.

    ``updates`` may hold ``None`` where ``reference`` holds an array (a frozen
    parameter); any other difference is an error.
    """
    is_none = lambda x: x is None
    upd = dict(jax.tree_util.tree_flatten_with_path(updates, is_leaf=is_none)[0])
    ref = dict(jax.tree_util.tree_flatten_with_path(reference, is_leaf=is_none)[0])
    if upd.keys() != ref.keys():
        only_upd = ", ".join(jax.tree_util.keystr(k) for k in upd if k not in ref)
        only_ref = ", ".join(jax.tree_util.keystr(k) for k in ref if k not in upd)
        raise ValueError(
            f"{stage}: the updates' tree structure differs from the optimizer "
            f"state's (built by init from params). Only in updates: "
            f"{only_upd or 'nothing'}; only in the state: {only_ref or 'nothing'}."
        )
    for path, u in upd.items():
        r = ref[path]
        if r is None and u is not None:
            raise ValueError(
                f"{stage}: updates leaf {jax.tree_util.keystr(path)} is an array of "
                f"shape {np.shape(u)}, but the optimizer state holds None there (the "
                "param was None when init built the state). Give None as its "
                "gradient, or build the state from params that hold an array there."
            )
        if u is None or r is None:
            continue
        if np.shape(u) != np.shape(r):
            raise ValueError(
                f"{stage}: updates leaf {jax.tree_util.keystr(path)} has shape "
                f"{np.shape(u)} but the optimizer state expects {np.shape(r)}."
            )


def array_leaves(tree: Any) -> Any:
    """The tree with Python and NumPy numbers turned into JAX arrays (``jnp.asarray``).

    Optax's arithmetic accepts a Python float as a gradient or parameter leaf
    (it gives a float32 update); the stages read ``.dtype`` and ``.astype``, so
    they convert such leaves first. JAX arrays, tracers and ``None`` pass
    through unchanged.
    """
    return jax.tree.map(lambda x: x if isinstance(x, jax.Array) else jnp.asarray(x), tree)
