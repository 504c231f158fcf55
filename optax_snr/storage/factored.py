"""The noise of a matrix as its row and column means (Adafactor's rank-1 form)."""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from optax_snr.storage.base import StorageFormat, StoredMoment, register_stored

__all__ = ["Factored", "FactoredMoment", "factored"]


@register_stored
@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["row", "col"],
    meta_fields=["format", "shape", "signed"],
)
@dataclasses.dataclass(frozen=True, eq=False)
class FactoredMoment(StoredMoment):
    """A noise leaf in :func:`factored` form."""

    row: jax.Array  # float32, shape[:-1]: the mean over the last axis.
    col: jax.Array  # float32, shape[:-2] + shape[-1:]: the mean over the second-to-last.
    format: StorageFormat  # A Factored.
    shape: tuple[int, ...]
    signed: bool


@dataclasses.dataclass(frozen=True)
class Factored(StorageFormat):
    """Rank-1 factored noise; build it with :func:`factored`."""

    min_dim_size: int = 128
    min_size: int = 0

    def __repr__(self) -> str:
        return f"factored(min_dim_size={self.min_dim_size}, min_size={self.min_size})"

    def stores(self, leaf: Any) -> bool:
        return (
            super().stores(leaf)
            and len(leaf.shape) >= 2
            and min(leaf.shape[-2:]) >= self.min_dim_size
        )

    def check_moment(self, name: str, signed: bool) -> None:
        if signed:
            raise ValueError(
                f"{name}: factored() keeps only a positive moment (the noise, "
                "nu_dtype=); a signed moment such as the signal cannot be "
                "rebuilt from its row and column means."
            )

    def init(self, leaf: Any, *, signed: bool, seed: int = 0) -> FactoredMoment:
        del seed
        zeros = jnp.zeros_like(leaf, dtype=jnp.float32)
        return self.encode(zeros, FactoredMoment(None, None, self, tuple(leaf.shape), signed))

    def encode(self, x: jax.Array, stored: FactoredMoment) -> FactoredMoment:
        x = x.astype(jnp.float32)
        row, col = jnp.mean(x, axis=-1), jnp.mean(x, axis=-2)
        return FactoredMoment(row, col, self, stored.shape, stored.signed)

    def decode(self, stored: FactoredMoment) -> jax.Array:
        total = jnp.mean(stored.row, axis=-1, keepdims=True)  # = mean(col), the leaf's mean
        safe = jnp.where(total > 0, total, 1.0)
        scaled_row = jnp.where(total > 0, stored.row / safe, 0.0)
        return scaled_row[..., :, None] * stored.col[..., None, :]


def factored(min_dim_size: int = 128, *, min_size: int = 0) -> Factored:
    r"""Stores the noise of a matrix as its row and column means (Adafactor).

    For ``nu_dtype=`` only. A leaf with at least two axes whose last two are
    both at least ``min_dim_size`` long keeps, instead of :math:`v`, its means
    over rows :math:`R` and over columns :math:`C`, and the noise is rebuilt
    as the rank-1 matrix :math:`\tilde v_{ij} = R_i C_j / \bar R` (the mean
    of :math:`R` is the mean of :math:`v`). Since the rebuilt matrix has the
    same row and column means, the stored means follow exactly Adafactor's
    EMAs of the row and column means of :math:`g^2`. The state of an
    :math:`n \times m` leaf is :math:`n + m` floats instead of :math:`nm`;
    other leaves stay dense in float32. Leading axes (a stack of matrices) are
    kept.

    Args:
      min_dim_size: the shortest last-two axes that are factored, ``>= 1``.
      min_size: leaves with fewer entries stay float32, ``>= 0``.

    Returns:
      A :class:`Factored` format.

    Raises:
      ValueError: for a ``min_dim_size`` below 1 or a negative ``min_size``;
        when given as ``mu_dtype`` (the signal is signed).

    Example:
      >>> import jax.numpy as jnp
      >>> import optax_snr
      >>> fmt = optax_snr.factored(min_dim_size=2)
      >>> v = jnp.array([[1.0, 2.0], [3.0, 6.0]])  # rank 1: kept exactly
      >>> stored = fmt.encode(v, fmt.init(v, signed=False))
      >>> stored.row, stored.col
      (Array([1.5, 4.5], dtype=float32), Array([2., 4.], dtype=float32))
      >>> stored.decode()
      Array([[1., 2.],
             [3., 6.]], dtype=float32)

    References:
      Shazeer & Stern, `Adafactor: Adaptive Learning Rates with Sublinear
      Memory Cost <https://arxiv.org/abs/1804.04235>`_, ICML 2018.
    """
    if isinstance(min_dim_size, bool) or not isinstance(min_dim_size, int) or min_dim_size < 1:
        raise ValueError(f"min_dim_size must be a positive integer, got {min_dim_size!r}.")
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 0:
        raise ValueError(f"min_size must be an integer >= 0, got {min_size!r}.")
    return Factored(min_dim_size=min_dim_size, min_size=min_size)
