"""FAVOR+ attention (Performer; Choromanski et al. 2021, "Rethinking Attention with Performers").

Linear attention (`attn.ops.linear`) whose positive orthogonal random features phi make
phi(q) . phi(k) an unbiased estimate of exp(q . k * scale), so the normalized output estimates
softmax attention in O(T) time and memory. The features are exponentials: each key's are
divided by a constant (the max of its log-features over the keys a query sees) that cancels in
the normalization, so none overflows or underflows; see `performer_attention`.

Shapes: B batch, T query length, S key length, N query heads, K key/value heads (N % K == 0),
H head dim, Hv value head dim, M random features, L new tokens of a decoding step.
"""

import jax
import jax.numpy as jnp
import numpy as np

from attn.ops import linear

Array = jax.Array

_F32 = jnp.float32


def orthogonal_random_features(rng: Array, num_features: int, head_dim: int) -> Array:
  """`[M, H]` Gaussian directions made orthogonal in blocks of H, with chi-distributed norms.

  Orthogonal rows lower the variance of the FAVOR+ estimate (Choromanski et al. 2021, sec. 2.4);
  rescaling each row to the norm of an independent Gaussian vector keeps every row marginally
  N(0, I), so the estimate stays unbiased. Redraw by passing a new `rng`.

  Args:
    rng: PRNG key.
    num_features: M, the number of random features.
    head_dim: H.

  Returns:
    float32 `[M, H]`.
  """
  n_blocks = -(-num_features // head_dim)
  block_key, norm_key = jax.random.split(rng)
  gaussian = jax.random.normal(block_key, (n_blocks, head_dim, head_dim), _F32)
  q, r = jnp.linalg.qr(gaussian)  # [n_blocks, H, H], orthonormal columns
  # QR's sign convention skews the directions; fixing the signs by R's diagonal makes Q
  # uniformly (Haar) distributed, which the unbiased estimate needs.
  q = q * jnp.sign(jnp.diagonal(r, axis1=1, axis2=2))[:, None, :]
  directions = jnp.swapaxes(q, 1, 2).reshape(n_blocks * head_dim, head_dim)[:num_features]
  norms = jnp.linalg.norm(jax.random.normal(norm_key, (num_features, head_dim), _F32), axis=-1)
  return directions * norms[:, None]


def favor_features(x: Array, projection: Array, *, is_query: bool, scale: float | None = None,
                   eps: float = 1e-6, key_max: Array | None = None) -> Array:
  """Positive random features with E[phi(q) . phi(k)] = exp(q . k * scale).

  phi(x) = exp(w_m . x' - |x'|^2 / 2) / sqrt(M) with x' = x * sqrt(scale). A constant is
  subtracted inside the exp for range (per query row; for keys one that the keys a query sees
  share, see `performer_attention`): it cancels in the normalized attention.

  Args:
    x: `[B, T, N, H]`.
    projection: `[M, H]` from `orthogonal_random_features`.
    is_query: queries or keys (they are stabilized differently, see above).
    scale: the softmax logit scale being approximated; default 1 / sqrt(H).
    eps: added to every feature, so no normalizer is exactly zero.
    key_max: `[B, 1|T, N, 1]` the key constant(s) to use (`performer_attention` passes the
      max over the keys each query sees); None = the max over these keys.

  Returns:
    float32 `[B, T, N, M]`.
  """
  logits = _favor_logits(x, projection, scale)
  if is_query:
    stabilizer = jnp.max(logits, axis=-1, keepdims=True)
  else:
    stabilizer = jnp.max(logits, axis=(1, 3), keepdims=True) if key_max is None else key_max
  stabilizer = jax.lax.stop_gradient(stabilizer)
  return (jnp.exp(logits - stabilizer) + eps) * np.float32(projection.shape[0]**-0.5)


def _favor_logits(x: Array, projection: Array, scale: float | None) -> Array:
  """w_m . x' - |x'|^2 / 2, float32 `[B, T, N, M]`: the log of FAVOR+'s features."""
  scale = x.shape[-1]**-0.5 if scale is None else scale
  x = x.astype(_F32) * np.float32(np.sqrt(scale))
  wx = jnp.einsum("btnh,mh->btnm", x, projection.astype(_F32))
  return wx - 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)


# The FAVOR+ features are positive, so only a row without keys has a zero normalizer: the
# tiniest eps turns its 0 / 0 into 0 without biasing any other row. The keys' features get no
# eps of their own: one added after the key constant is relative to it, so it would make the
# output depend on which keys share the constant (a packed row, the keys decoded so far).
_FAVOR_EPS = float(np.finfo(np.float32).tiny)


def performer_attention(
    query: Array,
    key: Array,
    value: Array,
    projection: Array,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    key_value_seq_lengths: Array | None = None,
    segment_ids: Array | None = None,
    chunk_size: int = 64,
    return_weights: bool = False,
) -> Array | tuple[Array, Array]:
  """FAVOR+ attention: linear attention whose features estimate the softmax kernel.

  The keys' features are divided by exp(max of their log-features), a constant that cancels in the
  normalization if the keys a query sees share it. Non-causal: the max over the real keys (per
  packed sequence). Causal: the running max up to each key, and each query puts the keys it sees
  on its own position's constant (the `key_stabilizer` of `linear.linear_attention`), as the
  online softmax does. So no query's keys underflow against a larger key it does not see. With one
  max over all positions (as in the Performer paper's code, which adds an eps to every key feature
  and so turns such rows into eps-weighted averages instead), a row whose keys have larger norms
  than a later key's got a normalizer of 0 and NaN gradients here (head dimension 256, at step 7
  of training). A later key never moves an earlier output, not even by rounding.

  Args:
    query: `[B, T, N, H]`.
    key: `[B, S, K, H]` with N % K == 0.
    value: `[B, S, K, Hv]`.
    projection: `[M, H]` random features (`orthogonal_random_features`); more features, lower
      variance.
    scale: the softmax logit scale being approximated; default 1 / sqrt(H).
    is_causal: causal (chunk-wise prefix sums, see `linear.linear_attention`).
    key_value_seq_lengths: int `[B]`; keys past the length contribute nothing.
    segment_ids: int `[B, T]` packed sequences, 0 = padding (see `linear.linear_attention`).
    chunk_size: chunk length of the chunk-wise computation.
    return_weights: also return the implicit `[B, N, T, S]` attention matrix.

  Returns:
    `[B, T, N, Hv]` in the query's dtype; with `return_weights`, (output, weights).
  """
  logits = jax.lax.stop_gradient(_favor_logits(key, projection, scale))
  own = jnp.max(logits, axis=-1)  # [B, S, K] each key's largest log-feature
  valid = jnp.ones(key.shape[:2], bool)
  if key_value_seq_lengths is not None:
    valid &= jnp.arange(key.shape[1])[None, :] < jnp.asarray(key_value_seq_lengths)[:, None]
  sequences = jnp.zeros(key.shape[:2], jnp.int32)
  if segment_ids is not None and jnp.shape(segment_ids) == key.shape[:2]:
    sequences = jnp.asarray(segment_ids)
    valid &= sequences != 0
  # The key constant: the max over the keys a query sees (padding excluded, one sequence of a
  # packed row at a time), a running max if causal.
  seen = jnp.where(valid[..., None], own, -jnp.inf)
  key_max = (_running_max(seen, sequences) if is_causal else _segment_max(seen, sequences))
  key_max = jnp.where(jnp.isfinite(key_max), key_max, own)  # before any real key: unseen
  features_max = jnp.where(valid[..., None], key_max, own)  # padding keys stay finite too
  return linear.linear_attention(
      query, key, value,
      feature_map=lambda q: favor_features(q, projection, is_query=True, scale=scale),
      key_feature_map=lambda k: favor_features(k, projection, is_query=False, scale=scale,
                                               eps=0.0, key_max=features_max[..., None]),
      key_stabilizer=key_max if is_causal else None, is_causal=is_causal,
      key_value_seq_lengths=key_value_seq_lengths, segment_ids=segment_ids,
      chunk_size=chunk_size, eps=_FAVOR_EPS, return_weights=return_weights)


def _running_max(x: Array, segments: Array) -> Array:
  """`[B, T, K]`: the max of x `[B, T, K]` over each position's segment up to the position
  (segments: int `[B, T]`, contiguous ids)."""

  def combine(earlier, later):  # a running max that restarts where a segment starts
    (start1, max1), (start2, max2) = earlier, later
    return start1 | start2, jnp.where(start2, max2, jnp.maximum(max1, max2))

  starts = jnp.concatenate([jnp.ones_like(segments[:, :1], bool),
                            segments[:, 1:] != segments[:, :-1]], axis=1)
  return jax.lax.associative_scan(combine, (starts[..., None], x), axis=1)[1]


def _segment_max(x: Array, segments: Array) -> Array:
  """`[B, T, K]`: the max of x `[B, T, K]` over each position's whole segment."""
  backward = _running_max(x[:, ::-1], segments[:, ::-1])[:, ::-1]
  return jnp.maximum(_running_max(x, segments), backward)


def performer_attention_step(
    query: Array,
    key: Array,
    value: Array,
    projection: Array,
    state: linear.RecurrentState,
    *,
    scale: float | None = None,
    chunk_size: int = 64,
) -> tuple[Array, linear.RecurrentState]:
  """Causal FAVOR+ of L new tokens after the `state`'s tokens (`linear.linear_attention_step`).

  The key constant of `favor_features` must be one for all keys of a sequence, but decoding
  meets the keys one by one: the state keeps the running max (`key_max`) and, when a new key
  raises it, rescales S and z by exp(old - new) (the online-softmax trick), so the features
  never overflow and the normalized output is the one of `performer_attention`.

  Args:
    query: `[B, L, N, H]`.
    key: `[B, L, K, H]`.
    value: `[B, L, K, Hv]`.
    projection: `[M, H]`.
    state: `linear.init_state(B, K, M, Hv)` or a previous step's.
    scale: as in `performer_attention`.
    chunk_size: for L > 1.

  Returns:
    (`[B, L, N, Hv]` in the query's dtype, the state after the L tokens).
  """
  logits = jax.lax.stop_gradient(_favor_logits(key, projection, scale))
  running = _running_max(jnp.max(logits, axis=-1), jnp.zeros(key.shape[:2], jnp.int32))
  key_max = jnp.where(state.length > 0, jnp.maximum(state.key_max[:, None], running), running)
  return linear.linear_attention_step(
      query, key, value, state,
      feature_map=lambda q: favor_features(q, projection, is_query=True, scale=scale),
      key_feature_map=lambda k: favor_features(k, projection, is_query=False, scale=scale,
                                               eps=0.0, key_max=key_max[..., None]),
      key_stabilizer=key_max, chunk_size=chunk_size, eps=_FAVOR_EPS)
