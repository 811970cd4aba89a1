"""Position encodings as pure functions: sinusoidal tables, RoPE, ALiBi and T5 buckets.

Nothing here owns parameters; the learned variants live in `attn.layers.positions`. Positions
are integer arrays rather than lengths, so packed sequences (positions restarting at 0 in every
segment) and KV-cache decoding (positions offset by the cache index) need no special case.

Shape letters:
  B: batch   T: query length   S: key length   N: heads   H: head_dim   D: model width
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  "alibi_bias",
  "alibi_slopes",
  "apply_rope",
  "sinusoidal",
  "sinusoidal_table",
  "sincos_2d",
  "t5_relative_position_bucket",
]


def _inverse_frequencies(dim: int, base: float) -> jax.Array:
  """1 / base^(2i/dim) for i in [0, dim/2), in float32."""
  exponents = np.arange(0, dim, 2, dtype=np.float64) / dim
  # Built in float64 NumPy so the table itself carries no float32 rounding of base**x.
  return jnp.asarray(base**-exponents, dtype=jnp.float32)


def _angles(positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """positions[..., None] * inv_freq in float32, with explicit ranks (no rank promotion)."""
  positions = jnp.asarray(positions, jnp.float32)
  return positions[..., None] * inv_freq.reshape((1,) * positions.ndim + inv_freq.shape)


def sinusoidal(positions: jax.Array, dim: int, *, base: float = 10000.0) -> jax.Array:
  """Fixed sinusoidal encoding of Vaswani et al. (2017), section 3.5.

  PE[pos, 2i] = sin(pos / base^(2i/dim)) and PE[pos, 2i+1] = cos(pos / base^(2i/dim)): sines
  and cosines are interleaved channel by channel, exactly as the paper writes it.

  Args:
    positions: integer array of any shape [...], e.g. [B, T] per-segment positions.
    dim: encoding width; must be even.
    base: the wavelength base (10000 in the paper).

  Returns:
    float32 array [..., dim].
  """
  if dim <= 0 or dim % 2:
    raise ValueError(f"sinusoidal: dim must be a positive even number, got {dim}.")
  inv_freq = _inverse_frequencies(dim, base)
  angles = _angles(positions, inv_freq)  # [..., dim/2]
  # Stack on a new last axis then flatten: channel 2i is sin, channel 2i+1 is cos.
  pe = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  return pe.reshape(*angles.shape[:-1], dim)


def sinusoidal_table(length: int, dim: int, *, base: float = 10000.0) -> jax.Array:
  """The [length, dim] sinusoidal table for positions 0 .. length-1."""
  return sinusoidal(jnp.arange(length), dim, base=base)


def sincos_2d(height: int, width: int, dim: int, *, base: float = 10000.0) -> jax.Array:
  """Fixed 2-D sin-cos encoding of a ViT patch grid (MAE, He et al. 2021).

  The first dim/2 channels are the 1-D `sinusoidal` encoding of the patch row, the last dim/2
  that of the patch column, each with width dim/2 (the MAE recipe, half the channels per axis).

  Args:
    height: number of patch rows.
    width: number of patch columns.
    dim: encoding width; must be divisible by 4.
    base: the wavelength base.

  Returns:
    float32 array [height * width, dim], patches in row-major order (the order of a
    `reshape(B, height * width, D)` of a [B, height, width, D] patch grid).
  """
  if dim <= 0 or dim % 4:
    raise ValueError(f"sincos_2d: dim must be a positive multiple of 4, got {dim}.")
  rows, cols = jnp.meshgrid(jnp.arange(height), jnp.arange(width), indexing="ij")
  pe_rows = sinusoidal(rows.reshape(-1), dim // 2, base=base)
  pe_cols = sinusoidal(cols.reshape(-1), dim // 2, base=base)
  return jnp.concatenate([pe_rows, pe_cols], axis=-1)


def _rotary_width(head_dim: int, fraction: float) -> int:
  """Number of rotated channels; validates that fraction * head_dim is an even integer."""
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"apply_rope: fraction must be in (0, 1], got {fraction}.")
  rotary = round(fraction * head_dim)
  if not math.isclose(rotary, fraction * head_dim, abs_tol=1e-6) or rotary % 2 or rotary == 0:
    raise ValueError(
      f"apply_rope: the rotated width fraction * head_dim = {fraction} * {head_dim} = "
      f"{fraction * head_dim:g} must be a positive even integer (channels rotate in pairs)."
    )
  return rotary


def apply_rope(
  x_BTNH: jax.Array,
  positions_BT: jax.Array,
  *,
  base: float = 10000.0,
  fraction: float = 1.0,
) -> jax.Array:
  """Rotary position embedding (RoPE, Su et al. 2021, "RoFormer").

  Pairing convention: split halves (GPT-NeoX / LLaMA style). Of the R = fraction * H rotated
  channels, channel j is paired with channel j + R/2 and the pair is rotated by the angle
  position * base^(-2j/R). Partial rotation (fraction < 1, as in GPT-NeoX and GPT-J) rotates
  the first R channels and passes the remaining H - R channels through unchanged.

  The rotation is computed in float32 whatever x's dtype; the result is cast back to x's dtype.
  Apply it to queries and keys with their own positions; then q_m . k_n depends on m - n only.

  Args:
    x_BTNH: queries or keys [B, T, N, H].
    positions_BT: integer positions [B, T] (per-segment for packed sequences; offset by the
      cache index when decoding).
    base: the frequency base (10000 in RoFormer; larger values for long context).
    fraction: the share of head_dim to rotate, in (0, 1]; fraction * H must be an even integer.

  Returns:
    array of x's shape and dtype.

  Raises:
    ValueError: if the rotated width is not a positive even integer.
  """
  head_dim = x_BTNH.shape[-1]
  rotary = _rotary_width(head_dim, fraction)
  half = rotary // 2
  inv_freq = _inverse_frequencies(rotary, base)  # [R/2]
  angles_BTK = _angles(positions_BT, inv_freq)
  # Heads share the angles: an explicit head axis, since implicit rank promotion is an error.
  cos = jnp.cos(angles_BTK)[:, :, None, :]
  sin = jnp.sin(angles_BTK)[:, :, None, :]
  x = x_BTNH.astype(jnp.float32)
  x1, x2, rest = x[..., :half], x[..., half:rotary], x[..., rotary:]
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
  return rotated.astype(x_BTNH.dtype)


def alibi_slopes(num_heads: int) -> jax.Array:
  """Per-head ALiBi slopes (Press et al. 2022, "Train Short, Test Long").

  For n heads, n a power of two, the slopes are the geometric sequence 2^(-8/n), 2^(-16/n),
  ..., 2^(-8) (for 8 heads: 1/2, 1/4, ..., 1/256). Otherwise, with p the largest power of two
  below n, the paper's rule takes the p slopes for p heads, then the odd-indexed ones of the
  2p-head sequence (2^(-4/p), 2^(-12/p), ...) for the remaining n - p heads.

  Args:
    num_heads: number of attention heads (>= 1).

  Returns:
    float32 array [num_heads].
  """
  if num_heads < 1:
    raise ValueError(f"alibi_slopes: num_heads must be >= 1, got {num_heads}.")

  def power_of_two(n: int) -> list[float]:
    return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

  p = 2 ** math.floor(math.log2(num_heads))
  slopes = power_of_two(p)
  if p < num_heads:
    slopes += power_of_two(2 * p)[0::2][: num_heads - p]
  return jnp.asarray(slopes, dtype=jnp.float32)


def alibi_bias(
  slopes_N: jax.Array,
  q_positions_BT: jax.Array,
  k_positions_BS: jax.Array,
  *,
  causal: bool,
) -> jax.Array:
  """Additive ALiBi attention bias from query and key positions.

  causal=True gives the paper's form -slope * (i - j) for query position i and key position j.
  It is positive for keys after the query, so it must be combined with the causal mask (which
  removes exactly those). causal=False gives the symmetric -slope * |i - j| for encoders. The
  two agree wherever j <= i.

  Args:
    slopes_N: per-head slopes [N], e.g. from `alibi_slopes`.
    q_positions_BT: integer query positions [B, T].
    k_positions_BS: integer key positions [B, S].
    causal: pick the causal or the symmetric form (see above).

  Returns:
    float32 bias [B, N, T, S], to be added to the attention logits.
  """
  distance_BTS = (
    jnp.asarray(q_positions_BT, jnp.float32)[:, :, None]
    - jnp.asarray(k_positions_BS, jnp.float32)[:, None, :]
  )
  if not causal:
    distance_BTS = jnp.abs(distance_BTS)
  slopes_N = jnp.asarray(slopes_N, jnp.float32)
  return -slopes_N[None, :, None, None] * distance_BTS[:, None, :, :]


def t5_relative_position_bucket(
  relative_position: jax.Array,
  *,
  bidirectional: bool,
  num_buckets: int = 32,
  max_distance: int = 128,
) -> jax.Array:
  """Buckets of T5 relative attention (Raffel et al. 2020; mesh-tensorflow's rule).

  relative_position is key_position - query_position. Distances below max_exact (half the
  buckets available to a direction) get one bucket each; larger ones share buckets spaced
  logarithmically up to max_distance, beyond which everything lands in the last bucket.
  Bidirectional: half the buckets for keys at or before the query, half (offset by
  num_buckets / 2) for keys after it. Causal (bidirectional=False): keys after the query all
  fall in bucket 0, since the causal mask removes them anyway.

  The logarithm is taken in float32, as in mesh-tensorflow, so boundary cases bucket the same.

  Args:
    relative_position: integer array of any shape, key_position - query_position.
    bidirectional: whether keys after the query get their own buckets.
    num_buckets: total number of buckets.
    max_distance: distances at or beyond it share the last bucket of their direction.

  Returns:
    int32 array of relative_position's shape, values in [0, num_buckets).
  """
  n = -jnp.asarray(relative_position, jnp.int32)  # query - key: positive for past keys
  bucket = jnp.zeros_like(n)
  if bidirectional:
    num_buckets //= 2
    bucket = bucket + (n < 0).astype(jnp.int32) * num_buckets
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  # max(n, 1) keeps log() finite where is_small picks the exact bucket anyway.
  log_ratio = jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact) / math.log(
    max_distance / max_exact
  )
  if_large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(jnp.int32)
  if_large = jnp.minimum(if_large, num_buckets - 1)
  return bucket + jnp.where(is_small, n, if_large)
