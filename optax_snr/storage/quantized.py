"""Blockwise 8- and 4-bit moments: one float32 scale per block, one code per entry."""

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

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


# Jitted (inlined into an enclosing jit) so that the block reshapes of a sharded
# leaf are left to XLA's sharding propagation, also when called eagerly.
@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _encode(x, bits, block_size, shape, signed):
    *lead, length = shape
    count, size = _blocks(length, block_size)
    pad = count * size - length
    x = x.astype(jnp.float32)
    if not signed:
        x = jnp.maximum(x, 0.0)
    blocks = jnp.pad(x, [(0, 0)] * len(lead) + [(0, pad)]).reshape(*lead, count, size)
    scales = jnp.max(jnp.abs(blocks), axis=-1)
    safe = jnp.where(scales > 0, scales, 1.0)[..., None]
    levels = jnp.asarray(_levels(bits, signed), jnp.float32)
    if signed:  # k = round(H sqrt(|x| / a)) with x's sign; stored as k + H.
        k = jnp.round(levels * jnp.sqrt(jnp.abs(blocks) / safe))
        codes = jnp.sign(blocks) * k + levels
    else:  # k = round(N (v / a)^(1/4)) - 1, at least 0.
        k = jnp.round(levels * jnp.sqrt(jnp.sqrt(blocks / safe))) - 1.0
        codes = jnp.clip(k, 0.0, levels - 1.0)
    codes = codes.astype(jnp.uint8).reshape(*lead, count * size)[..., :length]
    if bits == 4:
        codes = _pack(codes)
    return codes, scales


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _decode(codes, scales, bits, block_size, shape, signed):
    *lead, length = shape
    count, size = _blocks(length, block_size)
    if bits == 4:
        codes = _unpack(codes, length)
    codes = codes.astype(jnp.float32)
    levels = jnp.asarray(_levels(bits, signed), jnp.float32)
    if signed:
        k = codes - levels
        unit = jnp.sign(k) * jnp.square(k / levels)
    else:
        unit = jnp.square(jnp.square((codes + 1.0) / levels))
    pad = count * size - length
    unit = jnp.pad(unit, [(0, 0)] * len(lead) + [(0, pad)]).reshape(*lead, count, size)
    x = unit * scales[..., None]
    return x.reshape(*lead, count * size)[..., :length]


def _pack(codes: jax.Array) -> jax.Array:
    """Two 4-bit codes per byte along the last axis (an odd axis gets one pad code)."""
    *lead, length = codes.shape
    if length % 2:
        codes = jnp.pad(codes, [(0, 0)] * len(lead) + [(0, 1)])
    pairs = codes.reshape(*lead, -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def _unpack(packed: jax.Array, length: int) -> jax.Array:
    codes = jnp.stack([packed & 15, packed >> 4], axis=-1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :length]


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
        Blocks run along the last axis, so they shard with it.
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
