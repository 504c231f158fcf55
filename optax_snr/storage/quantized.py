"""Blockwise 8- and 4-bit moments: one float32 scale per block, one code per entry."""

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from optax_snr.storage.base import StorageFormat, StoredMoment, register_stored

__all__ = ["Quantized", "QuantizedMoment", "block_layout", "quantized"]


@register_stored
@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["codes", "scales"],
    meta_fields=["format", "shape", "signed"],
)
@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedMoment(StoredMoment):
    """A moment leaf in :func:`quantized` form (a pytree of two arrays)."""

    codes: jax.Array  # uint8; the leaf's shape (8 bits), or its last axis halved (4 bits).
    scales: jax.Array  # float32, (*leading axes, blocks): each block's largest magnitude.
    format: StorageFormat  # A Quantized.
    shape: tuple[int, ...]
    signed: bool


def _blocks(length: int, block_size: int) -> tuple[int, int]:
    """``(count, size)`` of the blocks of a last axis: as many as ``block_size``
    asks for, then balanced, so padding stays below one entry per block."""
    size = math.ceil(length / math.ceil(length / block_size))
    return math.ceil(length / size), size


@dataclasses.dataclass(frozen=True)
class Quantized(StorageFormat):
    r"""Blockwise quantization of a moment; build it with :func:`quantized`.

    Each leaf's last axis is cut into blocks of at most ``block_size``
    entries; a block keeps its largest magnitude :math:`a` as a float32 scale
    and each entry one code of ``bits`` bits. The code maps are powers, so
    small entries of a block keep their relative precision:

    * the signal (signed) is stored as :math:`x = a\,\mathrm{sign}(k)(|k|/H)^2`,
      :math:`k \in \{-H..H\}`, :math:`H = 2^{bits-1} - 1`;
    * the noise (positive) as :math:`v = a\,((k + 1)/N)^4`,
      :math:`k \in \{0..N-1\}`, :math:`N = 2^{bits}`. The map has no zero:
      a positive noise never decodes to 0 (which would turn the step into
      :math:`m/\epsilon`); only a block that is all zeros decodes to zeros.

    Codes are rounded to nearest in the power's root (:math:`\sqrt{|x|/a}`,
    :math:`(v/a)^{1/4}`). At 4 bits two codes share a byte, along the last
    axis.
    """

    bits: int = 8
    block_size: int = 256
    min_size: int = 4096

    def __repr__(self) -> str:
        return (
            f"quantized(bits={self.bits}, block_size={self.block_size}, min_size={self.min_size})"
        )

    def init(self, leaf: Any, *, signed: bool, seed: int = 0) -> QuantizedMoment:
        del seed
        zeros = jnp.zeros_like(leaf, dtype=jnp.float32)
        empty = QuantizedMoment(None, None, self, tuple(leaf.shape), signed)
        return self.encode(zeros, empty)

    def encode(self, x: jax.Array, stored: QuantizedMoment) -> QuantizedMoment:
        codes, scales = _encode(x, self.bits, self.block_size, stored.shape, stored.signed)
        return QuantizedMoment(codes, scales, self, stored.shape, stored.signed)

    def decode(self, stored: QuantizedMoment) -> jax.Array:
        return _decode(
            stored.codes, stored.scales, self.bits, self.block_size, stored.shape, stored.signed
        )


def _levels(bits: int, signed: bool) -> int:
    return 2 ** (bits - 1) - 1 if signed else 2**bits


class _Split(NamedTuple):
    """How explicit sharding splits a leaf's last axis (``AxisType.Explicit`` meshes).

    There a reshape of a sharded axis must say how its result is sharded, and
    it can only cut the axis where every shard holds whole pieces. The block
    arithmetic therefore runs on *units*: ``gcd(block size, shard length)``
    entries, which never straddle a block or a shard. Where the shards hold
    whole blocks a unit is a block; otherwise each unit's maximum is taken in
    place and only these maxima (one per unit, not per entry) are gathered to
    form the blocks' scales. Codes keep the leaf's sharding; scales too when
    the shards hold equally many blocks, else they are replicated along the
    last axis, as XLA's propagation leaves them on an auto-sharded mesh. At
    4 bits a shard of odd length cannot hold whole bytes: there (and only
    there) the last axis is gathered and the codes stay replicated along it.
    """

    mesh: Any  # The (abstract) mesh of the leaf's sharding.
    lead: tuple[Any, ...]  # The partition spec of the leading axes.
    last: Any  # The mesh axis (or axes) that split the last axis.
    shards: int  # How many pieces the last axis is split into.

    def sharding(self, *tail: Any) -> NamedSharding:
        return NamedSharding(self.mesh, P(*self.lead, *tail))

    def gather(self, x: jax.Array) -> jax.Array:
        """``x`` with its last axis whole on every device (leading axes as they were)."""
        return jax.sharding.reshard(x, self.sharding(None))

    def place(self, x: jax.Array) -> jax.Array:
        """``x`` sharded along its last axis as the leaf is, if its length divides."""
        last = self.last if x.shape[-1] % self.shards == 0 else None
        return jax.sharding.reshard(x, self.sharding(last))

    def fits(self, length: int, bits: int) -> bool:
        """Whether the shards hold equal parts (at 4 bits, of an even length)."""
        local, rest = divmod(length, self.shards)
        return rest == 0 and (bits == 8 or local % 2 == 0)


def _split(x: jax.Array) -> _Split | None:
    """The explicit sharding of ``x``'s last axis; ``None`` if it has none."""
    sharding = jax.typeof(x).sharding
    spec = tuple(getattr(sharding, "spec", ()))
    if x.ndim == 0 or len(spec) != x.ndim or spec[-1] is None:
        return None  # Unsharded, or sharded by XLA's propagation (AxisType.Auto).
    names = (spec[-1],) if isinstance(spec[-1], str) else tuple(spec[-1])
    shards = math.prod(sharding.mesh.shape[name] for name in names)
    return _Split(sharding.mesh, spec[:-1], spec[-1], shards) if shards > 1 else None


def _reshape(x: jax.Array, shape: tuple[int, ...], split: _Split | None) -> jax.Array:
    """``x.reshape(shape)``; with a split last axis, sharded along the first new axis."""
    if split is None:
        return x.reshape(shape)
    tail = [split.last] + [None] * (len(shape) - len(split.lead) - 1)
    return jnp.reshape(x, shape, out_sharding=split.sharding(*tail))


def _to_units(x: jax.Array, unit: int, split: _Split | None) -> jax.Array:
    """``(*lead, length)`` to ``(*lead, units, unit)``, zero-padded (never when split)."""
    *lead, length = x.shape
    units = -(-length // unit)
    if units * unit > length:
        x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, units * unit - length)])
    return _reshape(x, (*lead, units, unit), split)


def _from_units(x: jax.Array, length: int, split: _Split | None) -> jax.Array:
    """``(*lead, units, unit)`` back to ``(*lead, length)``, the padding dropped."""
    *lead, units, unit = x.shape
    x = _reshape(x, (*lead, units * unit), split)
    return x if units * unit == length else x[..., :length]


def _unit_size(length: int, size: int, split: _Split | None) -> int:
    return size if split is None else math.gcd(size, length // split.shards)


def _block_scales(unit_max: jax.Array, count: int, per_block: int, split: _Split) -> jax.Array:
    """Each block's largest magnitude from its units' (gathered: one value per unit)."""
    unit_max = split.gather(unit_max)
    pad = count * per_block - unit_max.shape[-1]  # the last block may be short
    unit_max = jnp.pad(unit_max, [(0, 0)] * (unit_max.ndim - 1) + [(0, pad)])
    return jnp.max(unit_max.reshape(*unit_max.shape[:-1], count, per_block), axis=-1)


def _unit_scales(scales: jax.Array, units: int, per_block: int, split: _Split) -> jax.Array:
    """Each unit's block scale, sharded with the units."""
    scales = split.gather(scales)
    spread = jnp.repeat(
        scales, per_block, axis=-1, total_repeat_length=scales.shape[-1] * per_block
    )
    return split.place(spread[..., :units])


# Jitted (inlined into an enclosing jit) so that the block reshapes of a sharded
# leaf are left to XLA's sharding propagation, also when called eagerly.
@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _encode(x, bits, block_size, shape, signed):
    length = shape[-1]
    count, size = _blocks(length, block_size)
    x = x.astype(jnp.float32)
    if not signed:
        x = jnp.maximum(x, 0.0)
    leaf = _split(x)  # where the codes and scales go at the end
    split = leaf if leaf is not None and leaf.fits(length, bits) else None
    if leaf is not None and split is None:
        x = leaf.gather(x)
    unit = _unit_size(length, size, split)
    units = _to_units(x, unit, split)
    unit_max = jnp.max(jnp.abs(units), axis=-1)
    if unit == size:  # a unit is a block
        scales = unit_scales = unit_max
    else:
        scales = _block_scales(unit_max, count, size // unit, split)
        unit_scales = _unit_scales(scales, units.shape[-2], size // unit, split)
    safe = jnp.where(unit_scales > 0, unit_scales, 1.0)[..., None]
    levels = jnp.asarray(_levels(bits, signed), jnp.float32)
    if signed:  # k = round(H sqrt(|x| / a)) with x's sign; stored as k + H.
        k = jnp.round(levels * jnp.sqrt(jnp.abs(units) / safe))
        codes = jnp.sign(units) * k + levels
    else:  # k = round(N (v / a)^(1/4)) - 1, at least 0.
        k = jnp.round(levels * jnp.sqrt(jnp.sqrt(units / safe))) - 1.0
        codes = jnp.clip(k, 0.0, levels - 1.0)
    codes = _from_units(codes.astype(jnp.uint8), length, split)
    if bits == 4:
        codes = _pack(codes, split)
    if leaf is not None:
        codes, scales = leaf.place(codes), leaf.place(scales)
    return codes, scales


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _decode(codes, scales, bits, block_size, shape, signed):
    length = shape[-1]
    _, size = _blocks(length, block_size)
    leaf = _split(codes) or _split(scales)
    split = leaf if leaf is not None and leaf.fits(length, bits) else None
    if split is not None:  # the codes sharded as the leaf (encode leaves them so)
        codes = split.place(codes)
    elif leaf is not None:
        codes, scales = leaf.gather(codes), leaf.gather(scales)
    if bits == 4:
        codes = _unpack(codes, length, split)
    codes = codes.astype(jnp.float32)
    levels = jnp.asarray(_levels(bits, signed), jnp.float32)
    if signed:
        k = codes - levels
        values = jnp.sign(k) * jnp.square(k / levels)
    else:
        values = jnp.square(jnp.square((codes + 1.0) / levels))
    unit = _unit_size(length, size, split)
    units = _to_units(values, unit, split)
    if unit == size:
        unit_scales = scales if split is None else split.place(scales)
    else:
        unit_scales = _unit_scales(scales, units.shape[-2], size // unit, split)
    x = _from_units(units * unit_scales[..., None], length, split)
    return x if leaf is None or split is not None else leaf.place(x)


def _pack(codes: jax.Array, split: _Split | None = None) -> jax.Array:
    """Two 4-bit codes per byte along the last axis (an odd axis gets one pad code)."""
    *lead, length = codes.shape
    if length % 2:
        codes = jnp.pad(codes, [(0, 0)] * len(lead) + [(0, 1)])
    pairs = _reshape(codes, (*lead, (length + 1) // 2, 2), split)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def _unpack(packed: jax.Array, length: int, split: _Split | None = None) -> jax.Array:
    codes = jnp.stack([packed & 15, packed >> 4], axis=-1)
    codes = _reshape(codes, (*packed.shape[:-1], 2 * packed.shape[-1]), split)
    return codes if codes.shape[-1] == length else codes[..., :length]


def quantized(bits: int = 8, block_size: int | None = None, *, min_size: int = 4096) -> Quantized:
    r"""Stores a moment in ``bits`` bits per entry, blockwise (8-bit or 4-bit Adam).

    Pass it as ``mu_dtype=`` or ``nu_dtype=`` to a moment stage or an
    optimizer. The EMA is still computed in float32; only the buffer kept
    between steps is quantized: per block of ``block_size`` entries along the
    last axis, one float32 scale (the block's largest magnitude) and one code
    per entry. Signal and noise get their own code maps (see
    :class:`Quantized`): the signal's is signed, the noise's is positive and
    never decodes to 0, so the ratio :math:`m / (\sqrt v + \epsilon)` cannot
    blow up because a small noise was rounded away.

    State per entry: 1 byte (8 bits) or half a byte (4 bits, two codes per
    byte), plus ``4 / block_size`` bytes of scale. Leaves with fewer than
    ``min_size`` entries, scalars and complex leaves stay in float32.

    Args:
      bits: 8 or 4.
      block_size: entries per scale, ``>= 1``; default 256
        at 8 bits and 128 at 4 bits (bitsandbytes' and torchao's choices).
        At 4 bits, smaller blocks remember the noise better over long runs:
        on the benchmark's language model, 32 brought the loss gap to
        float32 from +6.1% to +3.4% (see ``benchmarks/README.md``).
        Blocks run along the last axis, so they shard with it, on
        auto-sharded meshes and on meshes with ``AxisType.Explicit`` axes
        alike; where a shard holds only part of a block, one maximum per
        part crosses devices, never the entries.
      min_size: leaves with fewer entries stay float32, ``>= 0``.

    Returns:
      A :class:`Quantized` format.

    Raises:
      ValueError: for other bit widths, non-positive block sizes or min_size.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax_snr
      >>> fmt = optax_snr.quantized(bits=4, min_size=1)
      >>> stored = fmt.init(jnp.zeros(4), signed=False)
      >>> stored = fmt.encode(jnp.array([1.0, 0.3, 1e-3, 0.0]), stored)
      >>> stored.codes.dtype, stored.codes.shape  # two codes per byte
      (dtype('uint8'), (2,))
      >>> stored.decode()  # the noise map has no zero
      Array([1.0000000e+00, 3.1640625e-01, 1.2359619e-03, 1.5258789e-05], dtype=float32)

    References:
      Dettmers et al., `8-bit Optimizers via Block-wise Quantization
      <https://arxiv.org/abs/2110.02861>`_, ICLR 2022. Li et al., `Memory
      Efficient Optimizers with 4-bit States <https://arxiv.org/abs/2309.01507>`_,
      NeurIPS 2023 (the zero-point problem of the second moment).
    """
    if isinstance(bits, bool) or bits not in (4, 8):
        raise ValueError(f"bits must be 8 or 4, got {bits!r}.")
    if block_size is None:
        block_size = 256 if bits == 8 else 128
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}.")
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 0:
        raise ValueError(f"min_size must be an integer >= 0, got {min_size!r}.")
    return Quantized(bits=bits, block_size=block_size, min_size=min_size)


def block_layout(stored: QuantizedMoment) -> tuple[int, int, int, int]:
    """``(rows, length, count, size)`` of a stored leaf: its leading axes flattened
    into rows, the last axis's length, and the number and size of its blocks."""
    *lead, length = stored.shape
    return (math.prod(lead), length, *_blocks(length, stored.format.block_size))
