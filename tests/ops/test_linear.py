"""Linear attention and FAVOR+ against closed forms computed directly in float64 NumPy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.ops import linear, reference
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
  projection = linear.orthogonal_random_features(jax.random.key(0), 16, H)

  def fn(k, v):
    if op == "linear":
      return linear.linear_attention(q, k, v, is_causal=True, chunk_size=4)
    return linear.performer_attention(q, k, v, projection, is_causal=True, chunk_size=4)

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
  performer = jax.jit(lambda p: linear.performer_attention(q, k, v, p, is_causal=causal))
  features = jax.jit(linear.orthogonal_random_features, static_argnums=(1, 2))
  for m in (16, 512, 16384):
    outs = [performer(features(jax.random.key(seed), m, H)) for seed in range(2)]
    errors[m] = np.mean([np.mean(np.abs(np.asarray(o) - expected)) for o in outs])
  assert errors[16] > errors[512] > errors[16384], errors
  assert errors[16384] < 0.25 * errors[16], errors
  assert errors[16384] < 5e-3, errors


def test_orthogonal_random_features_are_orthogonal_in_blocks_and_redrawable():
  w = np.asarray(linear.orthogonal_random_features(jax.random.key(0), 20, H))
  assert w.shape == (20, H)
  for start in (0, H):  # each block of H rows is orthogonal
    block = w[start:start + H]
    gram = block @ block.T
    np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0.0, atol=1e-4)
  assert not np.allclose(w, linear.orthogonal_random_features(jax.random.key(1), 20, H))


def test_fully_masked_rows_are_zero_and_finite():
  q, k, v = _qkv(2, seed=4)
  lengths = jnp.array([T, 0])
  projection = linear.orthogonal_random_features(jax.random.key(0), 32, H)
  for fn in (lambda k: linear.linear_attention(q, k, v, key_value_seq_lengths=lengths),
             lambda k: linear.performer_attention(q, k, v, projection,
                                                  key_value_seq_lengths=lengths)):
    out, grad = jax.jit(jax.value_and_grad(lambda k, fn=fn: jnp.sum(fn(k) ** 2)))(k)
    out = jax.jit(fn)(k)
    assert np.all(np.asarray(out[1]) == 0.0) and np.any(np.asarray(out[0]) != 0.0)
    assert np.all(np.isfinite(np.asarray(grad)))
