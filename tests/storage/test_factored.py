"""factored: the noise of a matrix as row and column means (Adafactor's rank-1 form)."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import optax_snr

FMT = optax_snr.factored(min_dim_size=2)


class FactoredTest(parameterized.TestCase):
    @parameterized.parameters((3, 4), (2, 3, 5), (7, 2))
    def test_stores_row_and_column_means(self, *shape):
        v = jax.random.uniform(jax.random.PRNGKey(0), shape, jnp.float32)
        stored = FMT.encode(v, FMT.init(v, signed=False))
        chex.assert_shape(stored.row, shape[:-1])
        chex.assert_shape(stored.col, (*shape[:-2], shape[-1]))
        np.testing.assert_allclose(stored.row, v.mean(-1), rtol=1e-6)
        np.testing.assert_allclose(stored.col, v.mean(-2), rtol=1e-6)
        y = stored.decode()
        chex.assert_shape(y, shape)
        # The rebuilt noise keeps the row and column means, so encoding it again is exact.
        again = FMT.encode(y, stored)
        np.testing.assert_allclose(again.row, stored.row, rtol=1e-5)
        np.testing.assert_allclose(again.col, stored.col, rtol=1e-5)

    def test_a_rank_one_noise_is_kept_exactly(self):
        r = jnp.asarray([1.0, 2.0, 4.0])
        c = jnp.asarray([0.5, 1.0, 3.0, 8.0])
        v = r[:, None] * c[None, :]
        np.testing.assert_allclose(FMT.encode(v, FMT.init(v, signed=False)).decode(), v, rtol=1e-6)

    def test_zero_noise_decodes_to_zero(self):
        v = jnp.zeros((3, 4))
        chex.assert_trees_all_equal(FMT.init(v, signed=False).decode(), v)

    def test_small_and_one_dimensional_leaves_stay_dense(self):
        fmt = optax_snr.factored(min_dim_size=4)
        params = {"vec": jnp.zeros(100), "thin": jnp.zeros((3, 50)), "mat": jnp.zeros((4, 5))}
        nu = optax_snr.ema_moments(nu_dtype=fmt).init(params).nu
        assert isinstance(nu["mat"], optax_snr.FactoredMoment)
        chex.assert_type([nu["vec"], nu["thin"]], jnp.float32)
        chex.assert_shape([nu["vec"], nu["thin"]], [(100,), (3, 50)])

    def test_is_refused_for_the_signal(self):
        message = re.escape("mu_dtype: factored() keeps only a positive")
        with pytest.raises(ValueError, match=message):
            optax_snr.ema_moments(mu_dtype=FMT)
        with pytest.raises(ValueError, match="mu_dtype"):
            optax_snr.adam(1e-3, mu_dtype=FMT)

    @parameterized.parameters(
        ({"min_dim_size": 0}, "min_dim_size must be a positive integer"),
        ({"min_dim_size": 1.5}, "min_dim_size must be a positive integer"),
        ({"min_size": -3}, "min_size must be an integer >= 0"),
    )
    def test_bad_arguments_raise(self, kwargs, message):
        with pytest.raises(ValueError, match=message):
            optax_snr.factored(**kwargs)
