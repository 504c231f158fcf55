"""The protocol of a storage format, and the one mechanism the moment stages use.

A format turns a full-precision moment leaf into a *stored leaf* (a small
pytree of arrays that records, as static metadata, the format, the leaf's
shape and whether the moment is signed) and back:

    stored = fmt.init(leaf, signed=...)   # the stored zeros, from a param leaf
    stored = fmt.encode(x, stored)        # a new full-precision value, stored
    x = stored.decode()                   # float32, the param leaf's shape

The moment stages never look at formats: they call :func:`init_moment`,
:func:`decode_moment`, :func:`encode_moment` and :func:`check_moment_state`
on whole trees, and a leaf's ``mu_dtype``/``nu_dtype`` may be ``None``, a
plain dtype (the buffer is that dtype, as in Optax) or a format. Leaves
smaller than a format's ``min_size`` (and complex leaves) stay dense in
float32 (float64 for float64 params): they cost little and gain nothing.
Because a stored leaf carries its own format, :func:`decode_moments` reads any
state without being told how it was built.
"""

import abc
import dataclasses
import math
import sys
import zlib
from typing import Any

import jax
import jax.numpy as jnp

from optax_snr.common import validation
from optax_snr.common.dtypes import compute_dtype

__all__ = [
    "StorageFormat",
    "StoredMoment",
    "check_moment_state",
    "check_storage",
    "checked_moment_updates",
    "decode_moment",
    "decode_moments",
    "describe",
    "encode_moment",
    "init_moment",
    "is_stored",
    "logical",
    "register_stored",
]


class StoredMoment:
    """Mixin of every stored leaf: static ``format``, ``shape`` and ``signed`` fields."""

    format: "StorageFormat"
    shape: tuple[int, ...]
    signed: bool

    def decode(self) -> jax.Array:
        """The moment at full precision (float32), in the param leaf's shape."""
        return self.format.decode(self)


_META = ("format", "shape", "signed")


_PENDING: list[type] = []  # Stored-leaf classes not yet known to flax.serialization.


def register_stored(cls: type) -> type:
    """Registers a stored-leaf dataclass with ``flax.serialization`` once Flax is loaded.

    The state dict holds the arrays and the format's ``repr``, so restoring a
    leaf into an optimizer with another format fails naming both. Importing
    optax_snr never imports Flax (an optional extra): the registration happens
    here if Flax is already loaded, or else when a stored moment is first built
    (:func:`init_moment`) after it has been.
    """
    _PENDING.append(cls)
    _register_with_flax()
    return cls


def _register_with_flax() -> None:
    fs = sys.modules.get("flax.serialization")
    while fs is not None and _PENDING:
        _register(fs, _PENDING.pop())


def _register(fs: Any, cls: type) -> None:
    fields = [f.name for f in dataclasses.fields(cls) if f.name not in _META]

    def to_state_dict(x):
        return {**{k: fs.to_state_dict(getattr(x, k)) for k in fields}, "format": repr(x.format)}

    def from_state_dict(target, state):
        found = state.get("format") if isinstance(state, dict) else None
        if found is None:
            found = f"a plain array of shape {getattr(state, 'shape', None)}"
        if found != repr(target.format) or set(state) != {*fields, "format"}:
            raise ValueError(
                f"{fs.current_path()}: the checkpoint holds {found}, but this optimizer "
                f"keeps the leaf as {target.format!r}. Build the optimizer with the "
                "storage format (mu_dtype/nu_dtype) the checkpoint was written with."
            )
        arrays = {k: fs.from_state_dict(getattr(target, k), state[k], name=k) for k in fields}
        for k, v in arrays.items():
            if tuple(getattr(v, "shape", ())) != tuple(getattr(target, k).shape):
                raise ValueError(
                    f"{fs.current_path()}/{k}: the checkpoint's array has shape "
                    f"{getattr(v, 'shape', None)}, this optimizer's {getattr(target, k).shape} "
                    f"(same format {found}: the parameter's shape differs)."
                )
        return dataclasses.replace(target, **arrays)

    fs.register_serialization_state(cls, to_state_dict, from_state_dict, override=True)


class StorageFormat(abc.ABC):
    """A way to keep a moment buffer in less memory than its param's dtype.

    Subclasses are frozen dataclasses (hashable: they are part of the state's
    tree structure, so a state built with one format never silently passes for
    another) with an integer ``min_size``.
    """

    min_size: int

    def stores(self, leaf: Any) -> bool:
        """Whether ``leaf`` (an array or a ShapeDtypeStruct) is kept in this format."""
        return (
            len(leaf.shape) >= 1
            and math.prod(leaf.shape) >= self.min_size
            and not jnp.issubdtype(leaf.dtype, jnp.complexfloating)
        )

    def check_moment(self, name: str, signed: bool) -> None:  # noqa: B027
        """Raises if this format cannot hold a signed (or a positive) moment."""

    @abc.abstractmethod
    def init(self, leaf: Any, *, signed: bool, seed: int = 0) -> StoredMoment:
        """The stored zeros for a param leaf (an array: its sharding carries over)."""

    @abc.abstractmethod
    def encode(self, x: jax.Array, stored: StoredMoment) -> StoredMoment:
        """Stores the full-precision ``x``; ``stored`` is the previous stored leaf."""

    @abc.abstractmethod
    def decode(self, stored: StoredMoment) -> jax.Array:
        """The stored moment as a float32 array of the param leaf's shape."""


def is_stored(x: Any) -> bool:
    """Whether ``x`` is a leaf kept in a storage format (not a plain array)."""
    return isinstance(x, StoredMoment)


def check_storage(name: str, spec: Any, *, signed: bool = True) -> Any:
    """Validates a ``mu_dtype``/``nu_dtype`` argument: ``None``, a dtype or a format.

    Returns the canonical dtype or the format itself. Integer and boolean dtypes
    raise ``TypeError`` (a moment takes fractional values); a format that cannot
    hold this moment (``factored`` for the signed signal) raises ``ValueError``.
    """
    if isinstance(spec, StorageFormat):
        spec.check_moment(name, signed)
        return spec
    if isinstance(spec, type) and issubclass(spec, StorageFormat):
        raise TypeError(f"{name} takes a storage format object, not the class {spec.__name__}.")
    return validation.check_dtype(name, spec)


def _seed(field: str, path: tuple[Any, ...]) -> int:
    """A leaf's identity as a 32-bit number: the same for the same moment and path."""
    return zlib.crc32(f"{field}{jax.tree_util.keystr(path)}".encode())


def init_moment(spec: Any, params: Any, *, signed: bool, field: str) -> Any:
    """Zero moment buffers for ``params``: dense where ``spec`` is a dtype or ``None``."""
    if isinstance(spec, StorageFormat):
        _register_with_flax()  # Flax may have been imported after optax_snr.

    def leaf(path, p):
        if p is None:
            return None
        if isinstance(spec, StorageFormat):
            if spec.stores(p):
                return spec.init(p, signed=signed, seed=_seed(field, path))
            return jnp.zeros_like(p, dtype=compute_dtype(p.dtype))
        return jnp.zeros_like(p, dtype=spec)

    return jax.tree_util.tree_map_with_path(leaf, params, is_leaf=lambda x: x is None)


def decode_moment(stored: Any, updates: Any) -> Any:
    """The moments to compute with: stored leaves decoded, dense leaves as they are.

    A dense buffer keeps its own dtype (the EMA then runs exactly as Optax's);
    a stored leaf is decoded to float32. ``updates`` gives the tree structure.
    """
    return jax.tree.map(
        lambda u, s: s.decode() if is_stored(s) else s,
        updates,
        stored,
        is_leaf=lambda x: x is None,
    )


def encode_moment(new: Any, stored: Any) -> Any:
    """The buffers to keep: ``new`` stored like ``stored``; a ``None`` leaf keeps the old."""

    def leaf(x, s):
        if x is None:
            return s
        if is_stored(s):
            return s.format.encode(x, s)
        return x.astype(s.dtype)

    return jax.tree.map(leaf, new, stored, is_leaf=lambda x: x is None)


def decode_moments(tree: Any) -> Any:
    """Decodes every stored leaf of any tree (a state, a moment); other leaves pass.

    For readers of a state (diagnostics, noise scale): no format argument is
    needed, since each stored leaf records its own.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax_snr
      >>> tx = optax_snr.adam(0.1, mu_dtype=optax_snr.quantized(bits=8, min_size=1))
      >>> _, state = tx.update(jnp.array([1.0, -0.5]), tx.init(jnp.zeros(2)))
      >>> optax_snr.decode_moments(state[0].mu)  # 0.1 * g, kept in 8 bits
      Array([ 0.1      , -0.0502201], dtype=float32)
    """
    return jax.tree.map(lambda s: s.decode() if is_stored(s) else s, tree, is_leaf=is_stored)


def logical(tree: Any) -> Any:
    """``tree`` with each stored leaf replaced by the shape it stands for (for tree checks)."""
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32) if is_stored(s) else s,
        tree,
        is_leaf=is_stored,
    )


def describe(leaf: Any) -> str:
    """A stored or dense leaf in words, for error messages."""
    if is_stored(leaf):
        return f"{leaf.format!r} (shape {leaf.shape})"
    if isinstance(leaf, dict) and "format" in leaf:  # a stored leaf's state dict
        return str(leaf["format"])
    dtype = getattr(leaf, "dtype", None)
    return f"a plain {dtype} array of shape {getattr(leaf, 'shape', None)}"


def _spec_words(spec: Any) -> str:
    return "a plain array of the params' dtype" if spec is None else repr(spec)


def check_moment_state(stored: Any, spec: Any, updates: Any, *, stage: str, field: str) -> None:
    """Raises ``ValueError`` if a buffer was not written by this ``spec``.

    This is what stops a checkpoint written with one storage format (or a plain
    dtype) from being read as another: the message names the leaf, what it
    holds and what this optimizer expects. Runs at trace time on static facts.
    """

    def check(path, u, s):
        if u is None or s is None:  # A None state leaf: check_matching_trees names it.
            return
        where = f"{field}{jax.tree_util.keystr(path)}"
        if isinstance(spec, StorageFormat) and spec.stores(u):
            ok = is_stored(s) and s.format == spec and tuple(s.shape) == tuple(u.shape)
        else:
            ok = not is_stored(s) and hasattr(s, "shape") and hasattr(s, "dtype")
        if ok is False and is_stored(s) and s.format == spec:  # Same format, other shape.
            raise ValueError(
                f"{stage}: the state's leaf {where} holds {describe(s)}, but its update has "
                f"shape {tuple(u.shape)}. A stored moment records its leaf's whole shape, so "
                "the state must come from init on the same params, and a stored state cannot "
                "be split by jax.shard_map (shard the params with a mesh under jax.jit instead)."
            )
        if not ok:
            raise ValueError(
                f"{stage}: the state's leaf {where} holds {describe(s)}, but this "
                f"optimizer keeps it as {_spec_words(spec)}. Was the state (or the "
                "checkpoint it came from) written with another mu_dtype/nu_dtype? "
                "Build the optimizer with the storage format it was saved with."
            )

    try:  # ``updates`` is a prefix of ``stored``: each stored leaf comes whole.
        jax.tree_util.tree_map_with_path(check, updates, stored, is_leaf=lambda x: x is None)
    except ValueError as e:
        if "the state's leaf" in str(e):
            raise
        # Other structure differences: validation.check_matching_trees names them.


def checked_moment_updates(
    updates: Any, state: Any, mu_spec: Any, nu_spec: Any, *, stage: str
) -> Any:
    """The checks a two-moment stage runs in ``update``; returns the updates as arrays.

    The state's ``mu`` and ``nu`` must be stored as ``mu_spec`` and ``nu_spec``
    say (a checkpoint of another format is refused, naming the leaf), the
    updates must match the moments' tree and be floats, and Python float
    leaves become arrays, as Optax takes them.
    """
    check_moment_state(state.mu, mu_spec, updates, stage=stage, field="mu")
    check_moment_state(state.nu, nu_spec, updates, stage=stage, field="nu")
    validation.check_matching_trees(updates, logical(state.mu), stage)
    validation.check_float_leaves(updates, "updates", stage)
    return validation.array_leaves(updates)
