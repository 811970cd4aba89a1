"""The gated delta rule (Gated DeltaNet, Yang, Kautz & Hatamizadeh 2024, ICLR 2025).

A linear recurrence with a matrix state S_t `[Hv, H]` per head:

  S_t = alpha_t S_{t-1} + beta_t (v_t - alpha_t S_{t-1} k_t) k_t^T,     o_t = S_t q_t

with L2-normalized q and k, a data-dependent decay alpha_t in (0, 1] and write strength beta_t
in (0, 1). alpha = 1 is plain DeltaNet (Schlag et al. 2021; Yang et al. 2024a). Three forms,
equal up to float rounding:

- `gated_delta_rule`: the chunkwise-parallel training form. Inside a chunk of C positions the
  WY representation (Bischof & Van Loan 1987, as used for DeltaNet by Yang et al. 2024a) turns
  the C sequential rank-1 updates into one unit-lower-triangular solve and a few C x C and
  C x H matmuls; across chunks a scan carries the `[H, Hv]` state. O(T C H + T H Hv) time,
  O(T C + (T / C) H Hv) memory.
- `gated_delta_step`: one token, the O(1)-state recurrence used for decoding.
- `gated_delta_recurrent`: `gated_delta_step` scanned over the sequence (a second, independent
  implementation the tests compare against).

`gated_delta_weights` gives the implicit attention matrix: the output is linear in the values,
o_t = sum_s W[t, s] v_s (zero initial state), and W is what the parallel form multiplies V by.

Packed sequences: the state restarts (is zeroed) wherever the segment id changes, so a token
never sees an earlier segment; padding past `key_value_seq_lengths` leaves the state unchanged.

Chunk derivation (state M = S^T `[H, Hv]`, gamma_t = prod_{j <= t} alpha_j inside the chunk,
M_0 the state entering it). By induction M_t = gamma_t M_0 + sum_{i <= t} (gamma_t / gamma_i)
k_i u_i^T with u_t = beta_t (v_t - gamma_t M_0^T k_t - sum_{i < t} (gamma_t / gamma_i)
(k_t . k_i) u_i), i.e. (I + A) u = beta v - beta gamma K M_0 with A strictly lower triangular,
A[t, i] = beta_t (gamma_t / gamma_i) k_t . k_i. So u = U - W M_0 with U = (I + A)^-1 beta V and
W = (I + A)^-1 beta gamma K, both independent of the state, and
  O = P U + (gamma Q - P W) M_0,   P[t, i] = (gamma_t / gamma_i) q_t . k_i for i <= t,
  M_C = gamma_C M_0 + sum_i (gamma_C / gamma_i) k_i u_i^T.
Ratios gamma_t / gamma_i are exp of differences of in-chunk cumulative log-decays (never
large), and every term that would cross a segment restart is masked out rather than decayed.

Shapes: B batch, T length, N heads, H query/key head dim, Hv value head dim, C chunk length,
n = ceil(T / C) chunks.
"""

import jax
import jax.numpy as jnp

Array = jax.Array

_F32 = jnp.float32
_EPS = 1e-6  # inside the L2 norm's square root, as in the reference implementation (fla)


def l2_normalize(x: Array, eps: float = _EPS) -> Array:
  """x / sqrt(|x|^2 + eps) over the last axis, in float32."""
  x = x.astype(_F32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def unit_lower_inverse(a: Array) -> Array:
  """(I + a)^-1 for strictly lower-triangular `a` `[..., C, C]`, by blocked inversion.

  [[X, 0], [Y, Z]]^-1 = [[X^-1, 0], [-Z^-1 Y X^-1, Z^-1]], applied to diagonal blocks of size
  1, 2, 4, ...: log2(C) levels of batched matmuls, ~C^3 / 3 multiply-adds, no sequential loop
  over rows. (XLA:CPU's batched `solve_triangular` took minutes for the fwd+bwd at T = 2048.)
  """
  c = a.shape[-1]
  size = 1 << max(0, (c - 1).bit_length())  # pad to a power of two: the inverse of I is I
  if size != c:
    a = jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, size - c), (0, size - c)])
  batch = a.shape[:-2]
  inv = jnp.ones((*batch, size, 1, 1), a.dtype)  # inverses of the 1 x 1 diagonal blocks
  b = 1
  while b < size:
    m = size // (2 * b)
    blocks = a.reshape(*batch, m, 2 * b, m, 2 * b)
    diag = jnp.moveaxis(jnp.diagonal(blocks, axis1=-4, axis2=-2), -1, -3)  # [..., m, 2b, 2b]
    x_inv, z_inv = inv[..., 0::2, :, :], inv[..., 1::2, :, :]
    y_inv = -z_inv @ diag[..., b:, :b] @ x_inv
    top = jnp.concatenate([x_inv, jnp.zeros_like(x_inv)], axis=-1)
    inv = jnp.concatenate([top, jnp.concatenate([y_inv, z_inv], axis=-1)], axis=-2)
    b *= 2
  return inv[..., 0, :c, :c]


def segment_restarts(segment_ids: Array | None, length: int, batch: int) -> Array:
  """bool `[B, T]`: True where the state restarts (the segment id differs from the previous).

  Position 0 never restarts, so an initial state (decoding) carries into the first token.
  """
  if segment_ids is None:
    return jnp.zeros((batch, length), bool)
  ids = jnp.asarray(segment_ids)
  return jnp.concatenate([jnp.zeros((batch, 1), bool), ids[:, 1:] != ids[:, :-1]], axis=1)


def _prepare(query, key, value, beta, log_alpha, *, scale, normalize_qk, key_value_seq_lengths):
  """float32 q (scaled), k, v `[B, T, N, *]`, beta and log-decay `[B, T, N]`."""
  q, k = (l2_normalize(query), l2_normalize(key)) if normalize_qk else (
      query.astype(_F32), key.astype(_F32))
  q = q * jnp.asarray(scale, _F32)
  beta = jnp.asarray(beta, _F32)
  g = jnp.zeros_like(beta) if log_alpha is None else jnp.asarray(log_alpha, _F32)
  if key_value_seq_lengths is not None:
    # Padding writes nothing and does not decay: the state after the last valid token is kept.
    valid = (jnp.arange(query.shape[1])[None, :]
             < jnp.asarray(key_value_seq_lengths)[:, None])[:, :, None]
    beta, g = jnp.where(valid, beta, 0.0), jnp.where(valid, g, 0.0)
  return q, k, value.astype(_F32), beta, g


def gated_delta_rule(
    query: Array,
    key: Array,
    value: Array,
    beta: Array,
    log_alpha: Array | None = None,
    *,
    segment_ids: Array | None = None,
    key_value_seq_lengths: Array | None = None,
    initial_state: Array | None = None,
    chunk_size: int = 64,
    scale: float = 1.0,
    normalize_qk: bool = True,
    return_final_state: bool = False,
) -> Array | tuple[Array, Array]:
  """Causal gated delta rule, chunkwise-parallel (the training form).

  Args:
    query: `[B, T, N, H]`.
    key: `[B, T, N, H]`.
    value: `[B, T, N, Hv]`.
    beta: write strengths `[B, T, N]`, in (0, 1) (a sigmoid in the layer).
    log_alpha: log of the decays `[B, T, N]`, <= 0; None is alpha = 1, plain DeltaNet.
    segment_ids: int `[B, T]`: the state restarts wherever the id changes (packed sequences).
    key_value_seq_lengths: int `[B]`: tokens past the length do not touch the state (their
      outputs are meaningless); the final state is the one after the last valid token.
    initial_state: float32 `[B, N, H, Hv]` (the state M = S^T entering position 0, e.g. a
      decoding cache); None is zeros.
    chunk_size: C; any T works (the last chunk is padded with no-op tokens).
    scale: multiplies the queries (the paper's o_t = S_t q_t is scale 1; fla uses H ** -0.5).
    normalize_qk: L2-normalize queries and keys (the paper; False takes them as given).
    return_final_state: also return the state after the last token.

  Returns:
    `[B, T, N, Hv]` in the value's dtype, or `(output, final_state [B, N, H, Hv] float32)`.
  """
  batch, length, heads, head_dim = query.shape
  value_dim = value.shape[-1]
  q, k, v, beta, g = _prepare(query, key, value, beta, log_alpha, scale=scale,
                              normalize_qk=normalize_qk,
                              key_value_seq_lengths=key_value_seq_lengths)
  restart = segment_restarts(segment_ids, length, batch)
  c = max(1, min(chunk_size, length))
  n = -(-length // c)
  pad = n * c - length
  if pad:  # no-op tokens: k = v = 0, beta = 0, alpha = 1 leave the state as it is
    q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
    beta, g = (jnp.pad(x, ((0, 0), (0, pad), (0, 0))) for x in (beta, g))
    restart = jnp.pad(restart, ((0, 0), (0, pad)))

  def chunks(x: Array) -> Array:  # [B, n*C, N, ...] -> heads-major [B, N, n, C, ...]
    x = x.reshape(batch, n, c, heads, *x.shape[3:])
    return jnp.moveaxis(x, 3, 1)

  q, k, v, beta, g = (chunks(x) for x in (q, k, v, beta, g))
  g = jnp.cumsum(g, axis=-1)  # log gamma_t inside each chunk
  # Restarts seen so far inside the chunk: two positions share a segment iff equal; a position
  # still continues the incoming state iff zero.
  seg = jnp.cumsum(restart.reshape(batch, 1, n, c).astype(jnp.int32), axis=-1)
  same = seg[..., :, None] == seg[..., None, :]  # [B, 1, n, C, C]
  carry = (seg == 0).astype(_F32)  # [B, 1, n, C]
  lower = jnp.tril(jnp.ones((1, 1, 1, c, c), bool))
  strict = jnp.tril(jnp.ones((1, 1, 1, c, c), bool), -1)

  def decay(mask: Array) -> Array:  # gamma_t / gamma_i where mask, else 0 (no inf anywhere)
    return jnp.exp(jnp.where(mask, g[..., :, None] - g[..., None, :], -jnp.inf))

  a = beta[..., None] * jnp.einsum("bnjck,bnjsk->bnjcs", k, k) * decay(strict & same)
  gamma = jnp.exp(g) * carry  # [B, N, n, C]
  rhs = jnp.concatenate([beta[..., None] * v, (beta * gamma)[..., None] * k], axis=-1)
  solved = jnp.einsum("bnjcs,bnjsd->bnjcd", unit_lower_inverse(a), rhs)
  u_pseudo, w = solved[..., :value_dim], solved[..., value_dim:]  # U [.., C, Hv], W [.., C, H]
  p = jnp.einsum("bnjck,bnjsk->bnjcs", q, k) * decay(lower & same)
  # Chunk-end quantities for the state update.
  last_same = (seg == seg[..., -1:]).astype(_F32)
  k_end = k * (jnp.exp(g[..., -1:] - g) * last_same)[..., None]  # [B, N, n, C, H]
  gamma_end = gamma[..., -1]  # [B, N, n]

  def step(state: Array, chunk: tuple[Array, ...]) -> tuple[Array, Array]:
    u_j, w_j, k_j, gamma_j = chunk
    u = u_j - jnp.einsum("bnck,bnkv->bncv", w_j, state)
    new = gamma_j[..., None, None] * state + jnp.einsum("bnck,bncv->bnkv", k_j, u)
    return new, state

  state0 = (jnp.zeros((batch, heads, head_dim, value_dim), _F32) if initial_state is None
            else jnp.asarray(initial_state, _F32))
  xs = tuple(jnp.moveaxis(x, 2, 0) for x in (u_pseudo, w, k_end, gamma_end))
  final, before = jax.lax.scan(step, state0, xs)
  before = jnp.moveaxis(before, 0, 2)  # [B, N, n, H, Hv]: the state entering each chunk
  out = (jnp.einsum("bnjcs,bnjsv->bnjcv", p, u_pseudo)
         + jnp.einsum("bnjck,bnjkv->bnjcv",
                      gamma[..., None] * q - jnp.einsum("bnjcs,bnjsk->bnjck", p, w), before))
  out = jnp.moveaxis(out, 1, 3).reshape(batch, n * c, heads, value_dim)[:, :length]
  out = out.astype(value.dtype)
  return (out, final) if return_final_state else out


def gated_delta_step(
    state: Array,
    query: Array,
    key: Array,
    value: Array,
    beta: Array,
    log_alpha: Array | None = None,
    *,
    restart: Array | None = None,
    scale: float = 1.0,
    normalize_qk: bool = True,
) -> tuple[Array, Array]:
  """One token of the recurrence: O(1) state, for decoding.

  Args:
    state: float32 `[B, N, H, Hv]` (M = S^T).
    query, key: `[B, N, H]`.
    value: `[B, N, Hv]`.
    beta: `[B, N]`.
    log_alpha: `[B, N]` or None (alpha = 1).
    restart: bool `[B]`: zero the state first (a new segment starts at this token).
    scale, normalize_qk: as in `gated_delta_rule`.

  Returns:
    `(output [B, N, Hv] in the value's dtype, new state)`.
  """
  q, k = (l2_normalize(query), l2_normalize(key)) if normalize_qk else (
      query.astype(_F32), key.astype(_F32))
  q = q * jnp.asarray(scale, _F32)
  state = jnp.asarray(state, _F32)
  if restart is not None:
    state = jnp.where(restart[:, None, None, None], 0.0, state)
  if log_alpha is not None:
    state = state * jnp.exp(jnp.asarray(log_alpha, _F32))[..., None, None]
  error = value.astype(_F32) - jnp.einsum("bnk,bnkv->bnv", k, state)
  state = state + jnp.einsum("bnk,bnv->bnkv", k * jnp.asarray(beta, _F32)[..., None], error)
  return jnp.einsum("bnk,bnkv->bnv", q, state).astype(value.dtype), state


def gated_delta_recurrent(
    query: Array,
    key: Array,
    value: Array,
    beta: Array,
    log_alpha: Array | None = None,
    *,
    segment_ids: Array | None = None,
    key_value_seq_lengths: Array | None = None,
    initial_state: Array | None = None,
    scale: float = 1.0,
    normalize_qk: bool = True,
    return_final_state: bool = False,
) -> Array | tuple[Array, Array]:
  """`gated_delta_rule` token by token (a scan of `gated_delta_step`); same arguments."""
  batch, length, heads, head_dim = query.shape
  q, k, v, beta, g = _prepare(query, key, value, beta, log_alpha, scale=1.0,
                              normalize_qk=normalize_qk,
                              key_value_seq_lengths=key_value_seq_lengths)
  restart = segment_restarts(segment_ids, length, batch)

  def step(state, xs):
    q_t, k_t, v_t, beta_t, g_t, restart_t = xs
    out, state = gated_delta_step(state, q_t, k_t, v_t, beta_t, g_t, restart=restart_t,
                                  scale=scale, normalize_qk=False)
    return state, out

  state0 = (jnp.zeros((batch, heads, head_dim, value.shape[-1]), _F32) if initial_state is None
            else jnp.asarray(initial_state, _F32))
  final, out = jax.lax.scan(step, state0, tuple(
      jnp.moveaxis(x, 1, 0) for x in (q, k, v, beta, g, restart)))
  out = jnp.moveaxis(out, 0, 1).astype(value.dtype)
  return (out, final) if return_final_state else out


def gated_delta_weights(
    query: Array,
    key: Array,
    beta: Array,
    log_alpha: Array | None = None,
    *,
    segment_ids: Array | None = None,
    key_value_seq_lengths: Array | None = None,
    scale: float = 1.0,
    normalize_qk: bool = True,
) -> Array:
  """The implicit attention matrix, float32 `[B, N, T, T]`: output = weights @ values.

  The chunk form with one chunk of T and a zero initial state: O = P (I + A)^-1 diag(beta) V.
  Lower triangular (causal) and zero across segment restarts; O(T^2) memory, for maps.
  """
  batch, length, heads, head_dim = query.shape
  # The values enter linearly: solve against the identity instead of V.
  eye = jnp.broadcast_to(jnp.eye(length, dtype=_F32)[None, :, None, :],
                         (batch, length, heads, length))
  out = gated_delta_rule(query, key, eye, beta, log_alpha, segment_ids=segment_ids,
                         key_value_seq_lengths=key_value_seq_lengths, chunk_size=length,
                         scale=scale, normalize_qk=normalize_qk)
  return jnp.moveaxis(out, 2, 1)  # [B, T, N, S] -> [B, N, T, S]
