"""Kernelized (linear) attention: softmax(Q K^T) replaced by phi(Q) phi(K)^T, O(T) time and memory.

out_t = sum_s phi(q_t) . phi(k_s) v_s / sum_s phi(q_t) . phi(k_s), computed as phi(q_t) times the
`[F, Hv]` summary sum_s phi(k_s) v_s^T, so no `T x S` matrix exists. The causal form is computed
chunk-wise (Katharopoulos et al. 2020; the chunked form of Hua et al. 2022 and of later linear
RNNs): inside a chunk of C positions an explicit causal `C x C` product, across chunks a prefix
sum of the chunk summaries (a sequential scan), which costs O(T C F + T F Hv).

Feature maps: `elu_plus_one` (Katharopoulos et al. 2020, "Transformers are RNNs") and FAVOR+
positive orthogonal random features (Choromanski et al. 2021, "Rethinking Attention with
Performers"), whose normalized attention is an unbiased-numerator estimate of softmax attention.

Shapes: B batch, T query length, S key length, N query heads, K key/value heads (N % K == 0),
G = N // K, H head dim, Hv value head dim, F features, M random features, C chunk length.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
FeatureMap = Callable[[Array], Array]

_F32 = jnp.float32


def elu_plus_one(x: Array) -> Array:
  """elu(x) + 1: a positive feature map, so every normalizer is positive."""
  return jax.nn.elu(x) + 1.0


def identity(x: Array) -> Array:
  """No feature map: phi(q) . phi(k) = q . k (softmax-free dot-product attention)."""
  return x


def linear_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    feature_map: FeatureMap = elu_plus_one,
    key_feature_map: FeatureMap | None = None,
    is_causal: bool = False,
    key_value_seq_lengths: Array | None = None,
    normalize: bool = True,
    chunk_size: int = 64,
    eps: float = 1e-6,
) -> Array:
  """Linear attention phi(Q) phi(K)^T V, normalized per row, in O(T) memory.

  Args:
    query: `[B, T, N, H]`.
    key: `[B, S, K, H]` with N % K == 0 (GQA / MQA share the key summaries).
    value: `[B, S, K, Hv]`.
    feature_map: phi, applied to the queries (and to the keys unless `key_feature_map`);
      `[..., H] -> [..., F]`. Use `identity` with `normalize=False` for (Q K^T) V.
    key_feature_map: a different phi for the keys (FAVOR+ stabilizes them differently).
    is_causal: query t sees keys s <= t (top-left aligned when T != S, as in `masks`).
    key_value_seq_lengths: int `[B]`; keys past the length contribute nothing.
    normalize: divide by sum_s phi(q_t) . phi(k_s) (+ eps); False gives the raw sum.
    chunk_size: C of the causal chunk-wise computation (memory O(T C), time O(T C F)).
    eps: added to the normalizer; a row with no visible key outputs zeros.

  Returns:
    `[B, T, N, Hv]` in the query's dtype.
  """
  batch, q_len, num_heads, _ = query.shape
  kv_len, num_kv_heads, value_dim = key.shape[1], key.shape[2], value.shape[-1]
  groups = num_heads // num_kv_heads
  phi_q = feature_map(query.astype(_F32))
  phi_q = phi_q.reshape(batch, q_len, num_kv_heads, groups, phi_q.shape[-1])
  phi_k = (key_feature_map or feature_map)(key.astype(_F32))
  v = value.astype(_F32)
  if key_value_seq_lengths is not None:
    valid = jnp.arange(kv_len)[None, :] < jnp.asarray(key_value_seq_lengths)[:, None]
    phi_k = jnp.where(valid[:, :, None, None], phi_k, 0.0)
  if is_causal:
    num, den = _causal(phi_q, phi_k, v, chunk_size)
  else:
    # The [F, Hv] key summary first: no T x S matrix is ever formed.
    num = jnp.einsum("btkgf,bkfh->btkgh", phi_q, jnp.einsum("bskf,bskh->bkfh", phi_k, v))
    den = jnp.einsum("btkgf,bkf->btkg", phi_q, jnp.sum(phi_k, axis=1))
  out = num / (den[..., None] + eps) if normalize else num
  return out.reshape(batch, q_len, num_heads, value_dim).astype(query.dtype)


def _causal(phi_q: Array, phi_k: Array, v: Array, chunk_size: int) -> tuple[Array, Array]:
  """Causal numerator `[B, T, K, G, Hv]` and normalizer `[B, T, K, G]`, chunk by chunk."""
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
  if pad:
    phi_q = jnp.pad(phi_q, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
    phi_k = jnp.pad(phi_k, ((0, 0), (0, pad), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
  n = padded // c
  value_dim = v.shape[-1]
  # Heads-major, with the G query heads of a key/value head stacked inside each chunk: every
  # product below is a plain batched matmul over [B, K, n], no transposed outputs (~10% faster
  # fwd+bwd at T = 2048-4096 on CPU than the [B, n, C, K, G] layout).
  q_c = (phi_q.reshape(batch, n, c, heads, groups, features).transpose(0, 3, 1, 4, 2, 5)
         .reshape(batch, heads, n, groups * c, features))  # [B, K, n, G*C, F]
  k_c = phi_k.reshape(batch, n, c, heads, features).transpose(0, 3, 1, 2, 4)  # [B, K, n, C, F]
  v_c = v.reshape(batch, n, c, heads, value_dim).transpose(0, 3, 1, 2, 4)  # [B, K, n, C, Hv]
  # Inside a chunk: an explicit lower-triangular C x C product (one copy per query head).
  tril = jnp.tile(jnp.tril(jnp.ones((c, c), bool)), (groups, 1))  # [G*C, C]
  scores = jnp.where(tril, jnp.einsum("bkncf,bknsf->bkncs", q_c, k_c), 0.0)
  # Across chunks: the summaries of all earlier chunks (an exclusive prefix sum over n).
  kv = jnp.einsum("bknsf,bknsh->bknfh", k_c, v_c).transpose(0, 2, 1, 3, 4)  # [B, n, K, F, Hv]
  kv_before = _exclusive_prefix_sum(kv).transpose(0, 2, 1, 3, 4)
  z_before = _exclusive_prefix_sum(jnp.sum(k_c, axis=3).transpose(0, 2, 1, 3))
  num = (jnp.einsum("bkncs,bknsh->bknch", scores, v_c)
         + jnp.einsum("bkncf,bknfh->bknch", q_c, kv_before))
  den = (jnp.sum(scores, axis=-1)
         + jnp.einsum("bkncf,bknf->bknc", q_c, z_before.transpose(0, 2, 1, 3)))
  num = (num.reshape(batch, heads, n, groups, c, value_dim).transpose(0, 2, 4, 1, 3, 5)
         .reshape(batch, padded, heads, groups, value_dim))
  den = (den.reshape(batch, heads, n, groups, c).transpose(0, 2, 4, 1, 3)
         .reshape(batch, padded, heads, groups))
  return num[:, :q_len], den[:, :q_len]


def _exclusive_prefix_sum(x: Array) -> Array:
  """out[:, i] = sum of x[:, j] for j < i, along axis 1.

  On CPU a sequential scan: XLA:CPU's `jnp.cumsum` costs time quadratic in the number of chunks
  (at T = 4096, n = 64 chunks, it took more time than all the attention matmuls and made the
  causal form grow 6-7x from T = 1024 to 4096). Accelerators keep their parallel cumsum.
  """
  if jax.default_backend() != "cpu":
    return jnp.cumsum(x, axis=1) - x

  def step(total: Array, x_i: Array) -> tuple[Array, Array]:
    return total + x_i, total

  _, before = jax.lax.scan(step, jnp.zeros_like(x[:, 0]), jnp.moveaxis(x, 1, 0))
  return jnp.moveaxis(before, 0, 1)


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
                   eps: float = 1e-6) -> Array:
  """Positive random features with E[phi(q) . phi(k)] = exp(q . k * scale).

  phi(x) = exp(w_m . x' - |x'|^2 / 2) / sqrt(M) with x' = x * sqrt(scale). A constant is
  subtracted inside the exp for range (per query row; for keys one per batch and head, so it
  is the same for every key): it cancels in the normalized attention. The key constant is a max
  over all positions, so in the causal form a later key can move an earlier output by float
  rounding (~1e-7; gradients stay exactly causal through the stop_gradient).

  Args:
    x: `[B, T, N, H]`.
    projection: `[M, H]` from `orthogonal_random_features`.
    is_query: queries or keys (they are stabilized differently, see above).
    scale: the softmax logit scale being approximated; default 1 / sqrt(H).
    eps: added to every feature, so no normalizer is exactly zero.

  Returns:
    float32 `[B, T, N, M]`.
  """
  head_dim, num_features = x.shape[-1], projection.shape[0]
  scale = head_dim**-0.5 if scale is None else scale
  x = x.astype(_F32) * np.float32(np.sqrt(scale))
  wx = jnp.einsum("btnh,mh->btnm", x, projection.astype(_F32))
  sq = 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)
  axes = -1 if is_query else (1, 3)
  stabilizer = jax.lax.stop_gradient(jnp.max(wx - sq, axis=axes, keepdims=True))
  return (jnp.exp(wx - sq - stabilizer) + eps) * np.float32(num_features**-0.5)


def performer_attention(
    query: Array,
    key: Array,
    value: Array,
    projection: Array,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    key_value_seq_lengths: Array | None = None,
    chunk_size: int = 64,
) -> Array:
  """FAVOR+ attention: linear attention whose features estimate the softmax kernel.

  Args:
    query: `[B, T, N, H]`.
    key: `[B, S, K, H]` with N % K == 0.
    value: `[B, S, K, Hv]`.
    projection: `[M, H]` random features (`orthogonal_random_features`); more features, lower
      variance.
    scale: the softmax logit scale being approximated; default 1 / sqrt(H).
    is_causal: causal (chunk-wise prefix sums, see `linear_attention`).
    key_value_seq_lengths: int `[B]`; keys past the length contribute nothing.
    chunk_size: chunk length of the causal computation.

  Returns:
    `[B, T, N, Hv]` in the query's dtype.
  """
  return linear_attention(
      query, key, value,
      feature_map=lambda q: favor_features(q, projection, is_query=True, scale=scale),
      key_feature_map=lambda k: favor_features(k, projection, is_query=False, scale=scale),
      is_causal=is_causal, key_value_seq_lengths=key_value_seq_lengths, chunk_size=chunk_size,
      # The features are positive, so only a row without keys has a zero normalizer: the
      # tiniest eps turns its 0 / 0 into 0 without biasing any other row.
      eps=float(np.finfo(np.float32).tiny))
