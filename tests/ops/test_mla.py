"""MLA: the absorbed form equals the expanded one and both equal float64 NumPy attention."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.ops import mla
from attn.ops.positions import apply_rope
from tests import np_reference
from tests.ops.test_attention import B, N, _case

DN, DR, DV, DC = 8, 4, 6, 10


def _inputs(t, s, seed=0, offset=0):
  """q_nope, q_rope, latent, k_rope (RoPE applied at positions + offset), w_uk, w_uv."""
  rng = np.random.default_rng(seed)
  q_nope = jnp.asarray(rng.normal(size=(B, t, N, DN)), jnp.float32)
  q_rope = jnp.asarray(rng.normal(size=(B, t, N, DR)), jnp.float32)
  latent = jnp.asarray(rng.normal(size=(B, s, DC)), jnp.float32)
  k_rope = jnp.asarray(rng.normal(size=(B, s, 1, DR)), jnp.float32)
  q_pos = jnp.broadcast_to(jnp.arange(t) + offset, (B, t))
  k_pos = jnp.broadcast_to(jnp.arange(s) + offset, (B, s))
  w_uk = jnp.asarray(rng.normal(size=(DC, N, DN)) / np.sqrt(DC), jnp.float32)
  w_uv = jnp.asarray(rng.normal(size=(DC, N, DV)) / np.sqrt(DC), jnp.float32)
  return (q_nope, apply_rope(q_rope, q_pos), latent, apply_rope(k_rope, k_pos)[:, :, 0],
          w_uk, w_uv)


def reference(q_nope, q_rope, latent, k_rope, w_uk, w_uv, *, mask):
  """The expanded definition in float64: per-head keys [W_uk c ; k_rope], values W_uv c."""
  q_nope, q_rope, latent, k_rope, w_uk, w_uv = (
      np.asarray(x, np.float64) for x in (q_nope, q_rope, latent, k_rope, w_uk, w_uv))
  k = np.concatenate([np.einsum("bsc,cnd->bsnd", latent, w_uk),
                      np.repeat(k_rope[:, :, None], N, axis=2)], axis=-1)
  v = np.einsum("bsc,cnd->bsnd", latent, w_uv)
  return np_reference.attention(np.concatenate([q_nope, q_rope], -1), k, v, mask=mask)


@pytest.mark.parametrize("kind, jit", [("segments", True), ("padding", False),
                                       ("causal_tall", True)])
def test_absorbed_equals_expanded_equals_the_float64_reference(kind, jit):
  case = _case(kind, np.random.default_rng(0))
  inputs = _inputs(case["t"], case["s"])
  expected, expected_weights = reference(*inputs, mask=case["mask"])
  for absorb in (False, True):
    fn = functools.partial(mla.mla_attention, absorb=absorb, return_weights=True, **case["op"])
    out, weights = (jax.jit(fn) if jit else fn)(*inputs)
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5, err_msg=f"absorb={absorb}")
    np.testing.assert_allclose(weights, expected_weights, atol=1e-6)


def test_absorbed_gradients_equal_the_expanded_ones_and_rope_is_relative():
  inputs = _inputs(12, 12, seed=1)
  dout = jnp.asarray(np.random.default_rng(2).normal(size=(B, 12, N, DV)), jnp.float32)

  def loss(*xs, absorb):
    return jnp.sum(mla.mla_attention(*xs, absorb=absorb, is_causal=True) * dout)

  grads = [jax.jit(jax.grad(functools.partial(loss, absorb=a), argnums=tuple(range(6))))(*inputs)
           for a in (False, True)]
  for expanded, absorbed in zip(*grads, strict=True):
    np.testing.assert_allclose(absorbed, expanded, atol=2e-5, rtol=1e-5)
  # The decoupled RoPE key is shared by the heads and rotated by position only: shifting every
  # position by 7 leaves the attention unchanged.
  shifted = _inputs(12, 12, seed=1, offset=7)
  np.testing.assert_allclose(mla.mla_attention(*shifted, is_causal=True),
                             mla.mla_attention(*inputs, is_causal=True), atol=2e-5)


def test_cache_bytes_per_token_follow_deepseek_v2():
  """DeepSeek-V2: Dc = 4 H, Dr = H / 2, so (Dc + Dr) = 4.5 H per token vs 2 N H for MHA."""
  heads, head_dim = 128, 128
  latent = mla.latent_cache_bytes_per_token(4 * head_dim, head_dim // 2, jnp.bfloat16)
  assert latent == (512 + 64) * 2
  assert mla.kv_cache_bytes_per_token(heads, head_dim, jnp.bfloat16) / latent == pytest.approx(
      2 * heads / 4.5)
  assert mla.kv_cache_bytes_per_token(8, head_dim, np.float32) == 2 * 8 * 128 * 4
