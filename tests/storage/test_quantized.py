"""quantized: blockwise 8- and 4-bit codes, error bounds, packing, the zero-free noise map."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import optax_snr

SHAPES = [(1,), (7,), (300,), (1000,), (5, 3), (4, 257), (2, 3, 130), (64, 128)]


def _signal(shape, seed=0):
    """Signed values whose magnitudes span six orders of magnitude."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=shape) * 10.0 ** rng.uniform(-6, 0, size=shape), jnp.float32)


def _noise(shape, seed=0):
    """Positive values spanning 30 orders of magnitude, with a few exact zeros."""
    rng = np.random.default_rng(seed)
    v = 10.0 ** rng.uniform(-30, 0, size=shape)
    v[rng.uniform(size=shape) < 0.05] = 0.0
    return jnp.asarray(v, jnp.float32)


def _round_trip(fmt, x, signed):
    return fmt.encode(x, fmt.init(x, signed=signed)).decode()


def _block_scales(x, fmt):
    """Each entry's block maximum |x|, computed independently of the implementation."""
    x = np.abs(np.asarray(x, np.float64))
    length = x.shape[-1]
    count = -(-length // fmt.block_size)
    size = -(-length // count)
    out = np.empty_like(x)
    for start in range(0, length, size):
        block = x[..., start : start + size]
        out[..., start : start + size] = block.max(axis=-1, keepdims=True)
    return out


class QuantizedTest(parameterized.TestCase):
    @parameterized.product(bits=[8, 4], shape=SHAPES)
    def test_signal_error_is_bounded_by_the_code_spacing(self, bits, shape):
        fmt = optax_snr.quantized(bits=bits, block_size=64 if bits == 4 else 128, min_size=0)
        x = _signal(shape)
        y = _round_trip(fmt, x, signed=True)
        chex.assert_shape(y, shape)
        chex.assert_type(y, jnp.float32)
        # x = a sign(k) (k / H)^2, rounded in sqrt(|x| / a): |error| <= a (1/H + 1/(4H^2)).
        h = 2 ** (bits - 1) - 1
        bound = _block_scales(x, fmt) * (1.0 / h + 0.25 / h**2) * (1 + 1e-5)
        assert np.all(np.abs(np.asarray(y) - np.asarray(x)) <= bound)
        assert np.all(np.sign(np.asarray(y)) * np.sign(np.asarray(x)) >= 0)  # no sign flips

    @parameterized.product(bits=[8, 4], shape=SHAPES)
    def test_noise_error_is_bounded_and_relative_near_the_block_max(self, bits, shape):
        fmt = optax_snr.quantized(bits=bits, min_size=0)
        v = _noise(shape) + jnp.asarray(1e-3, jnp.float32)  # at most 30 bits of range
        y = np.asarray(_round_trip(fmt, v, signed=False), np.float64)
        v = np.asarray(v, np.float64)
        a = _block_scales(v, fmt)
        n = 2**bits
        # v = a ((k + 1) / N)^4, rounded in (v / a)^(1/4): |error| <= a ((t + 1/N)^4 - t^4).
        t = (v / a) ** 0.25
        assert np.all(np.abs(y - v) <= a * ((t + 1.0 / n) ** 4 - t**4) * (1 + 1e-5))
        near_max = v >= 0.1 * a
        relative = {8: 0.02, 4: 0.3}[bits]
        assert np.all(np.abs(y - v)[near_max] <= relative * v[near_max])
        np.testing.assert_array_equal(y.max(axis=-1), v.max(axis=-1))  # the max is exact

    @parameterized.parameters(8, 4)
    def test_noise_never_decodes_to_zero(self, bits):
        fmt = optax_snr.quantized(bits=bits, min_size=0)
        v = _noise((16, 512))
        y = np.asarray(_round_trip(fmt, v, signed=False))
        positive = np.asarray(v) > 0
        assert positive.sum() > 7000
        assert np.all(y[positive] > 0)
        assert np.all(y >= 0)

    @parameterized.parameters(8, 4)
    def test_all_zero_blocks_decode_to_zero(self, bits):
        fmt = optax_snr.quantized(bits=bits, block_size=4, min_size=0)
        v = jnp.asarray([0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 2.0, 3.0], jnp.float32)
        for signed in (True, False):
            y = np.asarray(_round_trip(fmt, v, signed=signed))
            np.testing.assert_array_equal(y[:4], 0.0)
            assert y[7] == 3.0 and y[4] > 0.9  # the block max is exact
        assert _round_trip(fmt, v, signed=True)[5] == 0.0  # the signal has a zero code

    @parameterized.parameters((8, 1.0), (4, 0.5))
    def test_codes_take_bits_per_entry_and_scales_one_float_per_block(self, bits, bytes_per_entry):
        fmt = optax_snr.quantized(bits=bits, block_size=100, min_size=0)
        stored = fmt.init(jnp.zeros((6, 1000)), signed=True)
        chex.assert_type(stored.codes, jnp.uint8)
        chex.assert_type(stored.scales, jnp.float32)
        chex.assert_shape(stored.codes, (6, int(1000 * bytes_per_entry)))
        chex.assert_shape(stored.scales, (6, 10))
        assert stored.shape == (6, 1000) and stored.signed

    @parameterized.parameters(1, 2, 3, 15, 16)
    def test_four_bit_codes_are_packed_two_per_byte(self, length):
        fmt = optax_snr.quantized(bits=4, min_size=0)
        v = jnp.arange(1, length + 1, dtype=jnp.float32) ** 4  # (v/a)^(1/4) is linear
        stored = fmt.encode(v, fmt.init(v, signed=False))
        chex.assert_shape(stored.codes, (-(-length // 2),))
        codes = np.asarray(stored.codes)
        nibbles = np.stack([codes & 15, codes >> 4], axis=-1).reshape(-1)[:length]
        expected = np.clip(np.round(16 * np.arange(1, length + 1) / length) - 1, 0, 15)
        np.testing.assert_array_equal(nibbles, expected)
        chex.assert_shape(stored.decode(), (length,))

    def test_encode_is_deterministic_and_jittable(self):
        fmt = optax_snr.quantized(bits=4, min_size=0)
        x = _signal((8, 100))
        stored = fmt.init(x, signed=True)
        eager = fmt.encode(x, stored)
        jitted = jax.jit(fmt.encode)(x, stored)
        chex.assert_trees_all_equal(eager, jitted)
        chex.assert_trees_all_equal(jax.jit(lambda s: s.decode())(eager), eager.decode())

    def test_formats_compare_by_value_and_print_their_arguments(self):
        assert optax_snr.quantized(4) == optax_snr.quantized(bits=4, block_size=128)
        assert optax_snr.quantized(8) != optax_snr.quantized(4)
        assert repr(optax_snr.quantized(4, 64, min_size=10)) == (
            "quantized(bits=4, block_size=64, min_size=10)"
        )

    @parameterized.parameters(
        ({"bits": 3}, "bits must be 8 or 4"),
        ({"bits": 16}, "bits must be 8 or 4"),
        ({"bits": True}, "bits must be 8 or 4"),
        ({"block_size": 0}, "block_size must be a positive integer"),
        ({"block_size": -4}, "block_size must be a positive integer"),
        ({"block_size": 2.5}, "block_size must be a positive integer"),
        ({"min_size": -1}, "min_size must be an integer >= 0"),
    )
    def test_bad_arguments_raise(self, kwargs, message):
        with pytest.raises(ValueError, match=message):
            optax_snr.quantized(**kwargs)
