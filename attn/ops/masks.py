"""Attention masks: constructors, combinators and the dtype-safe fill value.

A mask is a boolean array, True where a query may attend to a key, with four dimensions that
broadcast against the logits `[B, N, T, S]` (batch, query heads, query length, key length), as in
`jax.nn.dot_product_attention`. Constructors return the smallest broadcastable shape
(`[1, 1, T, S]` for position-only masks, `[B, 1, T, S]` for per-example ones), so they combine
with `&` or `and_masks` without materialising `B x N` copies.

Positions and alignment. Query `i` sits at absolute position `i + q_offset` and key `j` at `j`.
The default `q_offset=0` aligns the first query with the first key ("top-left"), which is what
`jax.nn.dot_product_attention(is_causal=True)` does when `T != S`: query 0 sees key 0 only. For
incremental decoding, where the `T` new queries are the last `T` positions of the `S` keys, use
`q_offset = S - T` ("bottom-right", FlashAttention's convention). `kv_offset` likewise shifts
the keys, so the same constructors describe any tile of a larger mask (blockwise attention).
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def large_negative(dtype: jnp.dtype = jnp.float32) -> Array:
  """The fill value for masked logits: large, negative and finite in `dtype`.

  The classic -1e9 is -inf in float16 (max 65504), and -inf turns a fully masked softmax row into
  NaN. 0.7 x the largest finite value leaves headroom for adding a bias without overflowing.
  Capped at the float32 range because softmax always runs in float32.
  """
  dtype_max = min(float(jnp.finfo(dtype).max), float(jnp.finfo(jnp.float32).max))
  return jnp.asarray(-0.7 * dtype_max, dtype=dtype)


def _positions(q_len: int, kv_len: int, q_offset: int | Array,
               kv_offset: int | Array = 0) -> tuple[Array, Array]:
  """Absolute query positions `[T, 1]` and key positions `[1, S]`."""
  q_pos = jnp.arange(q_len, dtype=jnp.int32)[:, None] + q_offset
  k_pos = jnp.arange(kv_len, dtype=jnp.int32)[None, :] + kv_offset
  return q_pos, k_pos


def causal_mask(q_len: int, kv_len: int, *, q_offset: int | Array = 0,
                kv_offset: int | Array = 0) -> Array:
  """`[1, 1, T, S]`: query at position p sees keys at positions <= p (Vaswani et al. 2017)."""
  q_pos, k_pos = _positions(q_len, kv_len, q_offset, kv_offset)
  return (k_pos <= q_pos)[None, None]


def local_window_mask(
    q_len: int, kv_len: int, window: int | tuple[int, int], *, q_offset: int | Array = 0,
    kv_offset: int | Array = 0,
) -> Array:
  """`[1, 1, T, S]`: query at p sees keys in [p - left, p + right] (sliding window).

  `window` is `(left, right)` or an int for a symmetric window, as `local_window_size` in
  `jax.nn.dot_product_attention`. Combine with `causal_mask` (or use right=0) for the causal
  sliding window of Longformer / Mistral.
  """
  left, right = normalize_window(window)
  q_pos, k_pos = _positions(q_len, kv_len, q_offset, kv_offset)
  return ((k_pos >= q_pos - left) & (k_pos <= q_pos + right))[None, None]


def chunked_causal_mask(
    q_len: int, kv_len: int, chunk_size: int, *, q_offset: int | Array = 0,
    kv_offset: int | Array = 0,
) -> Array:
  """`[1, 1, T, S]`: causal attention inside consecutive chunks of `chunk_size` positions.

  A query sees the earlier keys of its own chunk only (the chunked local attention of Llama 4 and
  of block-local Transformers).
  """
  if chunk_size <= 0:
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size}.")
  q_pos, k_pos = _positions(q_len, kv_len, q_offset, kv_offset)
  same_chunk = (q_pos // chunk_size) == (k_pos // chunk_size)
  return ((k_pos <= q_pos) & same_chunk)[None, None]


def padding_mask(
    q_len: int,
    kv_len: int,
    query_seq_lengths: Array | None = None,
    key_value_seq_lengths: Array | None = None,
    *,
    q_offset: int | Array = 0,
    kv_offset: int | Array = 0,
) -> Array:
  """`[B, 1, T, S]` from per-example lengths: only the first `length` tokens are real.

  Padded keys are never attended; padded query rows see nothing (their output is zero).
  """
  if query_seq_lengths is None and key_value_seq_lengths is None:
    raise ValueError("padding_mask needs query_seq_lengths or key_value_seq_lengths.")
  q_pos, k_pos = _positions(q_len, kv_len, q_offset, kv_offset)
  mask = jnp.ones((1, q_len, kv_len), dtype=bool)
  if query_seq_lengths is not None:
    mask = mask & (q_pos[None] < jnp.asarray(query_seq_lengths)[:, None, None])
  if key_value_seq_lengths is not None:
    mask = mask & (k_pos[None] < jnp.asarray(key_value_seq_lengths)[:, None, None])
  return mask[:, None]


def segment_mask(q_segment_ids: Array, kv_segment_ids: Array | None = None) -> Array:
  """`[B, 1, T, S]` for packed sequences: a query sees keys of the same segment only.

  Segment ids are ints `[B, T]` (and `[B, S]` for the keys; defaults to the query ids). Only
  equality matters; give padding its own id (0 by convention) and, if padded queries must output
  zeros, add a padding mask as well.
  """
  if kv_segment_ids is None:
    kv_segment_ids = q_segment_ids
  q_ids, kv_ids = jnp.asarray(q_segment_ids), jnp.asarray(kv_segment_ids)
  return (q_ids[:, :, None] == kv_ids[:, None, :])[:, None]


def prefix_lm_mask(
    prefix_lengths: Array, q_len: int, kv_len: int, *, q_offset: int | Array = 0,
    kv_offset: int | Array = 0,
) -> Array:
  """`[B, 1, T, S]` prefix-LM (Raffel et al. 2020): every query sees the whole prefix, the rest
  is causal. `prefix_lengths` is `[B]`: key j is in the prefix when j < prefix_lengths[b]."""
  q_pos, k_pos = _positions(q_len, kv_len, q_offset, kv_offset)
  in_prefix = k_pos[None] < jnp.asarray(prefix_lengths)[:, None, None]
  return ((k_pos <= q_pos)[None] | in_prefix)[:, None]


def and_masks(*masks: Array | None) -> Array | None:
  """Logical AND of the given masks (None entries are ignored; all None gives None)."""
  present = [m for m in masks if m is not None]
  if not present:
    return None
  out = present[0]
  for m in present[1:]:
    out = jnp.logical_and(out, m)
  return out


def or_masks(*masks: Array | None) -> Array | None:
  """Logical OR of the given masks (None entries are ignored; all None gives None)."""
  present = [m for m in masks if m is not None]
  if not present:
    return None
  out = present[0]
  for m in present[1:]:
    out = jnp.logical_or(out, m)
  return out


def mask_to_bias(mask: Array, dtype: jnp.dtype = jnp.float32) -> Array:
  """An additive bias equivalent to `mask`: 0 where True, `large_negative(dtype)` where False.

  Prefer passing boolean masks: only a boolean mask lets a fully masked row return exactly zero.
  """
  return jnp.where(mask, jnp.zeros((), dtype), large_negative(dtype))


def normalize_window(window: int | Sequence[int]) -> tuple[int, int]:
  """`(left, right)` from an int (symmetric) or a pair; both must be non-negative ints."""
  if isinstance(window, (int, np.integer)):
    window = (int(window), int(window))
  window = tuple(window)
  if len(window) != 2 or not all(isinstance(w, (int, np.integer)) and w >= 0 for w in window):
    raise ValueError(
        f"local_window_size must be an int or a (left, right) pair of non-negative ints, got "
        f"{window!r}."
    )
  return int(window[0]), int(window[1])


def make_attention_mask(
    q_len: int,
    kv_len: int,
    *,
    mask: Array | None = None,
    is_causal: bool = False,
    query_seq_lengths: Array | None = None,
    key_value_seq_lengths: Array | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    segment_ids: Array | tuple[Array, Array] | None = None,
    prefix_lengths: Array | None = None,
    chunk_size: int | None = None,
    q_offset: int | Array = 0,
    kv_offset: int | Array = 0,
) -> Array | None:
  """Every mask kind requested, combined with AND; None when nothing masks anything.

  `prefix_lengths` gives a prefix-LM mask, which is causal outside the prefix, so it replaces
  `is_causal` instead of being intersected with it.
  """
  if isinstance(segment_ids, (tuple, list)):
    seg_mask = segment_mask(*segment_ids)
  elif segment_ids is not None:
    seg_mask = segment_mask(segment_ids)
  else:
    seg_mask = None
  offsets = dict(q_offset=q_offset, kv_offset=kv_offset)
  if prefix_lengths is not None:
    order_mask = prefix_lm_mask(prefix_lengths, q_len, kv_len, **offsets)
  elif is_causal:
    order_mask = causal_mask(q_len, kv_len, **offsets)
  else:
    order_mask = None
  has_lengths = query_seq_lengths is not None or key_value_seq_lengths is not None
  return and_masks(
      mask,
      order_mask,
      local_window_mask(q_len, kv_len, local_window_size, **offsets)
      if local_window_size is not None
      else None,
      chunked_causal_mask(q_len, kv_len, chunk_size, **offsets)
      if chunk_size is not None
      else None,
      padding_mask(q_len, kv_len, query_seq_lengths, key_value_seq_lengths, **offsets)
      if has_lengths
      else None,
      seg_mask,
  )


def zero_rows_without_keys(out: Array, mask: Array) -> Array:
  """`out` `[B, T, N, Hv]` with every query row that `mask` `[B|1, N|1, T, S]` leaves without a
  key set to zero (which also zeroes its gradients).

  For kernels that return something else there (the mean of the values, or NaN).
  """
  sees_a_key = jnp.any(mask, axis=-1).transpose(0, 2, 1)[..., None]  # [B|1, T, N|1, 1]
  return jnp.where(sees_a_key, out, jnp.zeros((), out.dtype))
