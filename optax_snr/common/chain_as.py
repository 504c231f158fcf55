"""Chains stages as :func:`optax.chain` does, but keeps their states in one Optax state."""

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import optax

__all__ = ["chain_as"]


def _state_fields(stage: optax.GradientTransformation, position: int) -> type:
    """The NamedTuple class of ``stage``'s state, found without params or computation."""
    try:
        state = jax.eval_shape(stage.init, ())  # The class does not depend on the params.
    except Exception as e:
        raise TypeError(
            f"chain_as: stage {position}'s init fails on an empty tree ({e}); chain_as "
            "packs stages whose state class does not depend on the params."
        ) from e
    fields = getattr(type(state), "_fields", None)
    if not isinstance(state, tuple) or fields is None:
        raise TypeError(
            f"chain_as: stage {position} has a state of type {type(state).__name__}; "
            "only stages whose state is a NamedTuple can be packed by field name."
        )
    return type(state)


def chain_as(
    state_cls: type[NamedTuple],
    *stages: optax.GradientTransformation,
    fields: Mapping[str, str] | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Runs ``stages`` as :func:`optax.chain` does, packing their states into one ``state_cls``.

    Each stage keeps its own small NamedTuple state when used alone; a
    ready-made optimizer wants the one state Optax gives it, such as
    ``optax.ScaleByAdamState(count, mu, nu)``, so that ``jax.tree.structure``
    of its state equals Optax's and checkpoints move between the two libraries.
    This combinator does that by field name: ``init`` builds ``state_cls`` from
    the stages' initial states, and ``update`` takes each stage's fields out of
    it, runs the stages in order (updates flowing from one to the next, as in
    :func:`optax.chain`) and packs their new states back.

    Args:
      state_cls: the NamedTuple class of the packed state. Each of its fields
        holds the stage field of the same name, or the one ``fields`` names.
      *stages: the transformations, in the order they run. Each state must be
        a NamedTuple; every field of every stage must be held by the packed
        state, and no two stages may have a field of the same name.
      fields: ``{packed field: stage field}`` where the names differ (AdEMAMix
        calls the fast EMA ``m1`` where ``ema_moments`` calls it ``mu``). Two
        packed fields may hold the same stage field (Optax's AdEMAMix keeps
        ``count`` and an always equal ``count_m2``); the stage reads the one
        whose name matches its own.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` whose state is a
      ``state_cls``. Extra keyword arguments of ``update`` reach every stage.

    Raises:
      TypeError: if ``state_cls`` or a stage's state is not a NamedTuple, or,
        in ``update``, if the state has other fields than ``state_cls``.
      ValueError: if the packed fields and the stages' fields do not match
        one to one (a field left out, unknown or held by two stages).

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import optax_snr
      >>> tx = optax_snr.chain_as(
      ...     optax.ScaleByAdamState,
      ...     optax_snr.ema_moments(),  # mu, nu
      ...     optax_snr.bias_correction(),  # count
      ...     optax_snr.scale_by_snr(),  # no state
      ... )
      >>> state = tx.init(jnp.zeros(2))
      >>> type(state).__name__, state._fields
      ('ScaleByAdamState', ('count', 'mu', 'nu'))
    """
    packed = getattr(state_cls, "_fields", None)
    if not isinstance(state_cls, type) or not issubclass(state_cls, tuple) or packed is None:
        raise TypeError(f"chain_as: state_cls must be a NamedTuple class, got {state_cls!r}.")
    fields = dict(fields or {})
    unknown = sorted(set(fields) - set(packed))
    if unknown:
        raise ValueError(f"chain_as: fields names {unknown}, which {state_cls.__name__} lacks.")
    classes = [_state_fields(stage, i) for i, stage in enumerate(stages)]
    source = {name: fields.get(name, name) for name in packed}  # packed field -> stage field
    owners: dict[str, int] = {}
    for i, cls in enumerate(classes):
        for name in cls._fields:
            if name in owners:
                raise ValueError(
                    f"chain_as: stages {owners[name]} and {i} both have a field {name!r}; "
                    "a packed state can hold only one."
                )
            owners[name] = i
    missing = sorted(set(source.values()) - set(owners))
    if missing:
        raise ValueError(
            f"chain_as: no stage has the field(s) {missing} that {state_cls.__name__} "
            "needs (map a differently named stage field with fields=...)."
        )
    dropped = sorted(set(owners) - set(source.values()))
    if dropped:
        raise ValueError(
            f"chain_as: {state_cls.__name__} {packed} has no field for the stage field(s) "
            f"{dropped}; the packed state must hold every stage's state."
        )
    # Where each stage field is read from: the packed field of the same name first.
    reads = {}
    for name in owners:
        reads[name] = name if name in packed else next(p for p in packed if source[p] == name)
    stages = tuple(optax.with_extra_args_support(stage) for stage in stages)

    def pack(values: Mapping[str, Any]) -> NamedTuple:
        return state_cls(**{name: values[source[name]] for name in packed})

    def init_fn(params):
        values = {}
        for stage, cls in zip(stages, classes, strict=True):
            values.update(zip(cls._fields, stage.init(params), strict=True))
        return pack(values)

    def update_fn(updates, state, params=None, **extra_args):
        if getattr(type(state), "_fields", None) != packed:
            raise TypeError(
                f"chain_as: expected the state built by init, a {state_cls.__name__} "
                f"with fields {packed}, got {type(state).__name__}."
            )
        values = {}
        for stage, cls in zip(stages, classes, strict=True):
            own = cls(*(getattr(state, reads[name]) for name in cls._fields))
            updates, own = stage.update(updates, own, params, **extra_args)
            values.update(zip(cls._fields, own, strict=True))
        return updates, pack(values)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
