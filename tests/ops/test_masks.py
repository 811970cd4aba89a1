"""Mask constructors: NumPy predicates, tiles equal to slices, dtype-safe fill values."""

import jax.numpy as jnp
import numpy as np
import pytest

from attn.ops import masks

T, S = 7, 11
LENGTHS = np.array([5, 0], np.int32)
PREFIX = np.array([3, 9], np.int32)
SEGMENTS = np.array([[1] * 4 + [2] * 7, [1] * 11], np.int32)


def _predicate(kind: str) -> np.ndarray:
  """The full [B|1, 1, T, S] mask written from its definition (top-left aligned)."""
  i, j = np.arange(T)[:, None], np.arange(S)[None, :]
  table = {
      "causal": j <= i,
      "window": (j >= i - 2) & (j <= i + 1),
      "chunked": (j <= i) & (i // 3 == j // 3),
      "padding": (i[None] < LENGTHS[:, None, None]) & (j[None] < LENGTHS[:, None, None]),
      "prefix": (j <= i)[None] | (j[None] < PREFIX[:, None, None]),
      "segments": SEGMENTS[:, :T, None] == SEGMENTS[:, None, :],
  }
  m = table[kind]
  return (m[None] if m.ndim == 2 else m)[:, None]


def _build(kind: str, q_len: int, kv_len: int, q_offset: int = 0, kv_offset: int = 0):
  kwargs = {"causal": dict(is_causal=True), "window": dict(local_window_size=(2, 1)),
            "chunked": dict(chunk_size=3),
            "padding": dict(query_seq_lengths=LENGTHS, key_value_seq_lengths=LENGTHS),
            "prefix": dict(prefix_lengths=PREFIX)}.get(kind)
  if kind == "segments":
    ids = (SEGMENTS[:, q_offset:q_offset + q_len], SEGMENTS[:, kv_offset:kv_offset + kv_len])
    return masks.make_attention_mask(q_len, kv_len, segment_ids=ids)
  return masks.make_attention_mask(q_len, kv_len, q_offset=q_offset, kv_offset=kv_offset,
                                   **kwargs)


KINDS = ["causal", "window", "chunked", "padding", "prefix", "segments"]


@pytest.mark.parametrize("kind", KINDS)
def test_full_masks_match_their_definition(kind):
  np.testing.assert_array_equal(_build(kind, T, S), _predicate(kind))


@pytest.mark.parametrize("kind", KINDS)
def test_every_tile_equals_the_slice_of_the_full_mask(kind):
  full = _predicate(kind)
  for q0, q1, k0, k1 in [(0, 3, 0, 4), (3, 7, 4, 11), (2, 5, 6, 9), (6, 7, 0, 11)]:
    tile = _build(kind, q1 - q0, k1 - k0, q_offset=q0, kv_offset=k0)
    np.testing.assert_array_equal(tile, full[:, :, q0:q1, k0:k1], err_msg=str((q0, k0)))


def test_bottom_right_causal_alignment_for_decoding():
  # The last 2 of 5 positions as queries: they see keys 0..3 and 0..4.
  np.testing.assert_array_equal(masks.causal_mask(2, 5, q_offset=3)[0, 0],
                                [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_fill_value_is_finite_and_survives_an_added_bias(dtype):
  fill = masks.large_negative(dtype)
  assert np.isfinite(float(fill)) and float(fill) < -1e4
  assert np.isfinite(float(fill + fill * 0.4))  # headroom for a bias of 40% of it
  bias = masks.mask_to_bias(jnp.array([True, False]), dtype)
  np.testing.assert_array_equal(np.asarray(bias, np.float32), [0.0, float(fill)])
  assert jnp.asarray(-1e9, jnp.float16) == -jnp.inf  # why -1e9 is not used


def test_combinators_ignore_none_and_compute_and_or():
  a, b = jnp.array([True, True, False]), jnp.array([True, False, False])
  assert masks.and_masks(None, None) is None
  np.testing.assert_array_equal(masks.and_masks(a, None, b), [True, False, False])
  np.testing.assert_array_equal(masks.or_masks(None, a, b), [True, True, False])
