"""The gated attention layer: MultiHeadAttention times a sigmoid gate from the layer's input."""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from attn.layers import MultiHeadAttention
from attn.layers.mechanisms.gated import GatedAttention
from tests.layers import mechanism_checks as checks

N, H = 4, 8


@pytest.mark.parametrize("headwise", [False, True])
def test_output_is_attention_times_the_sigmoid_gate_before_the_output_projection(headwise):
  x = checks.inputs(0)
  layer = GatedAttention(num_heads=N, head_dim=H, headwise=headwise, use_bias=False)
  params = checks.init(layer, x)
  assert params["gate"]["kernel"].shape == (checks.D, N, 1 if headwise else H)
  # The same projections without the gate, and the head outputs before the projection.
  plain = MultiHeadAttention(num_heads=N, head_dim=H, use_bias=False, out_features=N * H)
  eye = {"out": {"kernel": jnp.eye(N * H).reshape(N, H, N * H)}}
  heads = plain.apply({"params": {**params, **eye}}, x, is_causal=True).reshape(*x.shape[:2], N, H)
  gate = jnp.einsum("btd,dnh->btnh", x, params["gate"]["kernel"])
  expected = jnp.einsum("btnh,nhd->btd", heads * nn.sigmoid(gate), params["out"]["kernel"])
  np.testing.assert_allclose(layer.apply({"params": params}, x, is_causal=True), expected,
                             atol=1e-5, rtol=1e-5)


def test_kv_cache_decoding_equals_the_full_forward():
  checks.check_decoding_matches_full_forward(
      GatedAttention(num_heads=N, head_dim=H, num_kv_heads=2, rope_base=10000.0))


def test_packed_segments_match_separate_sequences():
  checks.check_packed_matches_separate(GatedAttention(num_heads=N, head_dim=H, rope_base=10000.0))


def test_bfloat16_gate_keeps_the_output_dtype():
  x = checks.inputs(1)
  layer = GatedAttention(num_heads=N, head_dim=H, dtype=jnp.bfloat16)
  params = checks.init(layer, x)
  out = layer.apply({"params": params}, x.astype(jnp.bfloat16), is_causal=True)
  expected = GatedAttention(num_heads=N, head_dim=H).apply({"params": params}, x, is_causal=True)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), expected, atol=3e-2, rtol=3e-2)
