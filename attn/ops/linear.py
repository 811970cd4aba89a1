"""Kernelized (linear) attention: softmax(Q K^T) replaced by phi(Q) phi(K)^T, O(T) time and memory.

out_t = sum_s phi(q_t) . phi(k_s) v_s / sum_s phi(q_t) . phi(k_s), computed as phi(q_t) times the
`[F, Hv]` summary sum_s phi(k_s) v_s^T, so no `T x S` matrix exists. The causal form is computed
chunk-wise (Katharopoulos et al. 2020; the chunked form of Hua et al. 2022 and of later linear
RNNs): inside a chunk of C positions an explicit causal `C x C` product, across chunks a prefix
sum of the chunk summaries (a sequential scan), which costs O(T C F + T F Hv).

Feature maps: `elu_plus_one` (Katharopoulos et al. 2020, "Transformers are RNNs") and
`identity`; FAVOR+ (Performer) random features are in `attn.ops.performer`, built on this.

Shapes: B batch, T query length, S key length, N query heads, K key/value heads (N % K == 0),
G = N // K, H head dim, Hv value head dim, F features, M random features, C chunk length.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
FeatureMap = Callable[[Array], Array]

_F32 = jnp.float32


def elu_plus_one(x: Array) -> Array:
  """elu(x) + 1: a positive feature map, so every normalizer is positive."""
  return jax.nn.elu(x) + 1.0


def identity(x: Array) -> Array:
  """No feature map: phi(q) . phi(k) = q . k (softmax-free dot-product attention)."""
  return x


class RecurrentState(NamedTuple):
  """The O(1)-per-token state of causal linear attention ("Transformers are RNNs").

  Attributes:
    kv: float32 `[B, K, F, Hv]`, S = sum_s phi(k_s) v_s^T over the tokens so far.
    z: float32 `[B, K, F]`, z = sum_s phi(k_s).
    key_max: float32 `[B, K]`, the constant FAVOR+ keys are stabilized by (`kv` and `z` hold
      features times exp(-key_max)); unused (0) for maps without a stabilizer.
    length: int32 scalar, tokens so far (0 = empty, as a zero-initialized cache is).
  """

  kv: Array
  z: Array
  key_max: Array
  length: Array


def init_state(batch: int, num_kv_heads: int, features: int, value_dim: int) -> RecurrentState:
  """An empty state: zeros (equal to a cache zero-initialized from its shapes)."""
  return RecurrentState(jnp.zeros((batch, num_kv_heads, features, value_dim), _F32),
                        jnp.zeros((batch, num_kv_heads, features), _F32),
                        jnp.zeros((batch, num_kv_heads), _F32), jnp.zeros((), jnp.int32))


def linear_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    feature_map: FeatureMap = elu_plus_one,
    key_feature_map: FeatureMap | None = None,
    key_stabilizer: Array | None = None,
    is_causal: bool = False,
    key_value_seq_lengths: Array | None = None,
    segment_ids: Array | None = None,
    normalize: bool = True,
    chunk_size: int = 64,
    eps: float = 1e-6,
    return_weights: bool = False,
) -> Array | tuple[Array, Array]:
  """Linear attention phi(Q) phi(K)^T V, normalized per row, in O(T) memory.

  Args:
    query: `[B, T, N, H]`.
    key: `[B, S, K, H]` with N % K == 0 (GQA / MQA share the key summaries).
    value: `[B, S, K, Hv]`.
    feature_map: phi, applied to the queries (and to the keys unless `key_feature_map`);
      `[..., H] -> [..., F]`. Use `identity` with `normalize=False` for (Q K^T) V.
    key_feature_map: a different phi for the keys (FAVOR+ stabilizes them differently).
    key_stabilizer: causal only, float32 `[B, S, K]`: the log-constant m_s each key's features
      were divided by (exp(-m_s)), a running max that never decreases inside a sequence.
      Query t weighs the keys it sees by exp(m_s - m_t), i.e. puts them all on its own
      position's constant, so a key seen by t never underflows against a later key's larger
      constant (FAVOR+, see `performer.performer_attention`). None: one constant for all keys.
    is_causal: query t sees keys s <= t (top-left aligned when T != S, as in `masks`).
    key_value_seq_lengths: int `[B]`; keys past the length contribute nothing.
    segment_ids: int `[B, T]` packed sequences (self-attention, T == S): a query sees the keys
      of its own segment only, so the causal prefix sums restart at every segment start. Equal
      ids must be contiguous (as the packer writes them); 0 is padding: its keys contribute
      nothing and its queries output zeros.
    normalize: divide by sum_s phi(q_t) . phi(k_s) (+ eps); False gives the raw sum.
    chunk_size: C of the chunk-wise computation (memory O(T C), time O(T C F)); causal, and
      non-causal with segments.
    eps: added to the normalizer; a row with no visible key outputs zeros.
    return_weights: also return the implicit attention matrix `[B, N, T, S]` (float32): the
      masked, normalized phi(q_t) . phi(k_s) that the output is the product of with V. It
      is T x S: for maps and tests, not for long sequences.

  Returns:
    `[B, T, N, Hv]` in the query's dtype; with `return_weights`, (output, weights).
  """
  batch, q_len, num_heads, _ = query.shape
  kv_len, value_dim = key.shape[1], value.shape[-1]
  if key_stabilizer is not None and not is_causal:
    raise ValueError("key_stabilizer is for causal attention; without a causal mask one "
                     "constant for all keys (the max over them) serves every query.")
  phi_q, phi_k, v = _features(query, key, value, feature_map, key_feature_map)
  if key_value_seq_lengths is not None:
    valid = jnp.arange(kv_len)[None, :] < jnp.asarray(key_value_seq_lengths)[:, None]
    phi_k = jnp.where(valid[:, :, None, None], phi_k, 0.0)
  segments = None
  if segment_ids is not None:
    segments = _check_segments(segment_ids, batch, q_len, kv_len)
    phi_k = jnp.where(segments[:, :, None, None] != 0, phi_k, 0.0)  # padding adds nothing
  if return_weights:
    return _with_weights(phi_q, phi_k, v, is_causal=is_causal, segments=segments,
                         stabilizer=key_stabilizer, normalize=normalize, eps=eps,
                         dtype=query.dtype)
  if is_causal or segments is not None:
    num, den = _chunked(phi_q, phi_k, v, chunk_size, causal=is_causal, segments=segments,
                        stabilizer=key_stabilizer)
  else:
    # The [F, Hv] key summary first: no T x S matrix is ever formed.
    num = jnp.einsum("btkgf,bkfh->btkgh", phi_q, jnp.einsum("bskf,bskh->bkfh", phi_k, v))
    den = jnp.einsum("btkgf,bkf->btkg", phi_q, jnp.sum(phi_k, axis=1))
  if segments is not None:  # padded queries output zeros and pass no gradient (not 0 / 0)
    real = segments[:, :, None, None] != 0
    num, den = jnp.where(real[..., None], num, 0.0), jnp.where(real, den, 1.0)
  out = num / (den[..., None] + eps) if normalize else num
  return out.reshape(batch, q_len, num_heads, value_dim).astype(query.dtype)


def linear_attention_step(
    query: Array,
    key: Array,
    value: Array,
    state: RecurrentState,
    *,
    feature_map: FeatureMap = elu_plus_one,
    key_feature_map: FeatureMap | None = None,
    key_stabilizer: Array | None = None,
    normalize: bool = True,
    chunk_size: int = 64,
    eps: float = 1e-6,
) -> tuple[Array, RecurrentState]:
  """Causal linear attention of L new tokens after the `state`'s tokens; the updated state.

  The recurrent form (Katharopoulos et al. 2020, sec. 3.4): out_t = phi(q_t) S_t /
  phi(q_t) . z_t with S_t = S_{t-1} + phi(k_t) v_t^T, z_t = z_{t-1} + phi(k_t); O(1) time and
  memory per token whatever the context. L > 1 (a prompt) runs chunk-wise on top of the state.

  Args:
    query: `[B, L, N, H]`.
    key: `[B, L, K, H]`.
    value: `[B, L, K, Hv]`.
    state: `init_state(B, K, F, Hv)` or a previous step's.
    feature_map, key_feature_map, normalize, chunk_size, eps: as in `linear_attention`.
    key_stabilizer: float32 `[B, L, K]`, the new keys' constants as in `linear_attention`,
      continuing `state.key_max` (the state is rescaled onto them; FAVOR+'s step). None: the
      state and the new keys share one constant.

  Returns:
    (`[B, L, N, Hv]` in the query's dtype, the state after the L tokens).
  """
  phi_q, phi_k, v = _features(query, key, value, feature_map, key_feature_map)
  batch, steps, heads, groups, _ = phi_q.shape
  num, den = _chunked(phi_q, phi_k, v, chunk_size, causal=True, initial=(state.kv, state.z),
                      stabilizer=key_stabilizer,
                      initial_stabilizer=None if key_stabilizer is None else state.key_max)
  out = num / (den[..., None] + eps) if normalize else num
  kv, z, key_max = state.kv, state.z, state.key_max
  if key_stabilizer is not None:  # the new state is on the last key's constant
    key_max = key_stabilizer[:, -1]
    decay = _rescale(state.key_max, key_max)
    kv, z = decay[..., None, None] * kv, decay[..., None] * z
    phi_k = phi_k * _rescale(key_stabilizer, key_max[:, None])[..., None]
  new_state = RecurrentState(kv + jnp.einsum("bskf,bskh->bkfh", phi_k, v),
                             z + jnp.sum(phi_k, axis=1), key_max, state.length + steps)
  return out.reshape(batch, steps, heads * groups, v.shape[-1]).astype(query.dtype), new_state


def _to_length(m: Array, length: int) -> Array:
  """The constants `[..., S]` of keys at positions 0..length-1 along the last axis: cut, or
  padded with the last one (top-left alignment: a query past S sees every key)."""
  m = m[..., :length]
  return jnp.pad(m, [(0, 0)] * (m.ndim - 1) + [(0, length - m.shape[-1])], mode="edge")


def _rescale(constant: Array, to: Array) -> Array:
  """exp(constant - to): features divided by exp(constant) put on the larger constant `to`.

  Clamped at 1: every use has constant <= to where the features are nonzero; elsewhere (keys
  that nobody sees, empty sums) the factor only has to be finite.
  """
  return jnp.exp(jnp.minimum(constant - to, 0.0))


def _features(query: Array, key: Array, value: Array, feature_map: FeatureMap,
              key_feature_map: FeatureMap | None) -> tuple[Array, Array, Array]:
  """phi(q) `[B, T, K, G, F]`, phi(k) `[B, S, K, F]` and v, in float32."""
  batch, q_len, num_heads, _ = query.shape
  num_kv_heads = key.shape[2]
  if num_heads % num_kv_heads:
    raise ValueError(f"query heads ({num_heads}) must be a multiple of key/value heads "
                     f"({num_kv_heads}).")
  phi_q = feature_map(query.astype(_F32))
  phi_q = phi_q.reshape(batch, q_len, num_kv_heads, num_heads // num_kv_heads, phi_q.shape[-1])
  phi_k = (key_feature_map or feature_map)(key.astype(_F32))
  return phi_q, phi_k, value.astype(_F32)


def _check_segments(segment_ids: Any, batch: int, q_len: int, kv_len: int) -> Array:
  """int32 `[B, T]` self-attention segment ids, or a ValueError saying what fits."""
  if isinstance(segment_ids, (tuple, list)) or q_len != kv_len or (
      jnp.shape(segment_ids) != (batch, q_len)):
    raise ValueError(
        f"linear attention takes segment_ids `[B, T]` = {(batch, q_len)} for packed "
        f"self-attention (T == S, got T = {q_len}, S = {kv_len}); for cross-attention between "
        f"packed sequences use attention='softmax'.")
  return jnp.asarray(segment_ids, jnp.int32)


def _visible(q_len: int, kv_len: int, is_causal: bool, segments: Array | None) -> Array | None:
  """`[B|1, T, S]` which key each query sees, or None for all (the T x S form of the mask)."""
  visible = None
  if is_causal:
    visible = (jnp.arange(kv_len)[None, :] <= jnp.arange(q_len)[:, None])[None]
  if segments is not None:
    same = segments[:, :, None] == segments[:, None, :]
    visible = same if visible is None else visible & same
  return visible


def _with_weights(phi_q: Array, phi_k: Array, v: Array, *, is_causal: bool,
                  segments: Array | None, stabilizer: Array | None, normalize: bool,
                  eps: float, dtype: Any) -> tuple[Array, Array]:
  """The output and the implicit `[B, N, T, S]` attention matrix, formed explicitly."""
  batch, q_len, heads, groups, _ = phi_q.shape
  scores = jnp.einsum("btkgf,bskf->bkgts", phi_q, phi_k)
  if stabilizer is not None:
    m = stabilizer.transpose(0, 2, 1)[:, :, None]  # [B, K, 1, S]
    scores = scores * _rescale(m[..., None, :], _to_length(m, q_len)[..., None])
  visible = _visible(q_len, phi_k.shape[1], is_causal, segments)
  if visible is not None:
    scores = jnp.where(visible[:, None, None], scores, 0.0)
  if normalize:
    scores = scores / (jnp.sum(scores, axis=-1, keepdims=True) + eps)
  out = jnp.einsum("bkgts,bskh->btkgh", scores, v)
  weights = scores.reshape(batch, heads * groups, q_len, phi_k.shape[1])
  return out.reshape(batch, q_len, heads * groups, v.shape[-1]).astype(dtype), weights


def _chunked(phi_q: Array, phi_k: Array, v: Array, chunk_size: int, *, causal: bool,
             segments: Array | None = None, stabilizer: Array | None = None,
             initial: tuple[Array, Array] | None = None,
             initial_stabilizer: Array | None = None) -> tuple[Array, Array]:
  """Numerator `[B, T, K, G, Hv]` and normalizer `[B, T, K, G]`, chunk by chunk.

  Inside a chunk an explicit C x C product (lower-triangular if causal, same-segment if
  packed); across chunks the summaries of earlier chunks (a prefix sum over chunks). With
  segments the carried summary is that of the segment crossing into each chunk only, so it
  restarts at every segment start; non-causal adds the same from the later chunks. `initial`
  (the recurrent state's S, z) is seen by every query. With a `stabilizer` (causal), every
  summary is put on the constant of its last key and every query rescales what it sees to its
  own constant (see `linear_attention`); `initial` is on `initial_stabilizer` `[B, K]`.
  """
  batch, q_len, heads, groups, features = phi_q.shape
  # Top-left alignment: query t sees keys 0..t, so keys past T are never seen and queries
  # past S see every key; zero-padded keys (phi = 0) stand in for the missing ones.
  phi_k, v = phi_k[:, :q_len], v[:, :q_len]
  if phi_k.shape[1] < q_len:
    pad = ((0, 0), (0, q_len - phi_k.shape[1]), (0, 0), (0, 0))
    phi_k, v = jnp.pad(phi_k, pad), jnp.pad(v, pad)
  c = max(1, min(chunk_size, q_len))
  padded = -(-q_len // c) * c
  pad = padded - q_len
  if stabilizer is not None:  # [B, K, n, C] the keys' constants; queries take the same
    m_c = _to_length(_to_length(stabilizer.transpose(0, 2, 1), q_len), padded)
    m_c = m_c.reshape(batch, heads, -1, c)
    m_q = jnp.tile(m_c, (1, 1, 1, groups))  # [B, K, n, G*C], as q_c below
    end = m_c[..., -1]  # [B, K, n] each chunk's summary is on its last key's constant
    before_end = jnp.concatenate([end[..., :1], end[..., :-1]], axis=-1)  # what it receives
  if pad:
    phi_q = jnp.pad(phi_q, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
    phi_k = jnp.pad(phi_k, ((0, 0), (0, pad), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
    if segments is not None:
      segments = jnp.pad(segments, ((0, 0), (0, pad)))
  n = padded // c
  value_dim = v.shape[-1]
  # Heads-major, with the G query heads of a key/value head stacked inside each chunk: every
  # product below is a plain batched matmul over [B, K, n], no transposed outputs (~10% faster
  # fwd+bwd at T = 2048-4096 on CPU than the [B, n, C, K, G] layout).
  q_c = (phi_q.reshape(batch, n, c, heads, groups, features).transpose(0, 3, 1, 4, 2, 5)
         .reshape(batch, heads, n, groups * c, features))  # [B, K, n, G*C, F]
  k_c = phi_k.reshape(batch, n, c, heads, features).transpose(0, 3, 1, 2, 4)  # [B, K, n, C, F]
  v_c = v.reshape(batch, n, c, heads, value_dim).transpose(0, 3, 1, 2, 4)  # [B, K, n, C, Hv]
  # Inside a chunk: an explicit C x C product (one copy per query head).
  visible = _visible(c, c, causal, None if segments is None else segments.reshape(-1, c))
  scores = jnp.einsum("bkncf,bknsf->bkncs", q_c, k_c)
  if visible is not None:
    visible = visible.reshape(-1, n if segments is not None else 1, c, c)
    visible = jnp.tile(visible, (1, 1, groups, 1))  # [B|1, n|1, G*C, C]
    scores = jnp.where(visible[:, None], scores, 0.0)
  if stabilizer is not None:
    scores = scores * _rescale(m_c[..., None, :], m_q[..., None])
  num = jnp.einsum("bkncs,bknsh->bknch", scores, v_c)
  den = jnp.sum(scores, axis=-1)
  # Summaries carried across chunks reach a query on its own constant: `[B, K, n, G*C]`.
  carried = None if stabilizer is None else _rescale(before_end[..., None], m_q)
  gate = None if stabilizer is None else _rescale(before_end, end)  # P_j onto chunk j's
  if stabilizer is not None:  # each chunk's keys on its last key's constant
    k_c = k_c * _rescale(m_c, end[..., None])[..., None]
  if segments is None and causal:
    # Across chunks: the summaries of all earlier chunks (an exclusive prefix sum over n).
    kv = jnp.einsum("bknsf,bknsh->bknfh", k_c, v_c).transpose(0, 2, 1, 3, 4)  # [B, n, K, F, Hv]
    z = jnp.sum(k_c, axis=3).transpose(0, 2, 1, 3)  # [B, n, K, F]
    kv_before, z_before = _exclusive_prefix_sum(
        (kv, z), gate=None if gate is None else gate.transpose(0, 2, 1))
    add_num, add_den = _times(carried, jnp.einsum("bkncf,bnkfh->bknch", q_c, kv_before),
                              jnp.einsum("bkncf,bnkf->bknc", q_c, z_before))
    num, den = num + add_num, den + add_den
  elif segments is not None:
    seg_c = segments.reshape(batch, n, c)
    for reverse in (False,) if causal else (False, True):
      kv_carried, z_carried, sees = _segment_carry(k_c, v_c, seg_c, reverse=reverse, scale=gate)
      sees = jnp.tile(sees, (1, 1, groups))[:, None]  # [B, 1, n, G*C]
      add_num, add_den = _times(carried, jnp.einsum("bkncf,bknfh->bknch", q_c, kv_carried),
                                jnp.einsum("bkncf,bknf->bknc", q_c, z_carried))
      num = num + jnp.where(sees[..., None], add_num, 0.0)
      den = den + jnp.where(sees, add_den, 0.0)
  if initial is not None:
    seen = None if initial_stabilizer is None else _rescale(
        initial_stabilizer[..., None, None], m_q)
    add_num, add_den = _times(seen, jnp.einsum("bkncf,bkfh->bknch", q_c, initial[0]),
                              jnp.einsum("bkncf,bkf->bknc", q_c, initial[1]))
    num, den = num + add_num, den + add_den
  num = (num.reshape(batch, heads, n, groups, c, value_dim).transpose(0, 2, 4, 1, 3, 5)
         .reshape(batch, padded, heads, groups, value_dim))
  den = (den.reshape(batch, heads, n, groups, c).transpose(0, 2, 4, 1, 3)
         .reshape(batch, padded, heads, groups))
  return num[:, :q_len], den[:, :q_len]


def _times(factor: Array | None, num: Array, den: Array) -> tuple[Array, Array]:
  """num `[..., Hv]` and den `[...]` times a per-query `factor` `[...]` (None: 1)."""
  return (num, den) if factor is None else (factor[..., None] * num, factor * den)


def _segment_carry(k_c: Array, v_c: Array, seg_c: Array, *, reverse: bool,
                   scale: Array | None = None) -> tuple[Array, Array, Array]:
  """What the chunks carry across their boundaries when the sequences are packed.

  Segments are contiguous, so only the segment of a chunk's first position can have keys in
  earlier chunks: chunk j receives the running sums of the segment open at the end of chunk
  j - 1, and only its queries of that segment use them. The running sums pass through chunk j
  whole only if chunk j lies entirely in that segment, else they restart from chunk j's keys
  of its last segment: state_{j+1} = [chunk j continues it] state_j + (chunk j's keys in its
  last segment). `reverse` does the same from the later chunks (the non-causal half). `scale`
  `[B, K, n]` (forward only) multiplies state_j on its way into chunk j + 1 (the stabilizer's
  change of constant).

  Returns:
    S `[B, K, n, F, Hv]` and z `[B, K, n, F]` carried into each chunk, and which queries
    `[B, n, C]` of each chunk see them.
  """
  if reverse:
    k_c, v_c, seg_c = k_c[:, :, ::-1, ::-1], v_c[:, :, ::-1, ::-1], seg_c[:, ::-1, ::-1]
  last = seg_c[:, :, -1]  # [B, n]
  # -1 is no segment id (ids are >= 0): the first chunk receives nothing.
  before = jnp.concatenate([jnp.full_like(last[:, :1], -1), last[:, :-1]], axis=1)
  sees = seg_c == before[:, :, None]  # [B, n, C]
  passes = jnp.all(sees, axis=-1)  # [B, n]
  k_last = jnp.where((seg_c == last[:, :, None])[:, None, :, :, None], k_c, 0.0)
  kv = jnp.einsum("bknsf,bknsh->bnkfh", k_last, v_c)
  z = jnp.sum(k_last, axis=3).transpose(0, 2, 1, 3)  # [B, n, K, F]
  gate = passes if scale is None else passes[..., None] * scale.transpose(0, 2, 1)
  kv, z = _exclusive_prefix_sum((kv, z), gate=gate)
  kv, z = kv.transpose(0, 2, 1, 3, 4), z.transpose(0, 2, 1, 3)
  if reverse:
    kv, z, sees = kv[:, :, ::-1], z[:, :, ::-1], sees[:, ::-1, ::-1]
  return kv, z, sees


def _exclusive_prefix_sum(x: Any, gate: Array | None = None) -> Any:
  """out[:, i] = sum of x[:, j] for j < i, along axis 1 (of every array in the pytree `x`).

  With a `gate` `[B, n, ...]` (boolean, or float factors broadcast against x's trailing axes):
  out[:, i + 1] = gate[:, i] * out[:, i] + x[:, i], i.e. a False gate restarts the sum.

  On CPU a sequential scan: XLA:CPU's `jnp.cumsum` costs time quadratic in the number of chunks
  (at T = 4096, n = 64 chunks, it took more time than all the attention matmuls and made the
  causal form grow 6-7x from T = 1024 to 4096). Accelerators keep a parallel scan.
  """
  leaves, tree = jax.tree.flatten(x)
  if jax.default_backend() != "cpu":
    if gate is None:
      return jax.tree.unflatten(tree, [jnp.cumsum(a, axis=1) - a for a in leaves])
    gates = [gate.reshape(gate.shape + (1,) * (a.ndim - gate.ndim)).astype(a.dtype)
             for a in leaves]

    def combine(earlier, later):  # (g1, s1) then (g2, s2): s = g2 s1 + s2, g = g1 g2
      (g1, s1), (g2, s2) = earlier, later
      return [a * b for a, b in zip(g1, g2, strict=True)], [
          b * s + t for b, s, t in zip(g2, s1, s2, strict=True)]

    _, inclusive = jax.lax.associative_scan(combine, (gates, leaves), axis=1)
    return jax.tree.unflatten(tree, [
        jnp.concatenate([jnp.zeros_like(a[:, :1]), a[:, :-1]], axis=1) for a in inclusive])

  def step(totals, inputs):  # totals: the sum before position i; its gate decides what passes
    xs, g = inputs
    kept = totals if g is None else [
        t * g.reshape(g.shape + (1,) * (t.ndim - g.ndim)).astype(t.dtype) for t in totals]
    return [t + x_i for t, x_i in zip(kept, xs, strict=True)], totals

  moved = [jnp.moveaxis(a, 1, 0) for a in leaves]
  g_moved = None if gate is None else jnp.moveaxis(gate, 1, 0)
  _, before = jax.lax.scan(step, [jnp.zeros_like(a[0]) for a in moved], (moved, g_moved))
  return jax.tree.unflatten(tree, [jnp.moveaxis(a, 0, 1) for a in before])
