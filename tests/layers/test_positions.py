"""Tests of attn/layers/positions.py: parameters, logical axes, and values against lookups."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.layers import positions as layers
from attn.ops import positions as ops

PACKED_BT = jnp.array([[0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6]], jnp.int32)


def _specs(variables):
  return jax.tree.map(tuple, nn.get_partition_spec(variables)["params"])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_learned_position_embedding_is_a_lookup(dtype):
  module = layers.LearnedPositionEmbedding(max_length=16, features=8, dtype=dtype)
  variables = module.init(jax.random.key(0), PACKED_BT)
  assert _specs(variables) == {"embedding": ("length", "embed")}
  table = np.asarray(nn.unbox(variables)["params"]["embedding"])
  assert table.shape == (16, 8) and table.dtype == np.float32
  out = jax.jit(module.apply)(variables, PACKED_BT)
  assert out.shape == (2, 7, 8) and out.dtype == dtype
  np.testing.assert_array_equal(out, table[np.asarray(PACKED_BT)].astype(dtype))


def test_learned_position_embedding_out_of_range_is_nan():
  module = layers.LearnedPositionEmbedding(max_length=4, features=2)
  variables = module.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  out = module.apply(variables, jnp.array([[3, 4]]))
  assert np.all(np.isfinite(out[0, 0])) and np.all(np.isnan(out[0, 1]))


def test_learned_grid_embedding_flattens_row_major():
  module = layers.LearnedPositionEmbedding2D(height=3, width=4, features=8)
  variables = module.init(jax.random.key(0))
  assert _specs(variables) == {"embedding": (None, None, "embed")}
  grid = np.asarray(nn.unbox(variables)["params"]["embedding"])
  out = module.apply(variables)
  assert out.shape == (1, 12, 8)
  # Patch (row r, column c) is token r * width + c.
  np.testing.assert_array_equal(out[0, 1 * 4 + 2], grid[1, 2])
  np.testing.assert_array_equal(out[0], grid.reshape(12, 8))


def test_fixed_wrappers_match_ops_and_own_no_params():
  sin = layers.SinusoidalPositionEmbedding(features=8, dtype=jnp.bfloat16)
  variables = sin.init(jax.random.key(0), PACKED_BT)
  assert not variables.get("params")
  out = sin.apply(variables, PACKED_BT)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(out, ops.sinusoidal(PACKED_BT, 8).astype(jnp.bfloat16))

  grid = layers.SinCos2DPositionEmbedding(height=2, width=3, features=8)
  out = grid.apply({})
  assert out.shape == (1, 6, 8)
  np.testing.assert_array_equal(out[0], ops.sincos_2d(2, 3, 8))


@pytest.mark.parametrize("bidirectional", [True, False])
def test_t5_relative_bias_gathers_table_per_head(bidirectional):
  module = layers.T5RelativePositionBias(
    num_heads=3, bidirectional=bidirectional, num_buckets=8, max_distance=16
  )
  q_BT = PACKED_BT
  k_BS = PACKED_BT[:, :5]
  variables = module.init(jax.random.key(0), q_BT, k_BS)
  assert _specs(variables) == {"rel_embedding": ("relpos_buckets", "heads")}
  table = np.asarray(nn.unbox(variables)["params"]["rel_embedding"])
  assert table.shape == (8, 3)
  bias = np.asarray(jax.jit(module.apply)(variables, q_BT, k_BS))
  assert bias.shape == (2, 3, 7, 5)
  q, k = np.asarray(q_BT), np.asarray(k_BS)
  buckets = np.asarray(
    ops.t5_relative_position_bucket(
      jnp.asarray(k[:, None, :] - q[:, :, None]),
      bidirectional=bidirectional,
      num_buckets=8,
      max_distance=16,
    )
  )
  for b in range(2):
    for i in range(7):
      for j in range(5):
        np.testing.assert_array_equal(bias[b, :, i, j], table[buckets[b, i, j]])


def test_t5_relative_bias_depends_on_offset_only_and_direction():
  module = layers.T5RelativePositionBias(num_heads=2, bidirectional=True)
  pos = jnp.arange(6)[None]
  variables = module.init(jax.random.key(1), pos, pos)
  bias = np.asarray(module.apply(variables, pos, pos))[0]  # [N, T, S]
  # Toeplitz: equal along diagonals (same key - query offset).
  np.testing.assert_array_equal(bias[:, 1:, 1:], bias[:, :-1, :-1])
  # Bidirectional: one step left and one step right use different buckets (1 vs 17).
  table = np.asarray(nn.unbox(variables)["params"]["rel_embedding"])
  np.testing.assert_array_equal(bias[:, 2, 1], table[1])
  np.testing.assert_array_equal(bias[:, 2, 3], table[17])
