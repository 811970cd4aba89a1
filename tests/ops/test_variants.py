"""Linformer, cosine, sigmoid and sink attention against closed forms in float64 NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.ops import reference, variants
from tests import np_reference

B, T, N, H = 2, 11, 4, 8


def _qkv(num_kv_heads: int = 2, seed: int = 0):
  rng = np.random.default_rng(seed)
  shapes = [(B, T, N, H), (B, T, num_kv_heads, H), (B, T, num_kv_heads, H)]
  return tuple(jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes)


def _causal():
  i, j = np_reference.positions(T, T)
  return j <= i


def test_linformer_with_identity_projections_is_softmax_attention():
  q, k, v = _qkv()
  out = variants.linformer_attention(q, k, v, jnp.eye(T))
  expected, _ = np_reference.attention(q, k, v)
  np.testing.assert_allclose(out, expected, atol=1e-5)


def test_linformer_attends_over_the_projected_keys_and_values():
  q, k, v = _qkv(seed=1)
  rng = np.random.default_rng(2)
  e, f = rng.normal(size=(5, T)) / T, rng.normal(size=(5, T)) / T
  lengths = np.array([T, 6])
  out = jax.jit(variants.linformer_attention)(q, k, v, jnp.asarray(e, jnp.float32),
                                              jnp.asarray(f, jnp.float32),
                                              key_value_seq_lengths=jnp.asarray(lengths))
  valid = (np.arange(T)[None, :] < lengths[:, None])[:, :, None, None]
  k_proj = np.einsum("ps,bskh->bpkh", e, np.asarray(k, np.float64) * valid)
  v_proj = np.einsum("ps,bskh->bpkh", f, np.asarray(v, np.float64) * valid)
  expected, _ = np_reference.attention(q, k_proj, v_proj)
  np.testing.assert_allclose(out, expected, atol=1e-5)


def test_linformer_rejects_a_projection_of_the_wrong_length():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match=r"key_projection must be \[P, S\] with S = 11"):
    variants.linformer_attention(q, k, v, jnp.ones((4, 7)))


@pytest.mark.parametrize("implementation", ["xla", "blockwise"])
def test_cosine_attention_is_softmax_over_scaled_cosines(implementation):
  q, k, v = _qkv(seed=3)
  tau = np.array([0.05, 0.1, 0.5, 1.0])
  out = variants.cosine_attention(q, k, v, temperature=jnp.asarray(tau, jnp.float32),
                                  is_causal=True, implementation=implementation)
  qn, kn = (np.asarray(x, np.float64) for x in (q, k))
  qn = qn / np.linalg.norm(qn, axis=-1, keepdims=True) / tau[:, None]
  kn = kn / np.linalg.norm(kn, axis=-1, keepdims=True)
  expected, _ = np_reference.attention(qn, kn, v, mask=_causal(), scale=1.0)
  np.testing.assert_allclose(out, expected, atol=2e-5)


@pytest.mark.parametrize("num_kv_heads", [4, 1], ids=["mha", "mqa"])
def test_sigmoid_attention_matches_the_closed_form(num_kv_heads):
  q, k, v = _qkv(num_kv_heads, seed=4)
  bias = np.random.default_rng(5).normal(size=(1, N, T, T))
  out = jax.jit(lambda q, k, v, b: variants.sigmoid_attention(q, k, v, b, is_causal=True))(
      q, k, v, jnp.asarray(bias, jnp.float32))
  groups = N // num_kv_heads
  k64, v64 = (np.repeat(np.asarray(x, np.float64), groups, axis=2) for x in (k, v))
  logits = np.einsum("btnh,bsnh->bnts", np.asarray(q, np.float64), k64) / np.sqrt(H)
  weights = 1.0 / (1.0 + np.exp(-(logits + bias - np.log(T)))) * _causal()
  expected = np.einsum("bnts,bsnh->btnh", weights, v64)
  np.testing.assert_allclose(out, expected, atol=1e-5)


def test_sink_attention_matches_a_softmax_with_an_extra_valueless_logit():
  q, k, v = _qkv(seed=6)
  sinks = np.array([-1.0, 0.0, 1.0, 3.0])
  lengths = jnp.array([T, 0])  # example 1 has no keys: its rows must be exactly zero
  out = jax.jit(lambda q, k, v, s: variants.sink_attention(
      q, k, v, s, is_causal=True, key_value_seq_lengths=lengths))(
          q, k, v, jnp.asarray(sinks, jnp.float32))
  k64, v64 = (np.repeat(np.asarray(x, np.float64), 2, axis=2) for x in (k, v))
  logits = np.einsum("btnh,bsnh->bnts", np.asarray(q, np.float64), k64) / np.sqrt(H)
  logits = np.where(_causal(), logits, -np.inf)
  e = np.exp(logits)
  weights = e / (e.sum(-1, keepdims=True) + np.exp(sinks)[None, :, None, None])
  expected = np.einsum("bnts,bsnh->btnh", weights, v64)
  np.testing.assert_allclose(out[0], expected[0], atol=1e-5)
  assert np.all(np.asarray(out[1]) == 0.0)


def test_sink_attention_with_a_very_negative_sink_is_softmax_attention():
  q, k, v = _qkv(seed=7)
  out = variants.sink_attention(q, k, v, jnp.full((N,), -1e4), local_window_size=(3, 1))
  expected = reference.attention(q, k, v, local_window_size=(3, 1))
  np.testing.assert_allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize("op", ["sigmoid", "sinks", "cosine"])
def test_causality_gradient_wrt_future_keys_and_values_is_exactly_zero(op):
  q, k, v = _qkv(seed=8)
  fn = {
      "sigmoid": lambda k, v: variants.sigmoid_attention(q, k, v, is_causal=True),
      "sinks": lambda k, v: variants.sink_attention(q, k, v, jnp.zeros(N), is_causal=True),
      "cosine": lambda k, v: variants.cosine_attention(q, k, v, is_causal=True),
  }[op]
  jac_k, jac_v = jax.jit(jax.jacrev(fn, argnums=(0, 1)))(k, v)
  i, j = np_reference.positions(T, T)
  for jac in (jac_k, jac_v):
    per_pair = np.abs(np.asarray(jac)).sum(axis=(0, 2, 3, 4, 6, 7))
    assert np.all(per_pair[j > i] == 0.0)
    assert np.all(per_pair[j < i] > 0.0)  # the test can fail


def test_variant_gradients_are_finite_in_half_precision():
  q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(seed=9))

  def loss(q):
    outs = (variants.sigmoid_attention(q, k, v, is_causal=True),
            variants.sink_attention(q, k, v, jnp.zeros(N), is_causal=True),
            variants.cosine_attention(q, k, v))
    assert all(out.dtype == jnp.bfloat16 for out in outs)
    return sum(jnp.sum(out.astype(jnp.float32)) for out in outs)

  out, grad = jax.jit(jax.value_and_grad(loss))(q)
  assert np.isfinite(float(out)) and np.all(np.isfinite(np.asarray(grad, np.float32)))
