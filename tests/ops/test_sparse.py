"""BigBird and Longformer masks: their structure, and attention under them."""

import jax.numpy as jnp
import numpy as np
import pytest

from attn.ops import dot_product_attention, sparse
from tests import np_reference


def test_bigbird_blocks_are_global_window_and_a_fixed_number_of_random_ones():
  block, n_blocks = 4, 8
  mask = np.asarray(sparse.bigbird_mask(30, 30, block_size=block, num_window_blocks=3,
                                        num_global_blocks=1, num_random_blocks=2, seed=3))
  assert mask.shape == (1, 1, 30, 30)
  padded = np.zeros((n_blocks * block,) * 2, bool)
  padded[:30, :30] = mask[0, 0]
  blocks = padded.reshape(n_blocks, block, n_blocks, block)[:, 0, :, 0]
  # Block-level pattern: every entry of a block is equal.
  np.testing.assert_array_equal(np.repeat(np.repeat(blocks, block, 0), block, 1)[:30, :30],
                                mask[0, 0])
  assert blocks[0].all() and blocks[:, 0].all()  # global block row and column
  i, j = np.arange(n_blocks)[:, None], np.arange(n_blocks)[None, :]
  assert blocks[np.abs(i - j) <= 1].all()  # window
  window_or_global = (np.abs(i - j) <= 1) | (i == 0) | (j == 0)
  random = blocks & ~window_or_global
  assert (random[1:].sum(axis=1) == 2).all()  # exactly two random blocks per query block
  again = sparse.bigbird_mask(30, 30, block_size=block, num_random_blocks=2, seed=3)
  np.testing.assert_array_equal(again, mask)
  other = sparse.bigbird_mask(30, 30, block_size=block, num_random_blocks=2, seed=4)
  assert not np.array_equal(other, mask)


def test_bigbird_rejects_an_even_window():
  with pytest.raises(ValueError, match="num_window_blocks must be odd"):
    sparse.bigbird_mask(16, 16, block_size=4, num_window_blocks=2)


def test_longformer_is_a_window_plus_global_rows_and_columns():
  global_tokens = np.zeros((2, 9), bool)
  global_tokens[0, 0] = global_tokens[1, [2, 7]] = True
  mask = np.asarray(sparse.longformer_mask(jnp.asarray(global_tokens), (2, 1)))
  i, j = np_reference.positions(9, 9)
  band = (j >= i - 2) & (j <= i + 1)
  expected = band[None] | global_tokens[:, :, None] | global_tokens[:, None, :]
  np.testing.assert_array_equal(mask[:, 0], expected)


@pytest.mark.parametrize("implementation", ["xla", "blockwise"])
def test_attention_under_the_masks_matches_numpy(implementation):
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 16, 2, 8)), jnp.float32) for _ in range(3))
  global_tokens = jnp.zeros((2, 16), bool).at[:, 0].set(True)
  for mask in (sparse.bigbird_mask(16, 16, block_size=4, num_random_blocks=1),
               sparse.longformer_mask(global_tokens, 2)):
    out = dot_product_attention(q, k, v, mask=mask, is_causal=True,
                                implementation=implementation)
    i, j = np_reference.positions(16, 16)
    expected, _ = np_reference.attention(q, k, v, mask=np.asarray(mask) & (j <= i))
    np.testing.assert_allclose(out, expected, atol=1e-5)
