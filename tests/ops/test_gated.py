"""Gated attention: softmax attention times an elementwise sigmoid gate, against float64 NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.ops import gated
from tests import np_reference
from tests.ops.test_attention import B, H, N, _case


def reference(q, k, v, gate, *, mask):
  out, weights = np_reference.attention(q, k, v, mask=mask)
  return out / (1.0 + np.exp(-np.asarray(gate, np.float64))), weights


def _inputs(case, num_kv_heads, gate_width, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(B, case["t"], N, H)), rng.normal(size=(B, case["s"], num_kv_heads, H)),
          rng.normal(size=(B, case["s"], num_kv_heads, H)),
          2.0 * rng.normal(size=(B, case["t"], N, gate_width)))


@pytest.mark.parametrize("kind, num_kv_heads, gate_width, jit", [
    ("segments", 4, H, True), ("padding", 2, 1, False)])
def test_elementwise_and_headwise_gates_match_the_float64_reference(kind, num_kv_heads,
                                                                    gate_width, jit):
  case = _case(kind, np.random.default_rng(0))
  inputs = _inputs(case, num_kv_heads, gate_width)

  def fn(*xs):
    return gated.gated_attention(*xs, return_weights=True, **case["op"])

  out, weights = (jax.jit(fn) if jit else fn)(*(jnp.asarray(x, jnp.float32) for x in inputs))
  expected, expected_weights = reference(*inputs, mask=case["mask"])
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(weights, expected_weights, atol=1e-6)


def test_gradients_match_finite_differences_of_the_float64_reference():
  case = _case("causal", np.random.default_rng(1))
  inputs = _inputs(case, 2, H, seed=2)
  rng = np.random.default_rng(3)
  dout = rng.normal(size=(B, case["t"], N, H))

  def loss32(*xs):
    return jnp.sum(gated.gated_attention(*xs, **case["op"]) * jnp.asarray(dout, jnp.float32))

  grads = jax.jit(jax.grad(loss32, argnums=(0, 1, 2, 3)))(
      *(jnp.asarray(x, jnp.float32) for x in inputs))
  np_reference.check_gradients(
      lambda *xs: np.sum(reference(*xs, mask=case["mask"])[0] * dout), grads, inputs, rng)


def test_bfloat16_gate_is_applied_in_float32():
  out = jnp.full((1, 1, 1, 2), 3.0, jnp.bfloat16)
  logits = jnp.asarray([[[[0.0, 1.0]]]], jnp.bfloat16)
  gated_out = gated.sigmoid_gate(out, logits)
  assert gated_out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(gated_out, np.float32),
                             [[[[1.5, np.float32(3.0 / (1 + np.exp(-1.0)))]]]], rtol=4e-3)
