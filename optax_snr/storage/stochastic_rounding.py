"""bfloat16 moments rounded at random, up or down, so that the stored EMA stays unbiased."""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from optax_snr.storage.base import StorageFormat, StoredMoment, register_stored

__all__ = ["RoundedMoment", "StochasticRounding", "stochastic_rounding"]


@register_stored
@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["value", "seed"],
    meta_fields=["format", "shape", "signed"],
)
@dataclasses.dataclass(frozen=True, eq=False)
class RoundedMoment(StoredMoment):
    """A moment leaf in :func:`stochastic_rounding` form."""

    value: jax.Array  # bfloat16, the leaf's shape.
    seed: jax.Array  # uint32 scalar: the leaf's identity plus its number of updates.
    format: StorageFormat  # A StochasticRounding.
    shape: tuple[int, ...]
    signed: bool


def _mix(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finalizer: a bijection that spreads every input bit."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _random_bits(seed: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """32 pseudo-random bits per entry from the seed and the entry's global index.

    A counter-based hash, not a PRNG stream: the bits depend only on the index
    in the whole (unsharded) leaf, so every device computes the same bits for
    the same entry, however the leaf is sharded or replicated.
    """
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        iota = jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
        index = index + iota * jnp.uint32(stride % 2**32)
        stride *= shape[axis]
    return _mix(index * jnp.uint32(0x9E3779B9) + _mix(seed))


@dataclasses.dataclass(frozen=True)
class StochasticRounding(StorageFormat):
    """Stochastic rounding to bfloat16; build it with :func:`stochastic_rounding`."""

    dtype: Any = jnp.bfloat16
    min_size: int = 0

    def __repr__(self) -> str:
        return f"stochastic_rounding({jnp.dtype(self.dtype).name}, min_size={self.min_size})"

    def init(self, leaf: Any, *, signed: bool, seed: int = 0) -> RoundedMoment:
        value = jnp.zeros_like(leaf, dtype=self.dtype)
        return RoundedMoment(value, jnp.asarray(seed, jnp.uint32), self, tuple(leaf.shape), signed)

    def encode(self, x: jax.Array, stored: RoundedMoment) -> RoundedMoment:
        x = x.astype(jnp.float32)
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
        noise = _random_bits(stored.seed, stored.shape) >> 16
        # Adding uniform noise below bfloat16's last bit, then truncating, rounds
        # the magnitude up with probability equal to the dropped fraction.
        rounded = (bits + noise) & jnp.uint32(0xFFFF0000)
        value = jax.lax.bitcast_convert_type(rounded, jnp.float32)
        value = jnp.where(jnp.isfinite(x), value, x).astype(self.dtype)
        return RoundedMoment(value, stored.seed + jnp.uint32(1), self, stored.shape, stored.signed)

    def decode(self, stored: RoundedMoment) -> jax.Array:
        return stored.value.astype(jnp.float32)


def stochastic_rounding(
    dtype: jax.typing.DTypeLike = jnp.bfloat16, *, min_size: int = 0
) -> StochasticRounding:
    r"""Stores a moment in bfloat16, rounded up or down at random (unbiased).

    With round-to-nearest, a bfloat16 EMA stops moving once its increment
    :math:`(1 - \beta)(g - m)` is below half of bfloat16's spacing (8 bits of
    mantissa: a relative 0.4%), and :math:`1 - \beta_2 = 10^{-3}` is below
    that: the noise of rarely seen rows freezes. Rounding up with probability
    equal to the fraction dropped makes the stored value right on average,
    :math:`E[\mathrm{round}(x)] = x`, so small increments accumulate.

    The random bits are a hash of the leaf (its path in the tree and the
    moment's name, fixed at ``init``), the number of updates so far (a uint32
    kept beside the values) and the entry's index: no key to thread,
    reproducible from a checkpoint, and identical on every device that holds
    the same entry. The EMA itself is computed in float32. State per entry: 2
    bytes.

    Args:
      dtype: the stored dtype; only ``jnp.bfloat16`` is supported.
      min_size: leaves with fewer entries stay float32, ``>= 0``.

    Returns:
      A :class:`StochasticRounding` format.

    Raises:
      ValueError: for any other dtype or a negative ``min_size``.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax_snr
      >>> fmt = optax_snr.stochastic_rounding(jnp.bfloat16)
      >>> stored = fmt.init(jnp.zeros(10_000), signed=True)
      >>> x = jnp.full(10_000, 1.0 + 2.0**-10)  # between two bfloat16 values
      >>> mean = fmt.encode(x, stored).decode().mean()  # 1 + 2**-10, on average
      >>> round(float(mean), 4)
      1.001

    References:
      Gupta et al., `Deep Learning with Limited Numerical Precision
      <https://arxiv.org/abs/1502.02551>`_, ICML 2015. Zamirai et al.,
      `Revisiting BFloat16 Training <https://arxiv.org/abs/2010.06192>`_, 2020.
    """
    try:
        canonical = jnp.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"dtype must be jnp.bfloat16, got {dtype!r}.") from e
    if canonical != jnp.dtype(jnp.bfloat16):
        raise ValueError(f"dtype must be jnp.bfloat16, got {canonical}.")
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 0:
        raise ValueError(f"min_size must be an integer >= 0, got {min_size!r}.")
    return StochasticRounding(dtype=canonical, min_size=min_size)
