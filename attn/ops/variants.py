"""Alternative attention mechanisms as pure ops: Linformer, cosine, sigmoid, attention sinks.

Each takes the `[B, T, N, H]` layout of `dot_product_attention` and the same mask keywords
where the mechanism can honor them. Cosine attention and Linformer reduce to softmax attention on
transformed inputs and so run on any implementation of `dot_product_attention`; sigmoid and sink
attention change the normalization and form their `[B, N, T, S]` weights explicitly.

Shapes: B batch, T query length, S key length, N query heads, K key/value heads (N % K == 0),
G = N // K, H head dim, Hv value head dim, P projected length (Linformer).
"""

import jax
import jax.numpy as jnp
import numpy as np

from attn.ops import masks as masks_lib
from attn.ops.attention import _group, dot_product_attention

Array = jax.Array

_F32 = jnp.float32


def linformer_attention(
    query: Array,
    key: Array,
    value: Array,
    key_projection: Array,
    value_projection: Array | None = None,
    *,
    scale: float | None = None,
    key_value_seq_lengths: Array | None = None,
    implementation: str | None = None,
) -> Array:
  """Softmax attention over P learned mixtures of the S keys and values (Wang et al. 2020).

  Keys and values are projected along the sequence, K' = E K and V' = F V, so the logits are
  `T x P` instead of `T x S`. The projection mixes all positions: there is no causal form.

  Args:
    query: `[B, T, N, H]`.
    key: `[B, S, K, H]` with N % K == 0.
    value: `[B, S, K, Hv]`.
    key_projection: E, `[P, S]`.
    value_projection: F, `[P, S]` (default: E, the paper's shared projection).
    scale: logit scale; default 1 / sqrt(H).
    key_value_seq_lengths: int `[B]`; padded keys and values are zeroed before the projection.
    implementation: passed to `dot_product_attention`.

  Returns:
    `[B, T, N, Hv]` in the query's dtype.
  """
  kv_len = key.shape[1]
  if key_projection.shape[-1] != kv_len:
    raise ValueError(f"key_projection must be [P, S] with S = {kv_len} keys, got "
                     f"{key_projection.shape}; slice a longer projection to [:, :S].")
  value_projection = key_projection if value_projection is None else value_projection
  if key_value_seq_lengths is not None:
    valid = jnp.arange(kv_len)[None, :] < jnp.asarray(key_value_seq_lengths)[:, None]
    key = jnp.where(valid[:, :, None, None], key, 0)
    value = jnp.where(valid[:, :, None, None], value, 0)
  projected_key = jnp.einsum("ps,bskh->bpkh", key_projection.astype(key.dtype), key)
  projected_value = jnp.einsum("ps,bskh->bpkh", value_projection.astype(value.dtype), value)
  return dot_product_attention(query, projected_key, projected_value, scale=scale,
                               implementation=implementation)


def cosine_attention(
    query: Array,
    key: Array,
    value: Array,
    bias: Array | None = None,
    mask: Array | None = None,
    *,
    temperature: float | Array = 0.1,
    eps: float = 1e-6,
    **kwargs,
) -> Array:
  """Softmax over cosine similarities divided by a temperature (Swin V2, Liu et al. 2022).

  Unit-length queries and keys bound the logits to [-1/tau, 1/tau], which keeps large models'
  attention from saturating (also "QK-norm", Henry et al. 2020).

  Args:
    query: `[B, T, N, H]`.
    key: `[B, S, K, H]` with N % K == 0.
    value: `[B, S, K, Hv]`.
    bias: additive logits bias, as in `dot_product_attention`.
    mask: boolean mask, as in `dot_product_attention`.
    temperature: tau, a scalar or one per query head `[N]` (Swin V2 learns it per head and
      clamps it at 0.01).
    eps: guards the normalization of zero vectors.
    **kwargs: any other keyword of `dot_product_attention` (masks, implementation, ...) but
      `scale`.

  Returns:
    `[B, T, N, Hv]` in the query's dtype.
  """
  if "scale" in kwargs:
    raise ValueError("cosine_attention sets the scale from `temperature`; do not pass scale.")
  inv_tau = 1.0 / jnp.asarray(temperature, _F32)
  q = _unit(query, eps) * (inv_tau.reshape(1, 1, -1, 1) if inv_tau.ndim else inv_tau)
  return dot_product_attention(q.astype(query.dtype), _unit(key, eps).astype(key.dtype), value,
                               bias, mask, scale=1.0, **kwargs)


def _unit(x: Array, eps: float) -> Array:
  x = x.astype(_F32)
  # Not lax.rsqrt: on XLA:CPU (jax 0.10) a jitted jacrev through rsqrt came out wrong (errors
  # of 0.1, even leaking gradient past the causal mask); x / sqrt is exact to rounding.
  return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def _grouped_logits(query: Array, key: Array, scale: float | None) -> Array:
  """float32 logits `[B, K, T, G, S]` (the xla path's layout, so `_group` serves both); K/V
  heads are shared, never repeated."""
  batch, q_len, num_heads, head_dim = query.shape
  num_kv_heads = key.shape[2]
  scale = head_dim**-0.5 if scale is None else scale
  q = query.reshape(batch, q_len, num_kv_heads, num_heads // num_kv_heads, head_dim)
  return jnp.einsum("btkgh,bskh->bktgs", q, key, preferred_element_type=_F32) * _F32(scale)


def _weighted_values(weights: Array, value: Array, out_dtype) -> Array:
  """`[B, K, T, G, S]` weights times `[B, S, K, Hv]` values -> `[B, T, N, Hv]`."""
  batch, heads, q_len, groups, _ = weights.shape
  out = jnp.einsum("bktgs,bskh->btkgh", weights.astype(value.dtype), value,
                   preferred_element_type=_F32)
  return out.reshape(batch, q_len, heads * groups, value.shape[-1]).astype(out_dtype)


def sigmoid_attention(
    query: Array,
    key: Array,
    value: Array,
    bias: Array | None = None,
    mask: Array | None = None,
    *,
    scale: float | None = None,
    sigmoid_bias: float | None = None,
    **mask_kwargs,
) -> Array:
  """Elementwise sigmoid instead of a row softmax (Ramapuram et al. 2024, "Theory, Analysis,
  and Best Practices for Sigmoid Self-Attention").

  weights = sigmoid(Q K^T * scale + bias + b), masked weights are 0. Rows are not normalized;
  the paper's b = -log(S) keeps the initial row sums near 1.

  Args:
    query: `[B, T, N, H]`.
    key: `[B, S, K, H]` with N % K == 0.
    value: `[B, S, K, Hv]`.
    bias: additive, broadcastable to `[B, N, T, S]`.
    mask: boolean, True = attend, broadcastable to `[B, N, T, S]`.
    scale: logit scale; default 1 / sqrt(H).
    sigmoid_bias: b; default -log(S).
    **mask_kwargs: any mask keyword of `masks.make_attention_mask` (is_causal,
      query_seq_lengths, key_value_seq_lengths, local_window_size, segment_ids, ...).

  Returns:
    `[B, T, N, Hv]` in the query's dtype.
  """
  kv_len, num_kv_heads = key.shape[1], key.shape[2]
  logits = _grouped_logits(query, key, scale)
  b = -np.log(kv_len) if sigmoid_bias is None else sigmoid_bias
  logits = logits + _F32(b)
  if bias is not None:
    logits = logits + _group(jnp.asarray(bias), num_kv_heads).astype(_F32)
  weights = jax.nn.sigmoid(logits)
  full_mask = masks_lib.make_attention_mask(query.shape[1], kv_len, mask=mask, **mask_kwargs)
  if full_mask is not None:
    weights = jnp.where(_group(full_mask, num_kv_heads), weights, 0.0)
  return _weighted_values(weights, value, query.dtype)


def sink_attention(
    query: Array,
    key: Array,
    value: Array,
    sink_logits: Array,
    bias: Array | None = None,
    mask: Array | None = None,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    **mask_kwargs,
) -> Array:
  """Softmax attention with a learned per-head sink logit in every row's normalizer.

  weights_ts = exp(l_ts) / (exp(sink_n) + sum_s' exp(l_ts')): the sink takes probability mass
  but contributes no value, so a head can attend "nowhere" (Xiao et al. 2023's attention sinks
  as a learned logit, as in gpt-oss; with sink = 0 it is Miller 2023's softmax_1).

  Args:
    query: `[B, T, N, H]`.
    key: `[B, S, K, H]` with N % K == 0.
    value: `[B, S, K, Hv]`.
    sink_logits: `[N]` (or a scalar), one sink logit per query head.
    bias: additive, broadcastable to `[B, N, T, S]`.
    mask: boolean, True = attend, broadcastable to `[B, N, T, S]`.
    scale: logit scale; default 1 / sqrt(H).
    softcap: logits become softcap * tanh(logits / softcap) before the bias.
    **mask_kwargs: any mask keyword of `masks.make_attention_mask`.

  Returns:
    `[B, T, N, Hv]` in the query's dtype; a row with every key masked returns zeros.
  """
  batch, q_len, num_heads, _ = query.shape
  kv_len, num_kv_heads = key.shape[1], key.shape[2]
  logits = _grouped_logits(query, key, scale)
  if softcap is not None:
    logits = softcap * jnp.tanh(logits / softcap)
  if bias is not None:
    logits = logits + _group(jnp.asarray(bias), num_kv_heads).astype(_F32)
  full_mask = masks_lib.make_attention_mask(q_len, kv_len, mask=mask, **mask_kwargs)
  grouped_mask = _group(full_mask, num_kv_heads)
  if grouped_mask is not None:
    logits = jnp.where(grouped_mask, logits, masks_lib.large_negative(_F32))
  sink = jnp.broadcast_to(jnp.asarray(sink_logits, _F32), (num_heads,))
  sink = sink.reshape(1, num_kv_heads, 1, num_heads // num_kv_heads, 1)
  row_max = jnp.maximum(jnp.max(logits, axis=-1, keepdims=True), sink)
  row_max = jax.lax.stop_gradient(row_max)  # any constant works; it only guards exp's range
  # row_max >= the finite sink, so a masked logit's exp underflows to exactly 0: a fully masked
  # row puts all its mass on the sink and outputs zeros, with no second where needed.
  e = jnp.exp(logits - row_max)
  weights = e / (jnp.sum(e, axis=-1, keepdims=True) + jnp.exp(sink - row_max))
  return _weighted_values(weights, value, query.dtype)
