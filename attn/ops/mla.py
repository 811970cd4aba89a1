"""Multi-head latent attention (MLA; DeepSeek-AI 2024, "DeepSeek-V2", section 2.1).

Keys and values of every head are up-projected from one low-rank latent per token, and a small
decoupled RoPE key is shared by all heads:

  c_t = W_dkv h_t                                  (latent, kv_lora_rank = Dc)
  k_t,n = [W_uk,n c_t ; RoPE(W_kr h_t)]            (Dn "nope" + Dr rotary channels)
  v_t,n = W_uv,n c_t
  q_t,n = [q_nope_t,n ; RoPE(q_rope_t,n)],         score = q . k / sqrt(Dn + Dr)

Expanded, it is ordinary MHA on the up-projected keys and values. Absorbed (for decoding), W_uk
is folded into the query (q_nope W_uk^T lives in the latent space) and W_uv into the output, so
attention runs directly on the cached latents: MQA with one key/value head whose key is
[c ; k_rope] (Dc + Dr) and whose value is c (Dc). The cache then holds (Dc + Dr) numbers per
token instead of 2 N H.

Shapes: B batch, T query length, S key length, N heads, Dn / Dr / Dv per-head nope, rotary and
value dims, Dc latent dim.
"""

import jax
import jax.numpy as jnp
import numpy as np

from attn.ops.attention import dot_product_attention

Array = jax.Array


def mla_attention(
    q_nope: Array,
    q_rope: Array,
    latent: Array,
    k_rope: Array,
    w_uk: Array,
    w_uv: Array,
    *,
    absorb: bool = False,
    scale: float | None = None,
    return_weights: bool = False,
    **attention_kwargs,
) -> Array | tuple[Array, Array]:
  """MLA from the cached quantities, expanded (training) or absorbed (decoding).

  Args:
    q_nope: `[B, T, N, Dn]`.
    q_rope: `[B, T, N, Dr]`, RoPE already applied (query positions).
    latent: `[B, S, Dc]`, the compressed keys and values (normalized, as cached).
    k_rope: `[B, S, Dr]`, the shared rotary key, RoPE already applied (key positions).
    w_uk: `[Dc, N, Dn]` key up-projection.
    w_uv: `[Dc, N, Dv]` value up-projection.
    absorb: attend in the latent space (W_uk into the query, W_uv after the weighted sum);
      equal to the expanded form up to rounding, cheaper when S is large and T small.
    scale: logit scale; default 1 / sqrt(Dn + Dr).
    return_weights: also return the weights `[B, N, T, S]`.
    **attention_kwargs: passed to `dot_product_attention` (masks, segments, padding, ...).

  Returns:
    `[B, T, N, Dv]` in the query's dtype, or `(output, weights)`.
  """
  heads = q_nope.shape[2]
  if scale is None:
    scale = 1.0 / np.sqrt(q_nope.shape[-1] + q_rope.shape[-1])
  if absorb:
    q_latent = jnp.einsum("btnd,cnd->btnc", q_nope, w_uk.astype(q_nope.dtype))
    query = jnp.concatenate([q_latent, q_rope.astype(q_latent.dtype)], axis=-1)
    key = jnp.concatenate([latent, k_rope.astype(latent.dtype)], axis=-1)[:, :, None]
    result = dot_product_attention(query, key.astype(query.dtype),
                                   latent[:, :, None].astype(query.dtype), scale=scale,
                                   return_weights=return_weights, **attention_kwargs)
    out, weights = result if return_weights else (result, None)
    out = jnp.einsum("btnc,cnd->btnd", out, w_uv.astype(out.dtype))
  else:
    k_nope = jnp.einsum("bsc,cnd->bsnd", latent, w_uk.astype(latent.dtype))
    shared = jnp.broadcast_to(k_rope[:, :, None], (*k_rope.shape[:2], heads, k_rope.shape[-1]))
    key = jnp.concatenate([k_nope, shared.astype(k_nope.dtype)], axis=-1)
    query = jnp.concatenate([q_nope, q_rope.astype(q_nope.dtype)], axis=-1)
    value = jnp.einsum("bsc,cnd->bsnd", latent, w_uv.astype(latent.dtype))
    result = dot_product_attention(query, key.astype(query.dtype), value.astype(query.dtype),
                                   scale=scale, return_weights=return_weights,
                                   **attention_kwargs)
    out, weights = result if return_weights else (result, None)
  out = out.astype(q_nope.dtype)
  return (out, weights) if return_weights else out


def latent_cache_bytes_per_token(kv_lora_rank: int, rope_head_dim: int, dtype) -> int:
  """MLA's decoding cache per token and layer: (Dc + Dr) x itemsize."""
  return (kv_lora_rank + rope_head_dim) * np.dtype(dtype).itemsize


def kv_cache_bytes_per_token(num_kv_heads: int, head_dim: int, dtype) -> int:
  """An MHA / GQA / MQA KV cache per token and layer: keys and values, 2 K H x itemsize."""
  return 2 * num_kv_heads * head_dim * np.dtype(dtype).itemsize
