"""Memory-efficient softmax attention in pure JAX: O(T) memory instead of the T x S matrix.

The online-softmax recurrence of FlashAttention (Dao et al. 2022; Rabe & Staats 2021, "Self-
attention does not need O(n^2) memory"): queries are cut into blocks of `block_q` rows, and for
each query block the keys and values are visited in blocks of `block_kv` while a running row
maximum `m`, a running normalizer `l` and an unnormalized output accumulator are updated. Only
one `block_q x block_kv` tile of logits is alive at a time. The backward pass is a custom VJP
that recomputes each tile from the saved log-sum-exp instead of storing the weights.

Masks are built per tile from positions, lengths and segment ids, never as a T x S array; only a
dense `mask` or `bias` given by the caller is read (sliced per tile). Key blocks that a
structured mask rules out entirely (above the causal diagonal, outside the window or the chunk,
past the longest key length) are not visited at all; with segment ids or a dense mask an empty
tile is skipped at run time.

Shapes: B batch, T query length, S key length, N query heads, K key/value heads, G = N // K,
H head dim (Hv for values). Tiles use the grouped layout `[B, K, bq, G, bk]` of `attention.py`,
so GQA never copies keys or values per query head.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from attn.ops import masks as masks_lib

Array = jax.Array

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class _Spec:
  """Everything static about one call: shapes, block sizes and the structured mask kinds."""

  q_len: int
  kv_len: int
  block_q: int
  block_kv: int
  groups: int
  scale: float
  softcap: float | None
  is_causal: bool
  window: tuple[int, int] | None
  chunk_size: int | None

  @property
  def padded_q(self) -> int:
    return -(-self.q_len // self.block_q) * self.block_q

  @property
  def padded_kv(self) -> int:
    return -(-self.kv_len // self.block_kv) * self.block_kv


def blockwise_attention(
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
    segment_ids: Array | tuple[Array, Array] | None = None,
    prefix_lengths: Array | None = None,
    chunk_size: int | None = None,
    softcap: float | None = None,
    block_q: int = 512,
    block_kv: int = 512,
) -> Array:
  """softmax(softcap(Q K^T * scale) + bias, masked) V without materializing the weights.

  Same semantics as `attn.ops.reference.attention` (top-left causal alignment when T != S,
  fully masked rows return zeros with zero gradients); the argument checks live in
  `attn.ops.dot_product_attention`, which is the usual way in (`implementation='blockwise'`).

  Args:
    query: `[B, T, N, H]`.
    key: `[B, S, K, H]` with N % K == 0.
    value: `[B, S, K, Hv]`.
    bias: additive logits bias broadcastable to `[B, N, T, S]` (4-D); read one tile at a time
      and differentiable.
    mask: boolean, True = attend, broadcastable to `[B, N, T, S]` (4-D); read one tile at a time.
    scale: logit scale; default 1 / sqrt(H).
    is_causal: key j is visible to query i when j <= i.
    query_seq_lengths: int `[B]`; query rows past the length output zeros.
    key_value_seq_lengths: int `[B]`; keys past the length are never attended.
    local_window_size: `w` or `(left, right)`: query i sees keys in [i - left, i + right].
    segment_ids: int `[B, T]` (self-attention) or a pair (`[B, T]`, `[B, S]`).
    prefix_lengths: int `[B]`: prefix-LM (bidirectional prefix, causal after).
    chunk_size: causal attention inside chunks of this many positions.
    softcap: logits become softcap * tanh(logits / softcap) before the bias.
    block_q: at most this many query rows per tile.
    block_kv: at most this many keys per tile.

  Returns:
    `[B, T, N, Hv]` in the query's dtype.
  """
  batch, q_len, num_heads, head_dim = query.shape
  kv_len, num_kv_heads = key.shape[1], key.shape[2]
  spec = _Spec(
      q_len=q_len, kv_len=kv_len, block_q=_fit_block(q_len, block_q),
      block_kv=_fit_block(kv_len, block_kv),
      groups=num_heads // num_kv_heads,
      scale=float(1.0 / np.sqrt(head_dim) if scale is None else scale),
      softcap=None if softcap is None else float(softcap),
      is_causal=bool(is_causal) and prefix_lengths is None,
      window=None if local_window_size is None else masks_lib.normalize_window(local_window_size),
      chunk_size=chunk_size,
  )
  if isinstance(segment_ids, (tuple, list)):
    q_ids, kv_ids = segment_ids
  else:
    q_ids = kv_ids = segment_ids
  pad_q, pad_kv = spec.padded_q - q_len, spec.padded_kv - kv_len
  aux = {
      "q_lengths": query_seq_lengths, "kv_lengths": key_value_seq_lengths,
      "prefix": prefix_lengths,
      "q_ids": None if q_ids is None else _pad_axis(jnp.asarray(q_ids), 1, pad_q),
      "kv_ids": None if kv_ids is None else _pad_axis(jnp.asarray(kv_ids), 1, pad_kv),
      "mask": None if mask is None else _pad_tail(jnp.asarray(mask), pad_q, pad_kv),
  }
  aux = {name: None if x is None else jnp.asarray(x) for name, x in aux.items()}
  if bias is not None:
    bias = _pad_tail(jnp.asarray(bias), pad_q, pad_kv)
  # [B, K, T, G, H]: the G query heads of a key/value head sit next to each other.
  q_BKTGH = query.reshape(batch, q_len, num_kv_heads, spec.groups, head_dim).transpose(
      0, 2, 1, 3, 4)
  out_BKTGH = _attention(spec, _pad_axis(q_BKTGH, 2, pad_q),
                         _pad_axis(key.transpose(0, 2, 1, 3), 2, pad_kv),
                         _pad_axis(value.transpose(0, 2, 1, 3), 2, pad_kv), bias, aux)
  out = out_BKTGH[:, :, :q_len].transpose(0, 2, 1, 3, 4)
  return out.reshape(batch, q_len, num_heads, value.shape[-1]).astype(query.dtype)


def _fit_block(length: int, target: int) -> int:
  """The smallest multiple of 8 that covers `length` in as many blocks as `target` would.

  T = 768 with target 512 gives 2 blocks of 384 instead of 2 of 512 with 256 rows of padding.
  """
  if length <= target:
    return max(length, 1)
  n_blocks = -(-length // target)
  return min(target, -(-length // (n_blocks * 8)) * 8)


def _pad_axis(x: Array, axis: int, amount: int) -> Array:
  if not amount:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, amount)
  return jnp.pad(x, widths)


def _pad_tail(x: Array, pad_q: int, pad_kv: int) -> Array:
  """Pad the T and S axes of a 4-D mask or bias (size-1 broadcast axes stay as they are)."""
  return _pad_axis(_pad_axis(x, 2, pad_q if x.shape[2] > 1 else 0), 3,
                   pad_kv if x.shape[3] > 1 else 0)


def _tile(x: Array, i: Array, j: Array, spec: _Spec) -> Array:
  """The `[b, n, bq, bk]` tile (i, j) of a 4-D mask or bias, in the grouped layout."""
  b, n, t, s = x.shape
  tq, tk = min(t, spec.block_q), min(s, spec.block_kv)
  tile = jax.lax.dynamic_slice(x, (0, 0, i * spec.block_q if t > 1 else 0,
                                   j * spec.block_kv if s > 1 else 0), (b, n, tq, tk))
  if n == 1:
    return tile[:, :, :, None, :]
  return tile.reshape(b, n // spec.groups, spec.groups, tq, tk).transpose(0, 1, 3, 2, 4)


def _tile_mask(spec: _Spec, aux: dict, i: Array, j: Array) -> Array | None:
  """Boolean `[B|1, K|1, bq, G|1, bk]` for tile (i, j), or None when nothing is masked.

  The structured masks come from `masks.make_attention_mask` on the tile's positions, so the
  tiles agree with the dense mask of the xla path by construction.
  """
  segment_ids = None
  if aux["q_ids"] is not None:
    segment_ids = (
        jax.lax.dynamic_slice_in_dim(aux["q_ids"], i * spec.block_q, spec.block_q, 1),
        jax.lax.dynamic_slice_in_dim(aux["kv_ids"], j * spec.block_kv, spec.block_kv, 1))
  structured = masks_lib.make_attention_mask(
      spec.block_q, spec.block_kv, is_causal=spec.is_causal,
      query_seq_lengths=aux["q_lengths"], key_value_seq_lengths=aux["kv_lengths"],
      local_window_size=spec.window, segment_ids=segment_ids, prefix_lengths=aux["prefix"],
      chunk_size=spec.chunk_size, q_offset=i * spec.block_q, kv_offset=j * spec.block_kv)
  parts = [None if structured is None else structured[:, :, :, None, :]]  # [B|1, 1, bq, 1, bk]
  if spec.padded_kv != spec.kv_len:  # keys added to fill the last block
    parts.append(masks_lib.padding_mask(1, spec.block_kv, None, jnp.array([spec.kv_len]),
                                        kv_offset=j * spec.block_kv)[:, :, :, None, :])
  if aux["mask"] is not None:
    parts.append(_tile(aux["mask"], i, j, spec))
  return masks_lib.and_masks(*parts)


def _kv_block_range(spec: _Spec, aux: dict, i: Array) -> tuple[Array, Array]:
  """The key blocks [lo, hi) that query block i can see; the others are never visited."""
  q_first = i * spec.block_q
  q_last = jnp.minimum(q_first + spec.block_q, spec.q_len) - 1
  lo, hi = jnp.int32(0), jnp.int32(spec.kv_len - 1)  # first and last visible key position
  if (spec.is_causal and aux["prefix"] is None) or spec.chunk_size is not None:
    hi = jnp.minimum(hi, q_last)
  if aux["prefix"] is not None and spec.chunk_size is None:
    hi = jnp.minimum(hi, jnp.maximum(q_last, jnp.max(aux["prefix"]) - 1))
  if spec.window is not None:
    left, right = spec.window
    lo = jnp.maximum(lo, q_first - left)
    hi = jnp.minimum(hi, q_last + right)
  if spec.chunk_size is not None:
    lo = jnp.maximum(lo, q_first // spec.chunk_size * spec.chunk_size)
  if aux["kv_lengths"] is not None:
    hi = jnp.minimum(hi, jnp.max(aux["kv_lengths"]) - 1)
  if aux["q_lengths"] is not None:
    hi = jnp.where(q_first < jnp.max(aux["q_lengths"]), hi, -1)
  lo_block = lo // spec.block_kv
  return lo_block, jnp.maximum(lo_block, hi // spec.block_kv + 1)


def _logits(spec: _Spec, q: Array, k: Array, bias: Array | None, i, j) -> tuple[Array, Array]:
  """Tile logits `[B, K, bq, G, bk]` in float32 and tanh of the capped logits (or None)."""
  batch, heads, rows, head_dim = q.shape
  s = jnp.einsum("bkqh,bksh->bkqs", q, k, preferred_element_type=_F32) * _F32(spec.scale)
  s = s.reshape(batch, heads, rows // spec.groups, spec.groups, k.shape[2])
  tanh = None
  if spec.softcap is not None:
    tanh = jnp.tanh(s / spec.softcap)
    s = spec.softcap * tanh
  if bias is not None:
    s = s + _tile(bias, i, j, spec).astype(_F32)
  return s, tanh


def _skip_empty(spec: _Spec, aux: dict, mask: Array | None, step, carry):
  """Run `step` on the tile only if some entry is unmasked, when that can vary at run time."""
  if mask is None or (aux["q_ids"] is None and aux["mask"] is None):
    return step(carry)
  return jax.lax.cond(jnp.any(mask), step, lambda c: c, carry)


def _forward(spec: _Spec, q, k, v, bias, aux) -> tuple[Array, Array]:
  """Output `[B, K, Tp, G, Hv]` (float32) and log-sum-exp `[B, K, Tp, G]` of every row."""
  batch, heads, _, groups, head_dim = q.shape
  value_dim, bq, bk = v.shape[-1], spec.block_q, spec.block_kv
  neg = masks_lib.large_negative(_F32)
  q_blocks = q.reshape(batch, heads, -1, bq * groups, head_dim).transpose(2, 0, 1, 3, 4)

  def query_block(_, xs):
    i, q_blk = xs

    def key_block(j, carry):
      k_blk = jax.lax.dynamic_slice_in_dim(k, j * bk, bk, 2)
      v_blk = jax.lax.dynamic_slice_in_dim(v, j * bk, bk, 2)
      mask = _tile_mask(spec, aux, i, j)

      def step(carry):
        row_max, row_sum, acc = carry
        s, _ = _logits(spec, q_blk, k_blk, bias, i, j)
        if mask is not None:
          s = jnp.where(mask, s, neg)
        m_new = jnp.maximum(row_max, jnp.max(s, axis=-1))
        p = jnp.exp(s - m_new[..., None])
        if mask is not None:  # a row masked so far has m_new == neg: exp(0) must not count
          p = jnp.where(mask, p, 0.0)
        alpha = jnp.exp(row_max - m_new)  # rescales what was summed under the old max
        pv = jnp.einsum("bkqs,bksh->bkqh", p.astype(v.dtype).reshape(batch, heads, -1, bk),
                        v_blk, preferred_element_type=_F32)
        acc = acc * alpha[..., None] + pv.reshape(acc.shape)
        return m_new, row_sum * alpha + jnp.sum(p, axis=-1), acc

      return _skip_empty(spec, aux, mask, step, carry)

    init = (jnp.full((batch, heads, bq, groups), neg), jnp.zeros((batch, heads, bq, groups), _F32),
            jnp.zeros((batch, heads, bq, groups, value_dim), _F32))
    lo, hi = _kv_block_range(spec, aux, i)
    row_max, row_sum, acc = jax.lax.fori_loop(lo, hi, key_block, init)
    live = row_sum > 0.0  # rows that saw no key at all output zeros
    safe_sum = jnp.where(live, row_sum, 1.0)
    out = jnp.where(live[..., None], acc / safe_sum[..., None], 0.0)
    return None, (out, jnp.where(live, row_max + jnp.log(safe_sum), 0.0))

  n_blocks = spec.padded_q // bq
  _, (out, lse) = jax.lax.scan(query_block, None, (jnp.arange(n_blocks), q_blocks))
  out = out.transpose(1, 2, 0, 3, 4, 5).reshape(batch, heads, spec.padded_q, groups, value_dim)
  return out, lse.transpose(1, 2, 0, 3, 4).reshape(batch, heads, spec.padded_q, groups)


def _backward(spec: _Spec, res, dout) -> tuple:
  """dq, dk, dv (and dbias) by recomputing each tile's weights from the saved log-sum-exp."""
  q, k, v, bias, aux, out, lse = res
  batch, heads, _, groups, head_dim = q.shape
  value_dim, bq, bk = v.shape[-1], spec.block_q, spec.block_kv
  n_blocks = spec.padded_q // bq
  # delta_i = sum_j P_ij dP_ij = dout_i . out_i: the softmax backward's row term, O(T).
  delta = jnp.sum(dout.astype(_F32) * out, axis=-1)

  def blocks(x):  # [B, K, Tp, G, ...] -> [n_blocks, B, K, bq, G, ...]
    x = x.reshape(batch, heads, n_blocks, bq, *x.shape[3:])
    return jnp.moveaxis(x, 2, 0)

  def query_block(carry, xs):
    i, q_blk, do_blk, lse_blk, delta_blk = xs
    q_blk = q_blk.reshape(batch, heads, bq * groups, head_dim)
    do_blk = do_blk.reshape(batch, heads, bq * groups, value_dim)

    def key_block(j, carry):
      k_blk = jax.lax.dynamic_slice_in_dim(k, j * bk, bk, 2)
      v_blk = jax.lax.dynamic_slice_in_dim(v, j * bk, bk, 2)
      mask = _tile_mask(spec, aux, i, j)

      def step(carry):
        dq, dk, dv, dbias = carry
        s, tanh = _logits(spec, q_blk, k_blk, bias, i, j)
        p = jnp.exp(s - lse_blk[..., None])
        if mask is not None:
          p = jnp.where(mask, p, 0.0)
        p_flat = p.reshape(batch, heads, -1, bk)
        dv_blk = jnp.einsum("bkqs,bkqh->bksh", p_flat.astype(do_blk.dtype), do_blk,
                            preferred_element_type=_F32)
        dp = jnp.einsum("bkqh,bksh->bkqs", do_blk, v_blk, preferred_element_type=_F32)
        ds = p * (dp.reshape(p.shape) - delta_blk[..., None])  # d loss / d (capped + bias)
        if dbias is not None:
          dbias = _write_bias_tile(spec, dbias, ds, i, j)
        if tanh is not None:
          ds = ds * (1.0 - tanh * tanh)
        ds = (ds * _F32(spec.scale)).reshape(batch, heads, -1, bk)
        dq = dq + jnp.einsum("bkqs,bksh->bkqh", ds.astype(k.dtype), k_blk,
                             preferred_element_type=_F32)
        dk_blk = jnp.einsum("bkqs,bkqh->bksh", ds.astype(q.dtype), q_blk,
                            preferred_element_type=_F32)
        dk = jax.lax.dynamic_update_slice_in_dim(
            dk, jax.lax.dynamic_slice_in_dim(dk, j * bk, bk, 2) + dk_blk, j * bk, 2)
        dv = jax.lax.dynamic_update_slice_in_dim(
            dv, jax.lax.dynamic_slice_in_dim(dv, j * bk, bk, 2) + dv_blk, j * bk, 2)
        return dq, dk, dv, dbias

      return _skip_empty(spec, aux, mask, step, carry)

    dk, dv, dbias = carry
    lo, hi = _kv_block_range(spec, aux, i)
    dq = jnp.zeros((batch, heads, bq * groups, head_dim), _F32)
    dq, dk, dv, dbias = jax.lax.fori_loop(lo, hi, key_block, (dq, dk, dv, dbias))
    return (dk, dv, dbias), dq

  init = (jnp.zeros(k.shape, _F32), jnp.zeros(v.shape, _F32),
          None if bias is None else jnp.zeros(bias.shape, _F32))
  xs = (jnp.arange(n_blocks), blocks(q), blocks(dout), blocks(lse), blocks(delta))
  (dk, dv, dbias), dq = jax.lax.scan(query_block, init, xs)
  dq = dq.reshape(n_blocks, batch, heads, bq, groups, head_dim)
  dq = jnp.moveaxis(dq, 0, 2).reshape(q.shape)
  dbias = None if bias is None else dbias.astype(bias.dtype)
  no_grad = jax.tree.map(lambda _: None, aux)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dbias, no_grad


def _write_bias_tile(spec: _Spec, dbias: Array, ds: Array, i: Array, j: Array) -> Array:
  """Store tile (i, j) of d loss / d bias, summed over the axes the bias broadcasts along."""
  b, n, t, s = dbias.shape
  batch, heads, bq, groups, bk = ds.shape
  tile = ds.transpose(0, 1, 3, 2, 4).reshape(batch, heads * groups, bq, bk)
  tile = jnp.sum(tile, axis=tuple(a for a, d in enumerate((b, n, t, s)) if d == 1), keepdims=True)
  start = (0, 0, i * bq if t > 1 else 0, j * bk if s > 1 else 0)
  if t == 1 or s == 1:  # several tiles land on the same broadcast row or column: accumulate
    tile = tile + jax.lax.dynamic_slice(dbias, start, tile.shape)
  return jax.lax.dynamic_update_slice(dbias, tile, start)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention_vjp(spec: _Spec, q, k, v, bias, aux) -> Array:
  return _forward(spec, q, k, v, bias, aux)[0]


def _attention_fwd(spec: _Spec, q, k, v, bias, aux):
  out, lse = _forward(spec, q, k, v, bias, aux)
  return out, (q, k, v, bias, aux, out, lse)


_attention_vjp.defvjp(_attention_fwd, _backward)


def _attention(spec: _Spec, q, k, v, bias, aux) -> Array:
  """Padded, grouped inputs -> float32 output `[B, K, Tp, G, Hv]`."""
  if math.prod(q.shape) == 0 or math.prod(k.shape) == 0:
    return jnp.zeros((*q.shape[:-1], v.shape[-1]), _F32)
  return _attention_vjp(spec, q, k, v, bias, aux)
