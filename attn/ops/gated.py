"""Gated attention (Qiu et al. 2025, "Gated Attention for Large Language Models", Qwen3-Next).

The attention output of each head is multiplied elementwise by a sigmoid gate computed from the
layer's (normalized) input, before the output projection (the paper's best position, G1):

  Y = softmax(Q K^T / sqrt(H)) V,   Y' = Y * sigmoid(X W_gate)

The gate is head-specific and elementwise (`[B, T, N, Hv]`) or head-wise (`[B, T, N, 1]`). It
adds input-dependent sparsity to the output and a nonlinearity between W_v and W_o, and lets a
head emit nothing, which removes the attention sink (less mass on the first token).

Shapes: B batch, T query length, S key length, N query heads, K key/value heads, H head dim,
Hv value head dim.
"""

import jax
import jax.numpy as jnp

from attn.ops.attention import dot_product_attention

Array = jax.Array


def sigmoid_gate(out: Array, gate_logits: Array) -> Array:
  """out * sigmoid(gate_logits), in float32, cast back to out's dtype."""
  gate = jax.nn.sigmoid(jnp.asarray(gate_logits, jnp.float32))
  return (out.astype(jnp.float32) * gate).astype(out.dtype)


def gated_attention(
    query: Array,
    key: Array,
    value: Array,
    gate_logits: Array,
    *,
    return_weights: bool = False,
    **attention_kwargs,
) -> Array | tuple[Array, Array]:
  """`dot_product_attention` whose output is gated by sigmoid(gate_logits).

  Args:
    query: `[B, T, N, H]`.
    key: `[B, S, K, H]`.
    value: `[B, S, K, Hv]`.
    gate_logits: `[B, T, N, Hv]` (elementwise) or `[B, T, N, 1]` (one gate per head).
    return_weights: also return the softmax weights `[B, N, T, S]` (before the gate).
    **attention_kwargs: passed to `dot_product_attention` (masks, segments, padding, ...).

  Returns:
    `[B, T, N, Hv]` in the query's dtype, or `(output, weights)`.
  """
  result = dot_product_attention(query, key, value, return_weights=return_weights,
                                 **attention_kwargs)
  out, weights = result if return_weights else (result, None)
  out = sigmoid_gate(out, gate_logits)
  return (out, weights) if return_weights else out
