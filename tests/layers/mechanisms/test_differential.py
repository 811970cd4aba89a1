"""The differential attention layer: paired heads, the depth-dependent lambda, its KV cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.layers.mechanisms.differential import DifferentialAttention
from attn.ops import differential as diff_ops
from attn.ops import dot_product_attention
from attn.ops.positions import apply_rope
from tests.layers import mechanism_checks as checks

N, H = 4, 8


def _layer(**kwargs):
  kwargs.setdefault("layer_index", 0)
  return DifferentialAttention(num_heads=N, head_dim=H, rope_base=10000.0, **kwargs)


def test_kv_cache_decoding_equals_the_full_forward():
  checks.check_decoding_matches_full_forward(_layer(num_kv_heads=2, layer_index=3))


def test_packed_segments_match_separate_sequences():
  checks.check_packed_matches_separate(_layer())


def test_projection_sizes_depth_lambda_and_the_recorded_difference_map():
  x = checks.inputs(0)
  layer = _layer(layer_index=5, use_bias=False, record_weights=True)
  params = checks.init(layer, x)
  # Same projection sizes as 4-head attention: 2 differential heads of 2 x 8 query dims.
  assert params["query"]["kernel"].shape == (checks.D, N, H)
  assert params["value"]["kernel"].shape == (checks.D, N // 2, 2 * H)
  out, state = layer.apply({"params": params}, x, is_causal=True, mutable=["intermediates"])
  weights = state["intermediates"]["attention_weights"][0]
  init = 0.8 - 0.6 * np.exp(-0.3 * 5)  # layer l = 6
  lam = diff_ops.reparametrized_lambda(params["lambda_q1"], params["lambda_k1"],
                                       params["lambda_q2"], params["lambda_k2"], init)
  q = jnp.einsum("btd,dnh->btnh", x, params["query"]["kernel"])
  k = jnp.einsum("btd,dnh->btnh", x, params["key"]["kernel"])
  pos = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
  q, k = apply_rope(q, pos), apply_rope(k, pos)
  maps = [dot_product_attention(q[:, :, i::2], k[:, :, i::2], k[:, :, i::2], is_causal=True,
                                return_weights=True)[1] for i in (0, 1)]
  np.testing.assert_allclose(weights, maps[0] - lam * maps[1], atol=1e-6)
  assert out.shape == x.shape


def test_unpaired_heads_are_an_error_naming_the_fields():
  with pytest.raises(ValueError, match="num_heads"):
    layer = DifferentialAttention(num_heads=3, head_dim=H, layer_index=0)
    layer.init(jax.random.key(0), checks.inputs(0), is_causal=True)
