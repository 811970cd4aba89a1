"""The MLA layer: absorbed decoding from a latent cache equals the expanded forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.layers.mechanisms.mla import MultiHeadLatentAttention
from attn.ops import mla as mla_ops
from tests.layers import mechanism_checks as checks

N, H, DC, DR = 4, 8, 12, 4


def _layer(**kwargs):
  return MultiHeadLatentAttention(num_heads=N, head_dim=H, kv_lora_rank=DC, rope_head_dim=DR,
                                  rope_base=10000.0, **kwargs)


@pytest.mark.parametrize("q_lora_rank", [0, 6])
def test_absorbed_decoding_from_the_latent_cache_equals_the_expanded_forward(q_lora_rank):
  checks.check_decoding_matches_full_forward(_layer(q_lora_rank=q_lora_rank))


def test_packed_segments_match_separate_sequences():
  checks.check_packed_matches_separate(_layer())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cache_holds_the_latent_and_the_rope_key_only(dtype):
  """(kv_lora_rank + rope_head_dim) x itemsize per token, vs 2 N H x itemsize for MHA."""
  x = checks.inputs(0, dtype=dtype)
  decoder = _layer(decode=True, dtype=dtype)
  cache = jax.eval_shape(decoder.init, jax.random.key(0), x)["cache"]
  per_token = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache) if a.ndim) / (
      x.shape[0] * x.shape[1])
  assert per_token == mla_ops.latent_cache_bytes_per_token(DC, DR, dtype) == (DC + DR) * (
      jnp.dtype(dtype).itemsize)
  assert mla_ops.kv_cache_bytes_per_token(N, H, dtype) / per_token == 2 * N * H / (DC + DR)


def test_rope_part_makes_scores_depend_on_relative_positions_only():
  layer = _layer()
  x = checks.inputs(1)
  params = checks.init(layer, x)
  apply = jax.jit(lambda p, x, pos: layer.apply({"params": p}, x, q_positions=pos,
                                                is_causal=True))
  positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
  np.testing.assert_allclose(apply(params, x, positions + 9), apply(params, x, positions),
                             atol=2e-5)
  assert not np.allclose(apply(params, x, positions * 2), apply(params, x, positions),
                         atol=1e-3)
