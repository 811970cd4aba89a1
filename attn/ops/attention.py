"""`dot_product_attention`: the one entry point for softmax attention.

A drop-in for `jax.nn.dot_product_attention` (same argument names and meaning where they overlap)
that adds packed-sequence segment ids, prefix-LM and chunked masks, logit soft-capping, attention
dropout, returning the weights, and fully masked rows that return zeros instead of NaN or a mean.

Shapes: B batch, T query length, S key length, N query heads, K key/value heads (N % K == 0;
K == N is MHA, 1 < K < N is GQA, K == 1 is MQA), G = N // K query heads per key head,
H head dim (Hv for values).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from attn.ops import dispatch
from attn.ops import masks as masks_lib
from attn.ops.blockwise import blockwise_attention
from attn.ops.pallas import pallas_attention
from attn.ops.splash import splash_attention

Array = jax.Array

def dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    bias: Array | None = None,
    mask: Array | None = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths: Array | None = None,
    key_value_seq_lengths: Array | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    implementation: str | None = None,
    segment_ids: Array | tuple[Array, Array] | None = None,
    prefix_lengths: Array | None = None,
    chunk_size: int | None = None,
    softcap: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    return_weights: bool = False,
) -> Array | tuple[Array, Array]:
  """Scaled dot-product attention, softmax(Q K^T * scale + bias) V, softmax in float32.

  Args:
    query: `[B, T, N, H]` (or `[T, N, H]`).
    key: `[B, S, K, H]` (or `[S, K, H]`); N must be a multiple of K (GQA / MQA).
    value: `[B, S, K, Hv]` (or `[S, K, Hv]`).
    bias: additive logits bias, 4-D, broadcastable to `[B, N, T, S]` (ALiBi, T5, ...).
    mask: boolean, True = attend, 4-D, broadcastable to `[B, N, T, S]`.
    scale: logit scale; default 1 / sqrt(H).
    is_causal: causal mask, aligned top-left when T != S like jax.nn (see `masks`). Pass it as a
      flag rather than a dense mask: fused kernels then skip the masked blocks.
    query_seq_lengths: int32 `[B]`; query rows past the length output zeros.
    key_value_seq_lengths: int32 `[B]`; keys past the length are never attended.
    local_window_size: `w` or `(left, right)`: query i sees keys in [i - left, i + right].
    implementation: 'xla', 'blockwise' (O(T) memory, pure JAX; no dropout or returned
      weights), 'cudnn' (NVIDIA GPUs), 'pallas' (JAX's Pallas kernels: on TPUs the splash
      kernel, which takes everything but bias, mask, prefix_lengths, dropout and returned
      weights, see `ops/splash.py`; on NVIDIA GPUs the flash kernel, causal and segment ids
      only, T == S; auto picks it where cuDNN cannot run, for bfloat16 at head_dim 128, the
      inputs verified on an H200; auto never picks splash, not yet run on a TPU) or None for
      the best available one that supports the arguments. An explicit choice that cannot run
      raises a ValueError.
    segment_ids: int `[B, T]` (self-attention) or a pair (`[B, T]`, `[B, S]`): packed sequences
      attend within their segment only. The 'pallas' kernels pad with ids of their own, so
      there ids must not be -1 (GPU) or the int32 minimum (TPU).
    prefix_lengths: int `[B]`: prefix-LM, bidirectional over the first tokens, causal after
      (implies causal).
    chunk_size: causal attention inside chunks of this many positions.
    softcap: logits become softcap * tanh(logits / softcap) before the bias (Gemma 2).
    dropout_rate: dropout on the attention weights (needs `dropout_rng`).
    dropout_rng: PRNG key for the dropout.
    return_weights: also return the attention weights, float32 `[B, N, T, S]` (before dropout).

  Returns:
    `[B, T, N, Hv]` in the query's dtype, or `(output, weights)`. A query row with every key
    masked returns exactly zero, with zero gradients.
  """
  unbatched = jnp.ndim(query) == 3
  if unbatched:
    query, key, value = (jnp.asarray(x)[None] for x in (query, key, value))
  query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
  _check_inputs(query, key, value, bias, mask, query_seq_lengths, key_value_seq_lengths,
                segment_ids, prefix_lengths, softcap, dropout_rate, dropout_rng)
  if local_window_size is not None:
    local_window_size = masks_lib.normalize_window(local_window_size)
  if scale is None:
    scale = 1.0 / np.sqrt(query.shape[-1])

  implementation = dispatch.choose_implementation(
      implementation, query=query, key=key, value=value, bias=bias, mask=mask,
      query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
      softcap=softcap,
      segment_ids=segment_ids, prefix_lengths=prefix_lengths, chunk_size=chunk_size,
      dropout_rate=dropout_rate, return_weights=return_weights, is_causal=is_causal,
      local_window_size=local_window_size,
  )
  if implementation == "cudnn":
    if is_causal and local_window_size is not None:
      # The right bound means nothing under causal, and jax.nn refuses a right window once
      # lengths turn its mask type from causal into padding-causal.
      local_window_size = (local_window_size[0], 0)
    out = jax.nn.dot_product_attention(
        query, key, value, None if bias is None else bias.astype(query.dtype), mask,
        scale=scale, is_causal=is_causal, query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths, local_window_size=local_window_size,
        implementation="cudnn",
    )
    if not _rows_never_empty(
        query.shape[1], key.shape[1], mask=mask, is_causal=is_causal,
        query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
        segment_ids=None, local_window_size=local_window_size, prefix_lengths=None,
        chunk_size=None):
      # cuDNN turns the mask into a bias, so a row with every key masked averages the values.
      out = masks_lib.zero_rows_without_keys(out, masks_lib.make_attention_mask(
          query.shape[1], key.shape[1], mask=mask, is_causal=is_causal,
          query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
          local_window_size=local_window_size))
    return out[0] if unbatched else out
  if implementation == "pallas" and dispatch.is_tpu():
    out = splash_attention(
        query, key, value, scale=scale, is_causal=is_causal, local_window_size=local_window_size,
        chunk_size=chunk_size, segment_ids=segment_ids, softcap=softcap,
        query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
    )
    return out[0] if unbatched else out
  if implementation == "pallas":
    out = pallas_attention(query, key, value, scale=scale, is_causal=is_causal,
                           segment_ids=segment_ids)
    return out[0] if unbatched else out
  if implementation == "blockwise":
    out = blockwise_attention(
        query, key, value, bias, mask, scale=scale, is_causal=is_causal,
        query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
        local_window_size=local_window_size, segment_ids=segment_ids,
        prefix_lengths=prefix_lengths, chunk_size=chunk_size, softcap=softcap,
    )
    return out[0] if unbatched else out

  full_mask = masks_lib.make_attention_mask(
      query.shape[1], key.shape[1], mask=mask, is_causal=is_causal,
      query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
      local_window_size=local_window_size, segment_ids=segment_ids,
      prefix_lengths=prefix_lengths, chunk_size=chunk_size,
  )
  out, weights = _xla_attention(
      query, key, value, bias, full_mask, scale=scale, softcap=softcap,
      zero_empty_rows=full_mask is not None and not _rows_never_empty(
          query.shape[1], key.shape[1], mask=mask, is_causal=is_causal,
          query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
          segment_ids=segment_ids, local_window_size=local_window_size,
          prefix_lengths=prefix_lengths, chunk_size=chunk_size),
      dropout_rate=dropout_rate, dropout_rng=dropout_rng,
  )
  if unbatched:
    out, weights = out[0], weights[0]
  return (out, weights) if return_weights else out


def _rows_never_empty(q_len: int, kv_len: int, *, mask, is_causal: bool, query_seq_lengths,
                      key_value_seq_lengths, segment_ids, local_window_size, prefix_lengths,
                      chunk_size) -> bool:
  """True when no query row can have every key masked, so the zero-row fix-up can be skipped.

  A plain causal mask always keeps key 0 (top-left aligned). Self-attention (T == S) with
  shared segment ids, windows, chunks or a prefix always keeps the diagonal: query i sees key
  i. Dense masks, lengths and separate query / key segment ids can empty a row.
  """
  if any(x is not None for x in (mask, query_seq_lengths, key_value_seq_lengths)):
    return False
  if isinstance(segment_ids, (tuple, list)):
    return False
  if q_len == kv_len:
    return True
  if not is_causal and all(x is None for x in (segment_ids, local_window_size, prefix_lengths,
                                               chunk_size)):
    return kv_len > 0  # nothing masks anything (cross-attention, linformer's projected keys)
  plain_causal = is_causal and all(x is None for x in (
      segment_ids, local_window_size, prefix_lengths, chunk_size))
  return plain_causal and kv_len > 0


def _group(x: Array | None, num_kv_heads: int) -> Array | None:
  """`[b, n, T, S]` (n = 1 or N) -> `[b, K or 1, T, G or 1, S]`, the grouped logits layout."""
  if x is None:
    return None
  b, n, t, s = x.shape
  if n == 1:
    return x[:, :, :, None, :]
  return x.reshape(b, num_kv_heads, n // num_kv_heads, t, s).transpose(0, 1, 3, 2, 4)


def _xla_attention(
    query: Array,
    key: Array,
    value: Array,
    bias: Array | None,
    mask: Array | None,
    *,
    scale: float,
    softcap: float | None,
    zero_empty_rows: bool,
    dropout_rate: float,
    dropout_rng: Array | None,
) -> tuple[Array, Array]:
  """Our einsum path; returns the output and the float32 weights `[B, N, T, S]`."""
  batch, q_len, num_heads, head_dim = query.shape
  kv_len, num_kv_heads, value_dim = key.shape[1], key.shape[2], value.shape[-1]
  groups = num_heads // num_kv_heads
  # Heads-major: one batched matmul per head. For GQA / MQA the G queries of a key/value head
  # are folded into the query axis, so K/V are never repeated in memory, and the logits are
  # viewed as [B, K, T, G, S] (a free reshape) so masks broadcast per head. MHA keeps the plain
  # [B, N, T, S] logits: the 5-D view costs XLA:CPU fusions (~20% of fwd+bwd at B=16, T=128).
  # On CPU this layout is up to ~1.3x faster than jax.nn's [B, T, N, H] einsum.
  if groups == 1:
    view = lambda x: x  # noqa: E731 -- masks and bias are [b, N|1, T, S] already
    logits = jnp.einsum("bnth,bsnh->bnts", query.transpose(0, 2, 1, 3), key,
                        preferred_element_type=jnp.float32)
  else:
    view = functools.partial(_group, num_kv_heads=num_kv_heads)
    q_BKQH = (query.reshape(batch, q_len, num_kv_heads, groups, head_dim)
              .transpose(0, 2, 1, 3, 4).reshape(batch, num_kv_heads, q_len * groups, head_dim))
    logits = jnp.einsum("bkqh,bskh->bkqs", q_BKQH, key, preferred_element_type=jnp.float32)
    logits = logits.reshape(batch, num_kv_heads, q_len, groups, kv_len)
  logits = logits * jnp.float32(scale)
  if softcap is not None:
    logits = softcap * jnp.tanh(logits / softcap)
  if bias is not None:
    logits = logits + view(bias).astype(jnp.float32)
  grouped_mask = view(mask)
  if grouped_mask is not None:
    logits = jnp.where(grouped_mask, logits, masks_lib.large_negative(jnp.float32))
  weights = jax.nn.softmax(logits, axis=-1)
  if zero_empty_rows:
    weights = jnp.where(jnp.any(grouped_mask, axis=-1, keepdims=True), weights, 0.0)
  probs = weights
  if dropout_rate > 0.0:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
    probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
  probs = probs.astype(value.dtype).reshape(batch, num_kv_heads, q_len * groups, kv_len)
  out = jnp.einsum("bkqs,bskh->bkqh", probs, value)
  out = (out.reshape(batch, num_kv_heads, q_len, groups, value_dim).transpose(0, 2, 1, 3, 4)
         .reshape(batch, q_len, num_heads, value_dim).astype(query.dtype))
  if groups > 1:
    weights = weights.transpose(0, 1, 3, 2, 4).reshape(batch, num_heads, q_len, kv_len)
  return out, weights


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def _shape(x) -> tuple[int, ...]:
  return tuple(np.shape(x))


def _check_broadcastable(name: str, x, target: tuple[int, ...], hint: str) -> None:
  shape = _shape(x)
  if len(shape) != 4 or any(d not in (1, t) for d, t in zip(shape, target, strict=True)):
    raise ValueError(
        f"{name} has shape {shape}, which does not broadcast to the logits [B, N, T, S] = "
        f"{target}. Give it 4 dims, each 1 or the matching size. {hint}"
    )


def _check_inputs(query, key, value, bias, mask, query_seq_lengths, key_value_seq_lengths,
                  segment_ids, prefix_lengths, softcap, dropout_rate, dropout_rng) -> None:
  """Raise a ValueError naming the argument, the shapes and the fix; all checks are static."""
  for name, x in (("query", query), ("key", key), ("value", value)):
    if x.ndim != 4:
      raise ValueError(f"{name} must be [B, T, N, H] (or [T, N, H]), got shape {x.shape}.")
  batch, q_len, num_heads, head_dim = query.shape
  _, kv_len, num_kv_heads, _ = key.shape
  if key.shape[:3] != value.shape[:3]:
    raise ValueError(
        f"key {key.shape} and value {value.shape} must agree on [B, S, K]."
    )
  if key.shape[0] != batch:
    raise ValueError(f"query batch {batch} != key batch {key.shape[0]} (query {query.shape}, "
                     f"key {key.shape}).")
  if key.shape[-1] != head_dim:
    raise ValueError(
        f"query head_dim {head_dim} != key head_dim {key.shape[-1]} (query {query.shape}, key "
        f"{key.shape}): project queries and keys to the same head_dim."
    )
  if num_heads % num_kv_heads:
    raise ValueError(
        f"query heads ({num_heads}) must be a multiple of key/value heads ({num_kv_heads}) for "
        f"GQA/MQA; e.g. num_kv_heads in {_divisors(num_heads)}."
    )
  logits_shape = (batch, num_heads, q_len, kv_len)
  if mask is not None:
    if jnp.result_type(mask) != jnp.bool_:
      raise ValueError(
          f"mask must be boolean (True = attend), got {jnp.result_type(mask)}; pass additive "
          f"masks as bias=, or convert with mask.astype(bool)."
      )
    _check_broadcastable("mask", mask, logits_shape,
                         "E.g. a [B, S] key mask is mask[:, None, None, :].")
  if bias is not None:
    _check_broadcastable("bias", bias, logits_shape, "E.g. a [N, T, S] bias is bias[None].")
  for name, lengths in (("query_seq_lengths", query_seq_lengths),
                        ("key_value_seq_lengths", key_value_seq_lengths),
                        ("prefix_lengths", prefix_lengths)):
    if lengths is not None and _shape(lengths) != (batch,):
      raise ValueError(f"{name} must have shape [B] = ({batch},), got {_shape(lengths)}.")
  if segment_ids is not None:
    q_ids, kv_ids = segment_ids if isinstance(segment_ids, (tuple, list)) else (segment_ids,) * 2
    if _shape(q_ids) != (batch, q_len) or _shape(kv_ids) != (batch, kv_len):
      raise ValueError(
          f"segment_ids must be [B, T] = {(batch, q_len)} for self-attention, or a pair "
          f"([B, T], [B, S]) = ({(batch, q_len)}, {(batch, kv_len)}); got shapes "
          f"{_shape(q_ids)} and {_shape(kv_ids)}."
      )
  if softcap is not None and not softcap > 0:
    raise ValueError(f"softcap must be positive (e.g. 50.0) or None, got {softcap}.")
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}.")
  if dropout_rate > 0.0 and dropout_rng is None:
    raise ValueError("dropout_rate > 0 needs dropout_rng (a jax.random key).")
