"""The reference attention: slow, obvious, float32 throughout; every other path is tested
against it.

Shapes: B batch, T query length, S key length, N query heads, K key/value heads, H head dim.
"""

import jax
import jax.numpy as jnp

from attn.ops import masks as masks_lib

Array = jax.Array


def attention(
    query: Array,
    key: Array,
    value: Array,
    bias: Array | None = None,
    mask: Array | None = None,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    return_weights: bool = False,
    **mask_kwargs,
) -> Array | tuple[Array, Array]:
  """softmax(softcap(Q K^T * scale) + bias, masked) V, with K/V heads repeated up to N.

  Args:
    query: `[B, T, N, H]`.
    key: `[B, S, K, H]` with N % K == 0.
    value: `[B, S, K, Hv]`.
    bias: additive, broadcastable to `[B, N, T, S]`.
    mask: boolean, True = attend, broadcastable to `[B, N, T, S]`.
    scale: logit scale, default 1 / sqrt(H).
    softcap: if set, logits become softcap * tanh(logits / softcap) before the bias.
    return_weights: also return the attention weights `[B, N, T, S]` (float32).
    **mask_kwargs: any mask keyword of `masks.make_attention_mask` (is_causal,
      query_seq_lengths, key_value_seq_lengths, local_window_size, segment_ids,
      prefix_lengths, chunk_size, q_offset).

  Returns:
    `[B, T, N, Hv]` in the query's dtype (and the weights if asked). A query row whose keys are
    all masked returns zeros.
  """
  groups = query.shape[2] // key.shape[2]
  q = query.astype(jnp.float32)
  k = jnp.repeat(key.astype(jnp.float32), groups, axis=2)
  v = jnp.repeat(value.astype(jnp.float32), groups, axis=2)
  scale = query.shape[-1] ** -0.5 if scale is None else scale

  logits = jnp.einsum("btnh,bsnh->bnts", q, k) * scale
  if softcap is not None:
    logits = softcap * jnp.tanh(logits / softcap)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  full_mask = masks_lib.make_attention_mask(
      query.shape[1], key.shape[1], mask=mask, **mask_kwargs
  )
  if full_mask is not None:
    logits = jnp.where(full_mask, logits, masks_lib.large_negative(jnp.float32))
  weights = jax.nn.softmax(logits, axis=-1)
  if full_mask is not None:
    weights = jnp.where(jnp.any(full_mask, axis=-1, keepdims=True), weights, 0.0)
  out = jnp.einsum("bnts,bsnh->btnh", weights, v).astype(query.dtype)
  return (out, weights) if return_weights else out
