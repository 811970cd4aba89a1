"""JAX's Pallas flash-attention kernel for GPUs (Triton), behind `implementation='pallas'`.

`jax.experimental.pallas.ops.gpu.attention.mha` fuses the online softmax into one kernel
with its own backward kernels. It expresses only a causal mask and shared query/key segment ids,
with equal query, key and value head dims and T == S; `pallas_unsupported_reason` says why
anything else cannot run, and `dot_product_attention` then raises (explicit request) or uses
another path. Lengths that are not a multiple of the tile are padded with a segment id that no
real token has, so padded keys are never attended. GQA repeats the key/value heads.

The same kernel runs on CPU in Pallas interpret mode (`interpret=True`), which is how the tests
check it against the reference without a GPU. On TPUs, `implementation='pallas'` runs JAX's
splash kernel instead: see `ops/splash.py`.

Shapes: B batch, T length (T == S), N query heads, K key/value heads, H head dim.
"""

import jax
import jax.numpy as jnp

from attn.ops import support

Array = jax.Array

_PAD_SEGMENT = -1  # segment id of the padding rows; real ids must differ from it


def pallas_unsupported_reason(
    *,
    query: Array,
    key: Array,
    value: Array,
    bias=None,
    mask=None,
    softcap: float | None = None,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    local_window_size=None,
    prefix_lengths=None,
    chunk_size: int | None = None,
    dropout_rate: float = 0.0,
    return_weights: bool = False,
    segment_ids=None,
    **_,
) -> str | None:
  """Why the Pallas GPU kernel cannot run these arguments, or None if it can."""
  reason = support.unsupported("the Pallas kernel", {
      "bias": bias is not None, "mask": mask is not None, "softcap": softcap is not None,
      "query_seq_lengths": query_seq_lengths is not None,
      "key_value_seq_lengths": key_value_seq_lengths is not None,
      "local_window_size": local_window_size is not None,
      "prefix_lengths": prefix_lengths is not None, "chunk_size": chunk_size is not None,
      "dropout_rate": dropout_rate > 0.0, "return_weights": return_weights,
      "separate query and key segment_ids": isinstance(segment_ids, (tuple, list)),
  })
  if reason is not None:
    return reason
  if query.shape[1] != key.shape[1]:
    return f"the Pallas kernel needs T == S, got T={query.shape[1]}, S={key.shape[1]}"
  if not query.shape[-1] == key.shape[-1] == value.shape[-1]:
    return "the Pallas kernel needs equal query, key and value head dims"
  return None


def pallas_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    scale: float,
    is_causal: bool = False,
    segment_ids: Array | None = None,
    block_q: int = 128,
    block_kv: int = 128,
    interpret: bool = False,
) -> Array:
  """Flash attention with the Pallas GPU kernel (see `pallas_unsupported_reason`).

  Args:
    query: `[B, T, N, H]`.
    key: `[B, T, K, H]` with N % K == 0.
    value: `[B, T, K, H]`.
    scale: logit scale.
    is_causal: causal mask (query i sees keys j <= i).
    segment_ids: int `[B, T]`, shared by queries and keys; must not use -1.
    block_q: query tile (rounded to the sequence when it is shorter).
    block_kv: key tile.
    interpret: run the kernel in Pallas interpret mode (any backend, slow: for tests).

  Returns:
    `[B, T, N, H]` in the query's dtype.
  """
  from jax.experimental.pallas.ops.gpu import attention as pallas_gpu

  batch, length, num_heads, _ = query.shape
  groups = num_heads // key.shape[2]
  if groups > 1:
    key, value = jnp.repeat(key, groups, axis=2), jnp.repeat(value, groups, axis=2)
  tile = max(min(block_q, length), min(block_kv, length))
  padded = -(-length // tile) * tile
  if padded != length or segment_ids is not None:
    if segment_ids is None:
      segment_ids = jnp.zeros((batch, length), jnp.int32)
    segment_ids = jnp.pad(jnp.asarray(segment_ids, jnp.int32), ((0, 0), (0, padded - length)),
                          constant_values=_PAD_SEGMENT)
    pad = ((0, 0), (0, padded - length), (0, 0), (0, 0))
    query, key, value = (jnp.pad(x, pad) for x in (query, key, value))
  # The backward kernels keep more tiles alive: JAX's defaults use 32 there.
  bwd = 32 if padded % 32 == 0 else tile
  sizes = pallas_gpu.BlockSizes(block_q=tile, block_k=tile, block_q_dkv=bwd, block_kv_dkv=bwd,
                                block_q_dq=bwd, block_kv_dq=bwd)
  out = pallas_gpu.mha(query, key, value, segment_ids, sm_scale=float(scale), causal=is_causal,
                       block_sizes=sizes, interpret=interpret)
  return out[:, :length]
