"""Differential attention (Ye et al. 2024, "Differential Transformer", ICLR 2025).

Each head computes two softmax maps from two halves of its query and key and subtracts the
second, scaled by a learned lambda, so that attention noise common to both cancels:

  DiffAttn(X) = (softmax(Q1 K1^T / sqrt(H)) - lambda softmax(Q2 K2^T / sqrt(H))) V
  lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init,  lambda_init = 0.8 - 0.6 exp(-0.3 (l - 1))

for layer l = 1..L. The head output is normalized on its own (RMSNorm per head, the paper's
GroupNorm "subln") and multiplied by (1 - lambda_init), which keeps the gradient scale of
ordinary attention at initialization. Both maps are `dot_product_attention` calls, so every
mask, packed segment, padding and implementation it supports works here unchanged.

Shapes: B batch, T query length, S key length, N query heads, K key/value heads (N % K == 0),
H head dim of each half, Hv value head dim (2H in the paper).
"""

import math

import jax
import jax.numpy as jnp

from attn.ops.attention import dot_product_attention

Array = jax.Array

_F32 = jnp.float32


def lambda_init(layer_index: int) -> float:
  """0.8 - 0.6 exp(-0.3 (l - 1)) for the layer l = layer_index + 1 (0-based index)."""
  return 0.8 - 0.6 * math.exp(-0.3 * layer_index)


def reparametrized_lambda(lambda_q1: Array, lambda_k1: Array, lambda_q2: Array,
                          lambda_k2: Array, init: float) -> Array:
  """exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init over the last axis, in float32."""
  def dot(a, b):
    return jnp.sum(jnp.asarray(a, _F32) * jnp.asarray(b, _F32), axis=-1)

  return jnp.exp(dot(lambda_q1, lambda_k1)) - jnp.exp(dot(lambda_q2, lambda_k2)) + init


def differential_attention(
    query: Array,
    key: Array,
    value: Array,
    lam: Array | float,
    *,
    lambda_init: float,
    norm_scale: Array | None = None,
    eps: float = 1e-5,
    dropout_rng: Array | None = None,
    return_weights: bool = False,
    **attention_kwargs,
) -> Array | tuple[Array, Array]:
  """Difference of two softmax maps times V, RMS-normalized per head, times (1 - lambda_init).

  Args:
    query: `[B, T, N, 2, H]`: the two query halves of every head.
    key: `[B, S, K, 2, H]`.
    value: `[B, S, K, Hv]`, shared by both maps.
    lam: lambda, a scalar or one per query head `[N]` (`reparametrized_lambda`).
    lambda_init: the layer's initial lambda (`lambda_init`), fixed.
    norm_scale: `[Hv]` learned scale of the per-head RMSNorm, or None.
    eps: the RMSNorm epsilon.
    dropout_rng: with `dropout_rate` in `attention_kwargs`, split between the two maps.
    return_weights: also return the difference map, float32 `[B, N, T, S]`: weights @ V is the
      output before the normalization.
    **attention_kwargs: passed to both `dot_product_attention` calls (is_causal, segment_ids,
      key_value_seq_lengths, local_window_size, implementation, scale, ...).

  Returns:
    `[B, T, N, Hv]` in the query's dtype, or `(output, weights)`.
  """
  rngs = (None, None) if dropout_rng is None else tuple(jax.random.split(dropout_rng))
  results = [dot_product_attention(query[:, :, :, i], key[:, :, :, i], value,
                                   return_weights=return_weights, dropout_rng=rngs[i],
                                   **attention_kwargs) for i in (0, 1)]
  (out1, w1), (out2, w2) = results if return_weights else ((r, None) for r in results)
  lam = jnp.broadcast_to(jnp.asarray(lam, _F32), (query.shape[2],))
  diff = out1.astype(_F32) - lam[None, None, :, None] * out2.astype(_F32)
  normed = diff * jax.lax.rsqrt(jnp.mean(diff * diff, axis=-1, keepdims=True) + eps)
  if norm_scale is not None:
    normed = normed * jnp.asarray(norm_scale, _F32).reshape(1, 1, 1, -1)
  out = (normed * (1.0 - lambda_init)).astype(query.dtype)
  if not return_weights:
    return out
  return out, w1 - lam[None, :, None, None] * w2
