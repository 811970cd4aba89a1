"""Linear attention and FAVOR+ against closed forms computed directly in float64 NumPy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.ops import linear, performer, reference
from tests import np_reference

B, T, N, H = 2, 19, 4, 8


def _qkv(num_kv_heads: int, seed: int = 0, gain: float = 1.0, kv_len: int = T):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(B, T, N, H)) * gain
  k = rng.normal(size=(B, kv_len, num_kv_heads, H)) * gain
  v = rng.normal(size=(B, kv_len, num_kv_heads, H))
  return tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v))


def _direct(phi_q, phi_k, v, *, causal: bool, normalize: bool, kv_valid=None) -> np.ndarray:
  """(phi(Q) phi(K)^T, masked) V with the T x S matrix formed explicitly, in float64."""
  phi_q, phi_k, v = (np.asarray(x, np.float64) for x in (phi_q, phi_k, v))
  groups = phi_q.shape[2] // phi_k.shape[2]
  phi_k, v = np.repeat(phi_k, groups, axis=2), np.repeat(v, groups, axis=2)
  scores = np.einsum("btnf,bsnf->bnts", phi_q, phi_k)
  if causal:
    i, j = np_reference.positions(phi_q.shape[1], phi_k.shape[1])
    scores = scores * (j <= i)
  if kv_valid is not None:
    scores = scores * kv_valid[:, None, None, :]
  if normalize:
    scores = scores / scores.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", scores, v)


@pytest.mark.parametrize("num_kv_heads, causal, jit", [
    (4, False, False), (2, True, True), (1, True, False), (4, True, True)])
def test_identity_feature_map_equals_softmax_free_attention(num_kv_heads, causal, jit):
  q, k, v = _qkv(num_kv_heads)

  def fn(q, k, v):  # chunk 5 does not divide T = 19: a partial last chunk
    return linear.linear_attention(q, k, v, feature_map=linear.identity, normalize=False,
                                   is_causal=causal, chunk_size=5)

  out = (jax.jit(fn) if jit else fn)(q, k, v)
  expected = _direct(q, k, v, causal=causal, normalize=False)
  np.testing.assert_allclose(out, expected, atol=2e-5, rtol=1e-5)


def test_causal_chunked_gradients_equal_the_direct_form():
  """Seven chunks of 3: the scanned prefix sum differentiates like the T x S computation."""
  q, k, v = _qkv(2, seed=3)
  chunked = functools.partial(linear.linear_attention, feature_map=linear.identity,
                              normalize=False, is_causal=True, chunk_size=3)

  def direct(q, k, v):
    k, v = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
    scores = jnp.einsum("btnf,bsnf->bnts", q, k) * jnp.tril(jnp.ones((1, 1, T, T)))
    return jnp.einsum("bnts,bsnh->btnh", scores, v)

  weights = jnp.asarray(np.random.default_rng(4).normal(size=(B, T, N, H)), jnp.float32)
  grads = [jax.grad(lambda *x, f=f: jnp.sum(f(*x) * weights), argnums=(0, 1, 2))(q, k, v)
           for f in (chunked, direct)]
  for ours, expected in zip(*grads, strict=True):
    np.testing.assert_allclose(ours, expected, atol=2e-5, rtol=1e-5)


def test_exclusive_prefix_sum_matches_numpy():
  x = np.random.default_rng(5).normal(size=(2, 9, 3, 4)).astype(np.float32)
  expected = np.cumsum(x, axis=1) - x
  np.testing.assert_allclose(linear._exclusive_prefix_sum(jnp.asarray(x)), expected,
                             atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("causal, kv_len", [(False, 12), (True, T), (True, 12), (True, 25)])
def test_elu_plus_one_matches_the_normalized_closed_form_with_padding(causal, kv_len):
  q, k, v = _qkv(2, seed=1, kv_len=kv_len)
  lengths = np.array([kv_len, 7])
  kv_valid = np.arange(kv_len)[None, :] < lengths[:, None]
  out = linear.linear_attention(q, k, v, is_causal=causal, chunk_size=4,
                                key_value_seq_lengths=jnp.asarray(lengths))
  expected = _direct(linear.elu_plus_one(q), linear.elu_plus_one(k), v, causal=causal,
                     normalize=True, kv_valid=kv_valid)
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("op", ["linear", "performer"])
def test_causality_gradient_wrt_future_keys_and_values_is_exactly_zero(op):
  q, k, v = (x[:1] for x in _qkv(2, seed=2, gain=0.5))
  projection = performer.orthogonal_random_features(jax.random.key(0), 16, H)

  def fn(k, v):
    if op == "linear":
      return linear.linear_attention(q, k, v, is_causal=True, chunk_size=4)
    return performer.performer_attention(q, k, v, projection, is_causal=True, chunk_size=4)

  jac_k, jac_v = jax.jit(jax.jacrev(fn, argnums=(0, 1)))(k, v)
  i, j = np_reference.positions(T, T)
  for jac in (jac_k, jac_v):
    per_pair = np.abs(np.asarray(jac)).sum(axis=(0, 2, 3, 4, 6, 7))  # [T, S]
    assert np.all(per_pair[j > i] == 0.0)
    assert np.all(per_pair[j < i] > 0.0)  # the test can fail


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_performer_converges_to_softmax_attention_as_features_grow(causal):
  q, k, v = _qkv(2, seed=3, gain=0.5)
  expected = reference.attention(q, k, v, is_causal=causal)
  errors = {}
  attend = jax.jit(lambda p: performer.performer_attention(q, k, v, p, is_causal=causal))
  features = jax.jit(performer.orthogonal_random_features, static_argnums=(1, 2))
  for m in (16, 512, 16384):
    outs = [attend(features(jax.random.key(seed), m, H)) for seed in range(2)]
    errors[m] = np.mean([np.mean(np.abs(np.asarray(o) - expected)) for o in outs])
  assert errors[16] > errors[512] > errors[16384], errors
  assert errors[16384] < 0.25 * errors[16], errors
  assert errors[16384] < 5e-3, errors


def test_orthogonal_random_features_are_orthogonal_in_blocks_and_redrawable():
  w = np.asarray(performer.orthogonal_random_features(jax.random.key(0), 20, H))
  assert w.shape == (20, H)
  for start in (0, H):  # each block of H rows is orthogonal
    block = w[start:start + H]
    gram = block @ block.T
    np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0.0, atol=1e-4)
  assert not np.allclose(w, performer.orthogonal_random_features(jax.random.key(1), 20, H))


def test_fully_masked_rows_are_zero_and_finite():
  q, k, v = _qkv(2, seed=4)
  lengths = jnp.array([T, 0])
  projection = performer.orthogonal_random_features(jax.random.key(0), 32, H)
  for fn in (lambda k: linear.linear_attention(q, k, v, key_value_seq_lengths=lengths),
             lambda k: performer.performer_attention(q, k, v, projection,
                                                  key_value_seq_lengths=lengths)):
    out, grad = jax.jit(jax.value_and_grad(lambda k, fn=fn: jnp.sum(fn(k) ** 2)))(k)
    out = jax.jit(fn)(k)
    assert np.all(np.asarray(out[1]) == 0.0) and np.any(np.asarray(out[0]) != 0.0)
    assert np.all(np.isfinite(np.asarray(grad)))


# Packed rows of T = 19 cut in chunks of 4: a segment through three whole chunks and into a
# partial last one, a segment starting exactly at a chunk start, several segments in one chunk,
# padding (0) at the end, and one unpacked row.
SEGMENTS = np.array([[1] * 3 + [2] * 14 + [0] * 2,
                     [1] * 5 + [2] * 2 + [3] + [4] * 9 + [5] * 2,
                     [7] * T])


def _np_elu_plus_one(x):
  """phi and dphi/dx of elu + 1, float64."""
  return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0))), np.where(x > 0, 1.0, np.exp(x))


def _np_favor(x, w, scale):
  """phi [..., M] of FAVOR+ (no stabilizer: it cancels) and the chain rule back to x, float64."""
  xs = x * np.sqrt(scale)
  phi = np.exp(xs @ w.T - 0.5 * np.sum(xs * xs, -1, keepdims=True)) / np.sqrt(w.shape[0])
  return phi, lambda dphi: np.sqrt(scale) * (np.einsum("...m,...m,mh->...h", dphi, phi, w)
                                             - np.sum(dphi * phi, -1, keepdims=True) * xs)


def _per_segment(op, q, k, v, segments, causal, dout, projection=None):
  """Each packed sequence run alone through the float64 oracle; outputs and input gradients
  put back at their positions (padding: zeros)."""
  q, k, v, dout = (np.asarray(x, np.float64) for x in (q, k, v, dout))
  out, grads = np.zeros_like(dout), [np.zeros_like(x) for x in (q, k, v)]
  for b, s in [(row, s) for row in range(len(segments)) for s in set(segments[row]) - {0}]:
    at = np.flatnonzero(segments[b] == s)
    qs, ks, vs = (x[b:b + 1, at] for x in (q, k, v))
    if op == "linear":
      (phi_q, dphi_q), (phi_k, dphi_k) = _np_elu_plus_one(qs), _np_elu_plus_one(ks)
      back_q, back_k = (lambda g, d=dphi_q: g * d), (lambda g, d=dphi_k: g * d)
    else:
      w = np.asarray(projection, np.float64)
      (phi_q, back_q), (phi_k, back_k) = _np_favor(qs, w, H**-0.5), _np_favor(ks, w, H**-0.5)
    i, j = np_reference.positions(len(at), len(at))
    o, _, (dq, dk, dv) = np_reference.linear_attention(
        phi_q, phi_k, vs, mask=(j <= i) if causal else None, dout=dout[b:b + 1, at])
    out[b, at] = o[0]
    for g, d in zip(grads, (back_q(dq), back_k(dk), dv), strict=True):
      g[b, at] = d[0]
  return out, grads


@pytest.mark.parametrize("op", ["linear", "performer"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_packed_segments_equal_each_sequence_alone_forward_and_gradients(op, causal):
  """Prefix sums restart at segment starts (also across chunk boundaries); padding adds
  nothing and outputs zeros; GQA; T not a multiple of the chunk."""
  rng = np.random.default_rng(7)
  q, k, v = (jnp.asarray(rng.normal(size=(3, T, heads, H)) * 0.7, jnp.float32)
             for heads in (N, 2, 2))
  dout = rng.normal(size=(3, T, N, H))
  projection = performer.orthogonal_random_features(jax.random.key(1), 32, H)

  def fn(q, k, v):
    if op == "linear":
      return linear.linear_attention(q, k, v, is_causal=causal, chunk_size=4,
                                     segment_ids=jnp.asarray(SEGMENTS))
    return performer.performer_attention(q, k, v, projection, is_causal=causal, chunk_size=4,
                                      segment_ids=jnp.asarray(SEGMENTS))

  out, vjp = jax.vjp(jax.jit(fn), q, k, v)
  grads = vjp(jnp.asarray(dout, jnp.float32))
  expected, expected_grads = _per_segment(op, q, k, v, SEGMENTS, causal, dout, projection)
  # FAVOR+'s exp features lose a few more float32 bits than elu + 1.
  tol = 2e-5 if op == "linear" else 1e-4
  np.testing.assert_allclose(out, expected, atol=tol, rtol=tol)
  assert np.all(np.asarray(out)[0, -2:] == 0.0)
  for ours, ref in zip(grads, expected_grads, strict=True):
    np.testing.assert_allclose(ours, ref, atol=2.5 * tol, rtol=2.5 * tol)


def test_packed_segments_reject_cross_attention_ids():
  q, k, v = _qkv(2)
  with pytest.raises(ValueError, match=r"segment_ids `\[B, T\]`.*attention='softmax'"):
    linear.linear_attention(q, k, v, segment_ids=(jnp.ones((B, T)), jnp.ones((B, T))))


def test_gated_exclusive_prefix_sum_restarts_after_closed_gates():
  x = np.random.default_rng(6).normal(size=(2, 7, 3)).astype(np.float32)
  gate = np.array([[1, 1, 0, 1, 1, 0, 1], [0, 0, 0, 0, 0, 0, 0]], bool)
  expected, total = np.zeros_like(x), np.zeros_like(x[:, 0])
  for i in range(7):
    expected[:, i] = total
    total = np.where(gate[:, i, None], total, 0.0) + x[:, i]
  (out,) = linear._exclusive_prefix_sum((jnp.asarray(x),), gate=jnp.asarray(gate))
  np.testing.assert_allclose(out, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("op", ["linear", "performer"])
@pytest.mark.parametrize("norms", [(0.3, 2.0), (3.0, 0.3)], ids=["growing", "shrinking"])
def test_recurrent_steps_equal_the_causal_parallel_form(op, norms):
  """A 5-token prompt, then one token at a time: the O(1) state reproduces every output. FAVOR+
  keys whose norms change along the sequence move the running key max (growing: later keys
  raise it; shrinking: early large-norm keys' log-features lie below later ones'), so the
  state's rescaling is exercised both ways."""
  q, k, v = _qkv(2, seed=8, gain=0.7)
  k = k * jnp.linspace(*norms, T)[None, :, None, None]
  projection = performer.orthogonal_random_features(jax.random.key(2), 32, H)
  if op == "linear":
    full = linear.linear_attention(q, k, v, is_causal=True, chunk_size=4)
    step = jax.jit(functools.partial(linear.linear_attention_step, chunk_size=4))
    features = H
  else:
    full = performer.performer_attention(q, k, v, projection, is_causal=True, chunk_size=4)
    step = jax.jit(lambda q, k, v, s: performer.performer_attention_step(q, k, v, projection, s))
    features = 32
  state = linear.init_state(B, 2, features, H)
  outs = []
  for start, stop in [(0, 5)] + [(t, t + 1) for t in range(5, T)]:
    out, state = step(q[:, start:stop], k[:, start:stop], v[:, start:stop], state)
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=2e-5, rtol=2e-5)
  assert int(state.length) == T
  if op == "linear":  # the state is the plain sums S = sum phi(k) v^T, z = sum phi(k)
    phi_k = np.asarray(linear.elu_plus_one(k), np.float64)
    np.testing.assert_allclose(state.kv, np.einsum("bskf,bskh->bkfh", phi_k, v),
                               atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(state.z, phi_k.sum(1), atol=1e-5, rtol=1e-5)
  else:
    assert np.all(np.asarray(state.key_max) > 0.0)  # it did move from its zero start


@pytest.mark.parametrize("op", ["linear", "performer"])
@pytest.mark.parametrize("causal, packed", [(False, False), (True, False), (True, True),
                                            (False, True)])
def test_returned_weights_are_the_implicit_attention_matrix(op, causal, packed):
  """weights @ v == the output to float32 precision; rows sum to 1 (padding rows to 0), zero
  outside the causal / segment pattern."""
  q, k, v = (jnp.concatenate([x, x[:1]]) for x in _qkv(2, seed=9, gain=0.7))  # B = 3
  projection = performer.orthogonal_random_features(jax.random.key(3), 32, H)
  kwargs = dict(is_causal=causal, chunk_size=4,
                segment_ids=jnp.asarray(SEGMENTS) if packed else None)
  if op == "linear":
    fn = functools.partial(linear.linear_attention, q, k, v, **kwargs)
  else:
    fn = functools.partial(performer.performer_attention, q, k, v, projection, **kwargs)
  out, weights = fn(return_weights=True)
  np.testing.assert_allclose(out, fn(), atol=2e-6, rtol=2e-5)
  v_rep = np.repeat(np.asarray(v, np.float64), 2, axis=2)
  np.testing.assert_allclose(np.einsum("bnts,bsnh->btnh", weights, v_rep), out,
                             atol=2e-6, rtol=2e-5)
  i, j = np_reference.positions(T, T)
  allowed = np.broadcast_to((j <= i) if causal else True, (3, 1, T, T))
  if packed:
    allowed = allowed & (SEGMENTS[:, None, :, None] == SEGMENTS[:, None, None, :])
    allowed = allowed & (SEGMENTS[:, None, None, :] != 0)
  assert np.all(np.asarray(weights)[np.broadcast_to(~allowed, weights.shape)] == 0.0)
  real = np.ones((3, T), bool) if not packed else SEGMENTS != 0
  np.testing.assert_allclose(np.asarray(weights).sum(-1),
                             np.broadcast_to(np.where(real, 1.0, 0.0)[:, None], (3, N, T)),
                             atol=1e-5)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_performer_keys_far_apart_in_norm_neither_underflow_nor_give_nan_gradients(causal):
  """Keys whose norms differ by 10x: their FAVOR+ log-features lie ~100 apart, so with one
  constant for all keys (the max over every position, as the Performer paper's code does) the
  large-norm keys' features underflow to 0. Causal: rows whose queries see only large-norm
  keys (row 0's first six; row 1, packed, the sequences before its padding) had a normalizer
  of 0, zero outputs and NaN gradients (head dimension 256 diverged at step 7 of training).
  Full: small-norm padding keys (past key_value_seq_lengths) must not set the constant of
  large-norm real keys. Forward and gradients against the float64 oracle."""
  rng = np.random.default_rng(11)
  q, k, v = (rng.normal(size=(2, T, heads, H)) for heads in (N, 2, 2))
  dout = rng.normal(size=(2, T, N, H))
  projection = performer.orthogonal_random_features(jax.random.key(4), 32, H)
  if causal:
    k[0, :6] *= 10.0
    k[1, :15] *= 10.0
    segments = np.array([[1] * T, [1] * 7 + [2] * 8 + [0] * 4])
    masks = dict(segment_ids=jnp.asarray(segments))
  else:
    k[0, :12] *= 10.0
    k[1, :6] *= 10.0
    segments = np.array([[1] * 12 + [0] * 7, [1] * T])  # the oracle's view of the lengths
    masks = dict(key_value_seq_lengths=jnp.array([12, T]))
    dout[segments == 0] = 0.0  # queries past the length see the keys; the oracle's are zeros
  q, k, v = (jnp.asarray(x, jnp.float32) for x in (q, k, v))
  fn = jax.jit(lambda q, k, v: performer.performer_attention(
      q, k, v, projection, is_causal=causal, chunk_size=4, **masks))
  out, vjp = jax.vjp(fn, q, k, v)
  grads = vjp(jnp.asarray(dout, jnp.float32))
  expected, expected_grads = _per_segment("performer", q, k, v, segments, causal, dout,
                                          projection)
  real = segments != 0
  np.testing.assert_allclose(np.asarray(out)[real], expected[real], atol=1e-4, rtol=1e-4)
  for ours, ref in zip(grads, expected_grads, strict=True):
    assert np.all(np.isfinite(np.asarray(ours)))
    np.testing.assert_allclose(ours, ref, atol=1e-3, rtol=1e-3)
