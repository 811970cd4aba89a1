"""JAX's Pallas splash-attention kernel for TPUs, behind `implementation='pallas'` on TPU.

`jax.experimental.pallas.ops.tpu.splash_attention` is a flash-attention kernel with its own
backward kernels that skips the key blocks a static mask empties. The mask is built here from the
arguments (causal, local window, chunked causal, all top-left aligned as in `masks`), segment ids
and sequence lengths become the kernel's runtime segment ids, GQA / MQA share the key/value heads
without repeating them, and the soft-cap is the kernel's `attn_logits_soft_cap`.
`splash_unsupported_reason` says why anything else cannot run, and `dot_product_attention` then
raises (explicit request) or uses another path.

How our contract is kept on a kernel that has no scale and no empty rows:
- Scale: the query is multiplied by `scale` in float32 and cast back (exact when the scale is a
  power of two, e.g. H = 64 or 256; otherwise one rounding of the query in its dtype).
- Lengths that are not a multiple of the block are padded; padded keys get a segment id that no
  query has (`_PAD_SEGMENT`), so they are never attended, and `key_value_seq_lengths` marks the
  keys past the length the same way.
- A query row that sees no key must output zeros; the kernel gives the mean of the masked values
  (or NaN when its whole row of blocks is skipped). Rows that the static mask empties (T > S with a
  window or chunks) are a suffix: they are not sent to the kernel and come back as zeros. Rows that
  segment ids or lengths may empty are found with the mask predicates of `masks` (a fused
  compare-and-reduce over `[B, T, S]`, no heads) and set to zero, which also zeroes their
  gradients.

Block sizes: multiples of 128 (the TPU lane width), default 512 as in MaxText's splash config;
each is shrunk to the largest multiple of 128 that divides the sequence padded to 128, so short or
odd lengths are not padded to 512. The kernel runs per example (vmapped over the batch) and per
device: under a sharded `jit` XLA cannot partition it, so on a mesh call it inside `shard_map`.
`implementation=None` never picks it: it has run in interpret mode only, not on a TPU.

The same kernel runs on CPU in Pallas interpret mode (`interpret=True`), which is how the tests
check it against the reference without a TPU.

Shapes: B batch, T query length, S key length, N query heads, K key/value heads, H head dim
(Hv for values).
"""

import jax
import jax.numpy as jnp
import numpy as np

from attn.ops import masks as masks_lib
from attn.ops import support

Array = jax.Array

_LANES = 128  # TPU lane width: every splash block is a multiple of it
_PAD_SEGMENT = int(np.iinfo(np.int32).min)  # segment id of padded keys; real ids must differ


def splash_unsupported_reason(
    *,
    query: Array,
    key: Array,
    value: Array,
    bias=None,
    mask=None,
    softcap: float | None = None,
    prefix_lengths=None,
    dropout_rate: float = 0.0,
    return_weights: bool = False,
    **_,  # is_causal, local_window_size, chunk_size, segment_ids, lengths: splash takes them
) -> str | None:
  """Why the splash kernel cannot run these arguments, or None if it can."""
  reason = support.unsupported("the splash kernel", {
      "bias": bias is not None, "mask": mask is not None,
      "prefix_lengths": prefix_lengths is not None, "dropout_rate": dropout_rate > 0.0,
      "return_weights": return_weights,
  })
  if reason is not None:
    return reason
  if softcap is not None and not isinstance(softcap, (int, float, np.floating)):
    return "the splash kernel needs softcap as a Python float (it is compiled in)"
  if not (query.shape[1] and key.shape[1]):
    return "the splash kernel needs non-empty query and key sequences"
  if query.shape[-1] != key.shape[-1]:
    return "the splash kernel needs equal query and key head dims"
  del value
  return None


def _block_and_padded(length: int, block: int) -> tuple[int, int]:
  """The largest multiple of 128 <= `block` dividing `length` rounded up to 128; that length."""
  padded = -(-length // _LANES) * _LANES
  size = max(b for b in range(_LANES, min(block, padded) + 1, _LANES) if padded % b == 0)
  return size, padded


def _visible_rows(q_len: int, kv_len: int, is_causal: bool, window: tuple[int, int] | None,
                  chunk_size: int | None) -> int:
  """How many leading query rows the static mask lets see a key; the rest see none.

  Row i sees keys in [first, last]: first = max(i - left, chunk start), last = min(S - 1,
  i + right, and i if causal). Both grow with i, and row i < S always sees key i, so the rows
  that see nothing (first > last) are a suffix.
  """
  i = np.arange(q_len)
  first, last = np.zeros_like(i), np.full_like(i, kv_len - 1)
  if window is not None:
    first = np.maximum(first, i - window[0])
    last = np.minimum(last, i + window[1])
  if chunk_size is not None:
    first = np.maximum(first, i // chunk_size * chunk_size)
  if is_causal or chunk_size is not None:
    last = np.minimum(last, i)
  return int(np.sum(first <= last))


def _splash_mask(shape: tuple[int, int], num_heads: int, is_causal: bool,
                 window: tuple[int, int] | None, chunk_size: int | None):
  """The splash `MultiHeadMask` (one shared object for every head, so it is processed once)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  parts = []
  if chunk_size is not None:
    parts.append(sm.ChunkedCausalMask(shape, chunk_size))
  if window is not None:
    # Causal (or chunked, which is causal) AND a (left, right) window is the window (left, 0).
    right = 0 if is_causal or chunk_size is not None else window[1]
    parts.append(sm.LocalMask(shape, (window[0], right), offset=0))
  elif is_causal and chunk_size is None:
    parts.append(sm.CausalMask(shape))
  head_mask = sm.FullMask(shape) if not parts else parts[0]
  for part in parts[1:]:
    head_mask = head_mask & part
  return sm.MultiHeadMask([head_mask] * num_heads)


def _pad_axis1(x: Array, length: int, value=0) -> Array:
  pad = [(0, 0)] * x.ndim
  pad[1] = (0, length - x.shape[1])
  return jnp.pad(x, pad, constant_values=value)


def splash_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    scale: float,
    is_causal: bool = False,
    local_window_size: tuple[int, int] | None = None,
    chunk_size: int | None = None,
    segment_ids: Array | tuple[Array, Array] | None = None,
    softcap: float | None = None,
    query_seq_lengths: Array | None = None,
    key_value_seq_lengths: Array | None = None,
    block_q: int = 512,
    block_kv: int = 512,
    interpret: bool = False,
) -> Array:
  """Softmax attention with the Pallas TPU splash kernel (see `splash_unsupported_reason`).

  Args:
    query: `[B, T, N, H]`.
    key: `[B, S, K, H]` with N % K == 0 (K < N is GQA, K == 1 MQA; never repeated).
    value: `[B, S, K, Hv]`.
    scale: logit scale.
    is_causal: query i sees keys j <= i (top-left aligned when T != S, as in `masks`).
    local_window_size: `(left, right)`: query i sees keys in [i - left, i + right].
    chunk_size: causal attention inside chunks of this many positions.
    segment_ids: int `[B, T]` (T == S) or a pair (`[B, T]`, `[B, S]`); ids must not be the
      int32 minimum.
    softcap: logits become softcap * tanh(logits / softcap), after the scale.
    query_seq_lengths: int `[B]`; query rows past the length output zeros.
    key_value_seq_lengths: int `[B]`; keys past the length are never attended.
    block_q: query block, a multiple of 128 (shrunk for short or odd lengths, see above).
    block_kv: key block, a multiple of 128; the backward kernels use the same two sizes.
    interpret: run the kernel in Pallas interpret mode (any backend, slow: for tests).

  Returns:
    `[B, T, N, Hv]` in the query's dtype; a query row that sees no key is exactly zero.
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

  if block_q % _LANES or block_kv % _LANES:
    raise ValueError(f"block_q and block_kv must be multiples of {_LANES}, got {block_q}, "
                     f"{block_kv}.")
  batch, q_len, num_heads, _ = query.shape
  kv_len, num_kv_heads = key.shape[1], key.shape[2]
  window = None if local_window_size is None else masks_lib.normalize_window(local_window_size)
  rows = _visible_rows(q_len, kv_len, is_causal, window, chunk_size)
  if rows == 0:
    return jnp.zeros((*query.shape[:3], value.shape[-1]), query.dtype)

  separate_ids = isinstance(segment_ids, (tuple, list))
  q_ids, kv_ids = segment_ids if separate_ids else (segment_ids, segment_ids)
  bq, q_padded = _block_and_padded(rows, block_q)
  bkv, kv_padded = _block_and_padded(kv_len, block_kv)
  use_ids = segment_ids is not None or key_value_seq_lengths is not None or kv_padded > kv_len
  if use_ids:
    q_ids = (jnp.zeros((batch, q_len), jnp.int32) if q_ids is None
             else jnp.asarray(q_ids, jnp.int32))
    kv_ids = (jnp.zeros((batch, kv_len), jnp.int32) if kv_ids is None
              else jnp.asarray(kv_ids, jnp.int32))
    if key_value_seq_lengths is not None:
      past_end = jnp.arange(kv_len)[None, :] >= jnp.asarray(key_value_seq_lengths)[:, None]
      kv_ids = jnp.where(past_end, _PAD_SEGMENT, kv_ids)
    ids = sk.SegmentIds(q=_pad_axis1(q_ids[:, :rows], q_padded, _PAD_SEGMENT),
                        kv=_pad_axis1(kv_ids, kv_padded, _PAD_SEGMENT))

  # Splash has no scale argument: scale the query in float32, then back to its dtype.
  q = (query[:, :rows].astype(jnp.float32) * scale).astype(query.dtype)
  q_BNTH = _pad_axis1(q, q_padded).transpose(0, 2, 1, 3)
  k_BKSH, v_BKSH = (_pad_axis1(x, kv_padded).transpose(0, 2, 1, 3) for x in (key, value))
  sizes = sk.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                        block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq,
                        block_kv_dq=bkv)
  mask = _splash_mask((q_padded, kv_padded), num_heads, is_causal, window, chunk_size)
  make = sk.make_splash_mqa_single_device if num_kv_heads == 1 else sk.make_splash_mha_single_device
  kernel = make(mask, block_sizes=sizes, interpret=interpret,
                attn_logits_soft_cap=None if softcap is None else float(softcap))
  if num_kv_heads == 1:  # the MQA kernel takes one [S, H] key/value for all heads
    k_BKSH, v_BKSH = k_BKSH[:, 0], v_BKSH[:, 0]
  if use_ids:
    out_BNTH = jax.vmap(lambda q, k, v, ids: kernel(q, k, v, segment_ids=ids))(
        q_BNTH, k_BKSH, v_BKSH, ids)
  else:
    out_BNTH = jax.vmap(kernel)(q_BNTH, k_BKSH, v_BKSH)
  out = out_BNTH.transpose(0, 2, 1, 3)[:, :rows]

  if separate_ids or key_value_seq_lengths is not None or query_seq_lengths is not None:
    # Rows the dynamic ids or lengths may empty; the static mask is in there as well.
    out = masks_lib.zero_rows_without_keys(out, masks_lib.make_attention_mask(
        rows, kv_len, is_causal=is_causal, local_window_size=window, chunk_size=chunk_size,
        segment_ids=None if segment_ids is None else (q_ids[:, :rows], kv_ids),
        query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths))
  return _pad_axis1(out, q_len)
