"""Where the readers find the moments: one lookup for every state layout.

:func:`read_moments` is the only place that knows how an optimizer state is
laid out. :func:`~optax_snr.snr_diagnostics` and :func:`~optax_snr.noise_scale`
call it and get the signal EMA ``mu``, the noise EMA ``nu`` (and AMSGrad's
``nu_max``), the step ``count`` and the hyperparameters, leaf by leaf, under
unique names. It reads:

* NamedTuple states, found by field name: Optax's ``ScaleByAdamState``,
  ``ScaleByAmsgradState``, ``ScaleByBeliefState``, ``ScaleByAdemamixState``
  (whose fast EMA ``m1`` is the signal) and optax_snr's stage states, anywhere
  inside :func:`optax.chain`, :func:`optax.inject_hyperparams`,
  :class:`optax.MultiSteps`, :func:`optax.masked` or a Linen ``TrainState``;
* Flax NNX functional states (``nnx.state(optimizer)``,
  ``nnx.split(optimizer)[1]``), where NNX has turned each NamedTuple into a
  mapping with the same keys and each array into a ``Variable``.

Moments stored in an encoded form (:mod:`optax_snr.storage`) are decoded in
:func:`_decode`, so every reader sees plain float arrays.
"""

import collections
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import jax

from optax_snr.common import validation
from optax_snr.storage.base import is_stored

__all__ = ["StateMoments", "check_hyperparameters", "read_moments", "unique_leaf_names"]

# Adam's defaults, used when neither the caller nor an inject_hyperparams state
# gives a value.
DEFAULTS = {"b1": 0.9, "b2": 0.999, "eps": 1e-8}

# States of wrappers and schedules that count steps of their own.
_WRAPPER_COUNTS = frozenset(
    {
        "InjectHyperparamsState",
        "InjectStatefulHyperparamsState",
        "ScaleByScheduleState",
        "WrappedScheduleState",
    }
)

# The field that holds the signal, by holder: AdEMAMix keeps a fast ``m1`` and a
# slow ``m2``; the fast one is Adam's signal.
_SIGNAL_FIELDS = ("mu", "m1")


class StateMoments(NamedTuple):
    """What :func:`read_moments` found: the moments leaf by leaf, and their context."""

    names: tuple[str, ...]  # One unique name per leaf, e.g. "dense/kernel".
    mu: tuple[jax.Array, ...]  # The signal EMA, decoded, per leaf (biased).
    nu: tuple[jax.Array, ...]  # The noise EMA, decoded, per leaf (biased).
    nu_max: tuple[jax.Array, ...] | None  # AMSGrad's running max of v_hat, if any.
    count: jax.Array  # shape=(), int32; the step t of the bias correction.
    b1: Any  # The signal EMA's decay.
    b2: Any  # The noise EMA's decay.
    eps: Any  # The constant added to the noise in the ratio.
    kind: str  # The holder's type name ("ScaleByAdamState", ...); "mapping" for NNX.


def _children(node: Any) -> list[tuple[Any, Any]]:
    """The direct children of a pytree node as ``(key, child)``; none for a leaf."""
    flat, _ = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)
    if len(flat) == 1 and flat[0][0] == ():
        return []  # ``node`` is a leaf.
    return [(path[0], child) for path, child in flat]


def _walk(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """Every node of a pytree with its key path, parents before children."""
    yield path, node
    for key, child in _children(node):
        yield from _walk(child, (*path, key))


def _fields(node: Any) -> tuple[str, ...] | None:
    """The field names of a NamedTuple node, the string keys of a mapping, else None."""
    if isinstance(node, tuple) and hasattr(node, "_fields"):
        return node._fields
    if isinstance(node, Mapping):
        return tuple(k for k in node if isinstance(k, str))
    return None


def _get(node: Any, name: str) -> Any:
    return node[name] if isinstance(node, Mapping) else getattr(node, name)


def _kind(node: Any) -> str:
    return "mapping" if isinstance(node, Mapping) else type(node).__name__


def _signal_field(fields: tuple[str, ...]) -> str | None:
    if "nu" not in fields:
        return None
    return next((f for f in _SIGNAL_FIELDS if f in fields), None)


def _is_prefix(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return len(a) < len(b) and b[: len(a)] == a


def _common_prefix(a: tuple[Any, ...], b: tuple[Any, ...]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _one_array(value: Any) -> jax.Array:
    """The array inside a scalar field (unwrapping a Flax NNX Variable)."""
    (leaf,) = jax.tree.leaves(value)
    return leaf


def _decode(leaf: Any) -> jax.Array:
    """A stored moment as a plain array.

    The one place where a storage format's encoded leaf (a quantized, rounded
    or factored buffer, recognized by :func:`_is_encoded`) is decoded, to
    float32; plain arrays pass through.
    """
    return leaf.decode() if is_stored(leaf) else leaf


_is_encoded = is_stored  # One encoded leaf of a moment tree (optax_snr.storage).


def _leaves(tree: Any) -> list[tuple[tuple[Any, ...], jax.Array]]:
    """The decoded leaves of a moment tree with their paths."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_encoded)
    return [(path, _decode(leaf)) for path, leaf in flat]


def _strip_value(path: tuple[Any, ...]) -> tuple[Any, ...]:
    """Drops the trailing ``.value`` of a Flax NNX Variable."""
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        return path[:-1]
    return path


def unique_leaf_names(paths: list[tuple[Any, ...]]) -> tuple[str, ...]:
    """Readable, unique names for leaf paths.

    A leaf is named by its keys joined with ``/`` (``"dense/kernel"``; a
    trailing ``.value``, as in Flax NNX Variables, is dropped; the root is
    ``"<root>"``). Where two leaves would share a name (``{"a/b": x, "a":
    {"b": y}}``), each of them is named by :func:`jax.tree_util.keystr` instead
    (``"['a/b']"`` and ``"['a']['b']"``), and any name still shared gets a
    ``#2``, ``#3``, ... suffix, so every leaf has an entry of its own.
    """
    paths = [_strip_value(p) for p in paths]
    simple = [jax.tree_util.keystr(p, simple=True, separator="/") or "<root>" for p in paths]
    shared = {name for name, n in collections.Counter(simple).items() if n > 1}
    names = [
        jax.tree_util.keystr(p) or "<root>" if name in shared else name
        for name, p in zip(simple, paths, strict=True)
    ]
    taken = set(names)
    seen: set[str] = set()
    unique = []
    for name in names:
        candidate, n = name, 1
        while candidate in seen or (candidate != name and candidate in taken):
            n += 1
            candidate = f"{name}#{n}"
        seen.add(candidate)
        unique.append(candidate)
    return tuple(unique)


def _find_holder(state: Any, caller: str) -> tuple[tuple[Any, ...], Any, list]:
    """The node holding the moments, its path, and every node of the state."""
    nodes = list(_walk(state))
    # NamedTuple fields come first; mappings (Flax NNX's rendering of those
    # NamedTuples) only when no NamedTuple holds moments, so a parameter dict
    # with keys "mu" and "nu" is never mistaken for the moments.
    candidates = [
        [
            (p, n)
            for p, n in nodes
            if kind(n) and (f := _fields(n)) is not None and _signal_field(f) is not None
        ]
        for kind in (lambda n: not isinstance(n, Mapping), lambda n: isinstance(n, Mapping))
    ]
    holders = candidates[0] or candidates[1]
    # The outermost holders: moments of a parameter tree keyed "mu"/"nu" sit inside.
    holders = [(p, n) for p, n in holders if not any(_is_prefix(q, p) for q, _ in holders)]
    if not holders:
        raise ValueError(
            f"{caller}: the optimizer state holds no moments (a NamedTuple "
            "with fields `mu` and `nu`, such as optax.ScaleByAdamState or "
            "optax_snr.EmaMomentsState, or a Flax NNX state with those keys); "
            f"got a state of type {type(state).__name__}. It needs Adam or one of "
            "its variants (optax_snr.adam, optax.adam, ...), possibly inside "
            "optax.chain, inject_hyperparams, MultiSteps or masked."
        )
    if len(holders) > 1:
        where = ", ".join(jax.tree_util.keystr(p) or "<root>" for p, _ in holders)
        raise ValueError(
            f"{caller}: the optimizer state holds more than one set of moments "
            f"(at {where}); pass the sub-state of the optimizer you want to inspect."
        )
    (holder,) = holders
    return holder[0], holder[1], nodes


def _find_count(holder_path: tuple[Any, ...], holder: Any, nodes: list, caller: str) -> jax.Array:
    """The step count that goes with the moments.

    The ``count`` beside ``mu`` and ``nu`` (Optax's states) if there is one;
    otherwise the ``count`` nearest to the moments in the state tree that is
    not a wrapper's (optax_snr's ``bias_correction`` stage owns it in a chain).
    """
    if "count" in _fields(holder):
        return _one_array(_get(holder, "count"))
    owners = [
        (p, n)
        for p, n in nodes
        if (f := _fields(n)) is not None and "count" in f and _kind(n) not in _WRAPPER_COUNTS
    ]
    if owners:
        nearest = max(_common_prefix(p, holder_path) for p, _ in owners)
        near = [(p, n) for p, n in owners if _common_prefix(p, holder_path) == nearest]
        if len(near) > 1:
            near = [(p, n) for p, n in near if _kind(n) == "BiasCorrectionState"] or near
        if len(near) == 1:
            return _one_array(_get(near[0][1], "count"))
    raise ValueError(
        f"{caller}: found the moments but not the one step count that goes with "
        "them (a `count` beside `mu` and `nu`, or in a BiasCorrectionState); "
        f"found {len(owners)} candidate counts."
    )


def _hyperparameter(nodes: list, holder_path: tuple[Any, ...], name: str, given: Any) -> Any:
    """The caller's value, else the nearest inject_hyperparams value, else Adam's default."""
    if given is not None:
        return given
    found = []
    for path, node in nodes:
        fields = _fields(node)
        if fields is not None and "hyperparams" in fields:
            hyperparams = _get(node, "hyperparams")
            if isinstance(hyperparams, Mapping) and name in hyperparams:
                found.append((_common_prefix(path, holder_path), hyperparams[name]))
    if found:
        return _one_array(max(found, key=lambda x: x[0])[1])
    return DEFAULTS[name]


def check_hyperparameters(**values: Any) -> None:
    """Checks the concrete ``b1``, ``b2`` (in [0, 1)) and ``eps`` (>= 0) given; None passes."""
    for name, value in values.items():
        if value is not None:
            high = float("inf") if name == "eps" else 1.0
            validation.check_hyperparameter(name, value, low=0.0, high=high)


def read_moments(
    state: Any,
    *,
    b1: Any = None,
    b2: Any = None,
    eps: Any = None,
    caller: str = "read_moments",
    refuse: Mapping[str, str] | None = None,
) -> StateMoments:
    """Finds the moments, the step count and the hyperparameters in a state.

    Args:
      state: an optimizer state (or a Flax NNX state) holding Adam-like moments.
      b1: the signal EMA's decay, or None to read it from an
        ``inject_hyperparams`` state (else Adam's 0.9).
      b2: the noise EMA's decay, likewise (else 0.999).
      eps: the constant added to the noise, likewise (else 1e-8).
      caller: the public function's name, used in error messages.
      refuse: holder type names the caller cannot read, each with the reason
        given in the ``ValueError``.

    Returns:
      A :class:`StateMoments` with decoded ``mu`` and ``nu`` leaves under
      unique names.

    Raises:
      ValueError: if the state holds no moments, more than one set of them, a
        count that cannot be told apart from others, or ADOPT's moments; or a
        concrete ``b1``/``b2`` outside [0, 1) or a negative ``eps``.
      TypeError: if a hyperparameter is not a real scalar.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> from optax_snr.readers.lookup import read_moments
      >>> tx = optax.inject_hyperparams(optax.adam)(learning_rate=0.1, b1=0.5)
      >>> state = tx.init({"a/b": jnp.zeros(2), "a": {"b": jnp.ones(3)}})
      >>> found = read_moments(state)
      >>> found.names, found.kind, float(found.b1), int(found.count)
      (("['a']['b']", "['a/b']"), 'ScaleByAdamState', 0.5, 0)
    """
    check_hyperparameters(b1=b1, b2=b2, eps=eps)
    holder_path, holder, nodes = _find_holder(state, caller)
    kind = _kind(holder)
    if kind == "ScaleByAdoptState":
        raise ValueError(
            f"{caller}: ADOPT's `mu` averages gradients already divided by the "
            "noise, so it is not a signal to compare with the noise."
        )
    if refuse and kind in refuse:
        raise ValueError(f"{caller}: {refuse[kind]}")
    fields = _fields(holder)
    mu = _leaves(_get(holder, _signal_field(fields)))
    nu = _leaves(_get(holder, "nu"))
    if [_strip_value(p) for p, _ in mu] != [_strip_value(p) for p, _ in nu]:
        raise ValueError(f"{caller}: `mu` and `nu` have different tree structures.")
    if "nu_max" in fields:  # Optax's ScaleByAmsgradState.
        maxima = [_leaves(_get(holder, "nu_max"))]
    else:  # optax_snr's max_noise stage, chained after the moments.
        maxima = [
            _leaves(_get(n, "nu_max"))
            for _, n in nodes
            if (f := _fields(n)) is not None and "nu_max" in f
        ]
    count = _find_count(holder_path, holder, nodes, caller)
    hyper = {
        name: _hyperparameter(nodes, holder_path, name, given)
        for name, given in (("b1", b1), ("b2", b2), ("eps", eps))
    }
    return StateMoments(
        names=unique_leaf_names([p for p, _ in mu]),
        mu=tuple(x for _, x in mu),
        nu=tuple(x for _, x in nu),
        nu_max=tuple(x for _, x in maxima[0]) if len(maxima) == 1 else None,
        count=count,
        kind=kind,
        **hyper,
    )
