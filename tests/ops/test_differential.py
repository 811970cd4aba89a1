"""Differential attention against the paper's equations in float64 NumPy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.ops import differential
from tests import np_reference
from tests.ops.test_attention import B, N, _case

H = 8
LAMBDA_INIT = differential.lambda_init(2)


def reference(q, k, v, lam, norm_scale, *, mask):
  """(softmax(Q1 K1^T) - lam softmax(Q2 K2^T)) V, RMSNorm per head, * (1 - lambda_init)."""
  out1, w1 = np_reference.attention(q[:, :, :, 0], k[:, :, :, 0], v, mask=mask)
  out2, w2 = np_reference.attention(q[:, :, :, 1], k[:, :, :, 1], v, mask=mask)
  lam = np.broadcast_to(np.asarray(lam, np.float64), (q.shape[2],))
  diff = out1 - lam[:, None] * out2
  normed = diff / np.sqrt(np.mean(diff**2, axis=-1, keepdims=True) + 1e-5) * norm_scale
  return normed * (1 - LAMBDA_INIT), w1 - lam[None, :, None, None] * w2, diff


def _inputs(case, num_kv_heads, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(B, case["t"], N, 2, H)),
          rng.normal(size=(B, case["s"], num_kv_heads, 2, H)),
          rng.normal(size=(B, case["s"], num_kv_heads, 2 * H)),
          rng.uniform(0.1, 0.9, size=(N,)), 1.0 + 0.1 * rng.normal(size=(2 * H,)))


def test_lambda_init_follows_the_paper_and_the_reparametrization_adds_it():
  # 0.8 - 0.6 exp(-0.3 (l - 1)) for l = 1, 2, 12.
  for index, expected in ((0, 0.2), (1, 0.8 - 0.6 * math.exp(-0.3)), (11, 0.77787)):
    assert differential.lambda_init(index) == pytest.approx(expected, abs=1e-5)
  rng = np.random.default_rng(0)
  lq1, lk1, lq2, lk2 = rng.normal(size=(4, H)) * 0.3
  expected = np.exp(lq1 @ lk1) - np.exp(lq2 @ lk2) + 0.35
  got = differential.reparametrized_lambda(lq1, lk1, lq2, lk2, 0.35)
  np.testing.assert_allclose(got, expected, rtol=1e-6)


@pytest.mark.parametrize("kind, num_kv_heads, jit", [
    ("segments", 4, True), ("padding", 2, False), ("window", 1, True)])
def test_output_and_difference_map_match_the_float64_reference(kind, num_kv_heads, jit):
  case = _case(kind, np.random.default_rng(1))
  q, k, v, lam, norm_scale = _inputs(case, num_kv_heads)

  def fn(q, k, v, lam, norm_scale):
    return differential.differential_attention(
        q, k, v, lam, lambda_init=LAMBDA_INIT, norm_scale=norm_scale, return_weights=True,
        **case["op"])

  out, weights = (jax.jit(fn) if jit else fn)(
      *(jnp.asarray(x, jnp.float32) for x in (q, k, v, lam, norm_scale)))
  expected, expected_weights, diff = reference(q, k, v, lam, norm_scale, mask=case["mask"])
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(weights, expected_weights, atol=1e-6)
  # The map is the difference: weights @ V is the output before the normalization.
  groups = N // num_kv_heads
  pre_norm = jnp.einsum("bnts,bsnv->btnv", weights, jnp.repeat(jnp.asarray(v, jnp.float32),
                                                               groups, axis=2))
  np.testing.assert_allclose(pre_norm, diff, atol=1e-5)


def test_gradients_match_finite_differences_of_the_float64_reference():
  case = _case("segments", np.random.default_rng(2))
  inputs = _inputs(case, 2, seed=3)
  rng = np.random.default_rng(4)
  dout = rng.normal(size=(B, case["t"], N, 2 * H))

  def loss64(*xs):
    return np.sum(reference(*xs, mask=case["mask"])[0] * dout)

  def loss32(q, k, v, lam, norm_scale):
    out = differential.differential_attention(q, k, v, lam, lambda_init=LAMBDA_INIT,
                                              norm_scale=norm_scale, **case["op"])
    return jnp.sum(out * jnp.asarray(dout, jnp.float32))

  grads = jax.jit(jax.grad(loss32, argnums=tuple(range(5))))(
      *(jnp.asarray(x, jnp.float32) for x in inputs))
  np_reference.check_gradients(loss64, grads, inputs, rng)
