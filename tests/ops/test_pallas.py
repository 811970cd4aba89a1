"""The Pallas GPU flash kernel, run in Pallas interpret mode on CPU against the reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.ops import dispatch, dot_product_attention, reference
from attn.ops.pallas import pallas_attention, pallas_unsupported_reason


def test_interpret_mode_matches_reference_forward_and_gradients():
  """Causal + packed segments + GQA + a length that is not a multiple of the tile."""
  rng = np.random.default_rng(0)
  t = 12
  q = jnp.asarray(rng.normal(size=(1, t, 4, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(1, t, 2, 8)), jnp.float32) for _ in range(2))
  seg = jnp.asarray([[1] * 5 + [2] * 7], jnp.int32)
  ours = functools.partial(pallas_attention, scale=8**-0.5, is_causal=True, segment_ids=seg,
                           block_q=8, block_kv=8, interpret=True)
  theirs = functools.partial(reference.attention, is_causal=True, segment_ids=seg)

  def loss(fn, q, k, v):
    out = fn(q, k, v)
    return jnp.sum(jnp.sin(out)), out

  (_, out), grads = jax.value_and_grad(functools.partial(loss, ours), (0, 1, 2),
                                       has_aux=True)(q, k, v)
  (_, expected), expected_grads = jax.value_and_grad(functools.partial(loss, theirs), (0, 1, 2),
                                                     has_aux=True)(q, k, v)
  np.testing.assert_allclose(out, expected, atol=1e-5)
  for grad, expected_grad in zip(grads, expected_grads, strict=True):
    np.testing.assert_allclose(grad, expected_grad, atol=1e-5)


@pytest.mark.parametrize("kwargs, expected", [
    ({}, None),
    ({"is_causal": True, "segment_ids": object()}, None),
    ({"bias": object()}, "bias"),
    ({"key_value_seq_lengths": object(), "softcap": 5.0}, "softcap, key_value_seq_lengths"),
    ({"segment_ids": (object(), object())}, "separate query and key segment_ids"),
    ({"kv_len": 16}, "T == S"),
])
def test_pallas_support_rules(kwargs, expected):
  kv_len = kwargs.pop("kv_len", 8)
  q = jax.ShapeDtypeStruct((1, 8, 4, 16), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((1, kv_len, 4, 16), jnp.bfloat16)
  reason = pallas_unsupported_reason(query=q, key=k, value=k, **kwargs)
  assert reason is None if expected is None else expected in reason


def test_explicit_pallas_on_cpu_says_it_is_not_available():
  assert "pallas" in dispatch.IMPLEMENTATIONS
  q = jnp.zeros((1, 8, 2, 4))
  with pytest.raises(ValueError, match=r"'pallas' is not available on backend 'cpu'"):
    dot_product_attention(q, q, q, implementation="pallas")
