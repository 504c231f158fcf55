"""Suite-wide settings: strict dtype promotion and rank-promotion errors.

Every test runs under ``jax.numpy_dtype_promotion("strict")`` so that an
implicit cast anywhere in the library fails loudly. ``optax`` itself does not
run under strict promotion (``optax.adam`` raises ``TypePromotionError``), so
the reference runs in ``helpers.standard_promotion()``.
"""

import chex
import jax
import pytest

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def x64():
    """Enables float64 for one test and restores the previous setting."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


@pytest.fixture(autouse=True)
def _fresh_trace_counter():
    """chex.assert_max_traces keys its counter by a function's source text, so two
    tests with an identically written ``step`` would count each other's traces."""
    chex.clear_trace_counter()
