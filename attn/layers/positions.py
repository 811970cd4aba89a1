"""Position-encoding modules: learned absolute (1-D and ViT grid), T5 relative bias, fixed wrappers.

The math lives in `attn.ops.positions`; these modules own the parameters (with logical axis
names, so the mesh rules in the config decide their sharding) or wrap a fixed table so that
every position kind is a module the model can pick by name. Encodings that are added to the
token embedding return [B, T, D] (or [1, L, D] for a patch grid) so the caller adds them without
implicit rank promotion.

Shape letters:
  B: batch   T: query length   S: key length   N: heads   D: model width
  L: number of patches (height * width)   K: relative-position buckets
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn.ops import positions as pos_ops

__all__ = [
  "LearnedPositionEmbedding",
  "LearnedPositionEmbedding2D",
  "SinCos2DPositionEmbedding",
  "SinusoidalPositionEmbedding",
  "T5RelativePositionBias",
]

Dtype = jnp.dtype | type
Initializer = jax.nn.initializers.Initializer

# Small enough that adding it to a token embedding does not swamp the tokens at init
# (BERT and ViT initialize position tables at std 0.02).
_default_embedding_init = nn.initializers.normal(stddev=0.02)


class LearnedPositionEmbedding(nn.Module):
  """Learned absolute position embedding (BERT, GPT-2) looked up by position id.

  Attributes:
    max_length: number of positions in the table; ids must lie in [0, max_length).
    features: embedding width D.
    embedding_init: initializer of the [max_length, D] table.
    dtype: output dtype (None: param_dtype).
    param_dtype: dtype of the table.
  """

  max_length: int
  features: int
  embedding_init: Initializer = _default_embedding_init
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, positions_BT: jax.Array) -> jax.Array:
    """Returns the [B, T, D] embeddings of integer positions [B, T]."""
    table = self.param(
      "embedding",
      nn.with_logical_partitioning(self.embedding_init, ("length", "embed")),
      (self.max_length, self.features),
      self.param_dtype,
    )
    # jnp.take's default out-of-range mode fills with NaN: loud, where clipping would silently
    # reuse the last position for every id past max_length.
    out = jnp.take(table, positions_BT, axis=0)
    return out.astype(self.dtype or self.param_dtype)


class LearnedPositionEmbedding2D(nn.Module):
  """Learned position embedding of a ViT patch grid (Dosovitskiy et al. 2021).

  The table is stored as a [height, width, D] grid, so it can be resized (interpolated) for
  another resolution when fine-tuning; the call flattens it in row-major patch order.

  Attributes:
    height: patch rows.
    width: patch columns.
    features: embedding width D.
    embedding_init: initializer of the grid.
    dtype: output dtype (None: param_dtype).
    param_dtype: dtype of the grid.
  """

  height: int
  width: int
  features: int
  embedding_init: Initializer = _default_embedding_init
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self) -> jax.Array:
    """Returns [1, height * width, D], to add to the flattened patch tokens [B, L, D]."""
    grid = self.param(
      "embedding",
      # Rows and columns are tiny and never sharded; only the width follows the mesh rules.
      nn.with_logical_partitioning(self.embedding_init, (None, None, "embed")),
      (self.height, self.width, self.features),
      self.param_dtype,
    )
    out = grid.reshape(1, self.height * self.width, self.features)
    return out.astype(self.dtype or self.param_dtype)


class SinusoidalPositionEmbedding(nn.Module):
  """Fixed sinusoidal encoding (Vaswani et al. 2017) by position id; no parameters.

  Attributes:
    features: encoding width D (even).
    base: the wavelength base.
    dtype: output dtype.
  """

  features: int
  base: float = 10000.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, positions_BT: jax.Array) -> jax.Array:
    """Returns the [B, T, D] encodings of integer positions [B, T]."""
    return pos_ops.sinusoidal(positions_BT, self.features, base=self.base).astype(self.dtype)


class SinCos2DPositionEmbedding(nn.Module):
  """Fixed 2-D sin-cos encoding of a ViT patch grid (MAE); no parameters.

  Attributes:
    height: patch rows.
    width: patch columns.
    features: encoding width D (a multiple of 4).
    base: the wavelength base.
    dtype: output dtype.
  """

  height: int
  width: int
  features: int
  base: float = 10000.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self) -> jax.Array:
    """Returns [1, height * width, D], to add to the flattened patch tokens [B, L, D]."""
    table = pos_ops.sincos_2d(self.height, self.width, self.features, base=self.base)
    return table[None].astype(self.dtype)


class T5RelativePositionBias(nn.Module):
  """T5 relative position bias (Raffel et al. 2020): a learned scalar per (bucket, head).

  T5 computes it once per stack and shares it across layers; whether to share is the caller's
  choice (create one instance and reuse its output, or one per layer).

  Attributes:
    num_heads: attention heads N.
    bidirectional: True for encoders, False for causal decoders.
    num_buckets: K, buckets of `t5_relative_position_bucket`.
    max_distance: distances at or beyond it share the last bucket.
    embedding_init: initializer of the [K, N] table.
    dtype: output dtype (None: param_dtype).
    param_dtype: dtype of the table.
  """

  num_heads: int
  bidirectional: bool
  num_buckets: int = 32
  max_distance: int = 128
  embedding_init: Initializer = nn.initializers.normal(stddev=1.0)
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, q_positions_BT: jax.Array, k_positions_BS: jax.Array) -> jax.Array:
    """Returns the additive attention bias [B, N, T, S] for query and key positions."""
    table_KN = self.param(
      "rel_embedding",
      nn.with_logical_partitioning(self.embedding_init, ("relpos_buckets", "heads")),
      (self.num_buckets, self.num_heads),
      self.param_dtype,
    )
    relative_BTS = k_positions_BS[:, None, :] - q_positions_BT[:, :, None]
    buckets_BTS = pos_ops.t5_relative_position_bucket(
      relative_BTS,
      bidirectional=self.bidirectional,
      num_buckets=self.num_buckets,
      max_distance=self.max_distance,
    )
    # Bucket ids are in range by construction; "clip" just spares the gather a NaN-fill path.
    bias_BTSN = jnp.take(table_KN, buckets_BTS, axis=0, mode="clip")
    return jnp.transpose(bias_BTSN, (0, 3, 1, 2)).astype(self.dtype or self.param_dtype)
