"""Tests of attn/ops/positions.py against float64 NumPy and hand-derived values."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.ops import positions

# Every op runs both eagerly and under jit (static keyword arguments are bound first).
JIT = pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])


def _maybe_jit(fn, jit: bool, **static):
  bound = functools.partial(fn, **static)
  return jax.jit(bound) if jit else bound


def _np_sinusoidal(positions: np.ndarray, dim: int, base: float = 10000.0) -> np.ndarray:
  """The paper's formula, channel by channel, in float64."""
  pos = positions.astype(np.float64)[..., None]
  out = np.zeros(positions.shape + (dim,), np.float64)
  for i in range(dim // 2):
    out[..., 2 * i] = np.sin(pos[..., 0] / base ** (2 * i / dim))
    out[..., 2 * i + 1] = np.cos(pos[..., 0] / base ** (2 * i / dim))
  return out


# Packed rows: positions restart at 0 in every segment.
PACKED_POSITIONS = np.array([[0, 1, 2, 3, 0, 1, 2], [0, 1, 0, 1, 2, 3, 60]], np.int32)


@JIT
def test_sinusoidal_matches_paper_formula(jit):
  fn = _maybe_jit(positions.sinusoidal, jit, dim=16)
  got = fn(jnp.asarray(PACKED_POSITIONS))
  assert got.shape == (2, 7, 16) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, _np_sinusoidal(PACKED_POSITIONS, 16), atol=2e-6)
  # Spot values: position 1, channels 0 and 1 are sin(1) and cos(1).
  np.testing.assert_allclose(got[0, 1, :2], [math.sin(1.0), math.cos(1.0)], atol=1e-7)


def test_sinusoidal_table_and_base():
  table = positions.sinusoidal_table(50, 8, base=100.0)
  np.testing.assert_allclose(table, _np_sinusoidal(np.arange(50), 8, base=100.0), atol=5e-6)
  with pytest.raises(ValueError, match="even"):
    positions.sinusoidal(jnp.arange(3), 7)


@JIT
def test_sincos_2d_halves_encode_row_and_column(jit):
  height, width, dim = 3, 4, 16
  got = _maybe_jit(positions.sincos_2d, jit, height=height, width=width, dim=dim)()
  assert got.shape == (height * width, dim)
  rows = np.repeat(np.arange(height), width)  # row-major patch order
  cols = np.tile(np.arange(width), height)
  want = np.concatenate([_np_sinusoidal(rows, dim // 2), _np_sinusoidal(cols, dim // 2)], -1)
  np.testing.assert_allclose(got, want, atol=2e-6)
  with pytest.raises(ValueError, match="multiple of 4"):
    positions.sincos_2d(2, 2, 6)


def _np_rope(x: np.ndarray, positions_bt: np.ndarray, base: float, rotary: int) -> np.ndarray:
  """RoFormer as a complex rotation of pairs (j, j + R/2), float64."""
  half = rotary // 2
  theta = base ** (-np.arange(half, dtype=np.float64) * 2 / rotary)
  z = x[..., :half] + 1j * x[..., half:rotary]
  z = z * np.exp(1j * positions_bt[:, :, None, None] * theta)
  return np.concatenate([z.real, z.imag, x[..., rotary:]], axis=-1)


@JIT
@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.25])
def test_rope_matches_complex_rotation(jit, fraction):
  x = np.random.default_rng(0).normal(size=(2, 7, 3, 16)).astype(np.float32)
  fn = _maybe_jit(positions.apply_rope, jit, base=500.0, fraction=fraction)
  got = fn(jnp.asarray(x), jnp.asarray(PACKED_POSITIONS))
  want = _np_rope(x.astype(np.float64), PACKED_POSITIONS, 500.0, int(16 * fraction))
  np.testing.assert_allclose(got, want, atol=5e-5)


def test_rope_scores_depend_only_on_offset():
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.normal(size=(1, 1, 1, 32)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 1, 32)), jnp.float32)

  def score(m: int, n: int) -> float:
    qm = positions.apply_rope(q, jnp.array([[m]]))
    kn = positions.apply_rope(k, jnp.array([[n]]))
    return float(jnp.sum(qm * kn))

  by_offset = {}
  for offset in (0, 1, 3, -2, 17):
    scores = [score(n + offset, n) for n in (0, 5, 40, 123)]
    np.testing.assert_allclose(scores, scores[0], rtol=1e-4, atol=1e-4)
    by_offset[offset] = scores[0]
  # Not trivially constant: the score does change with the offset.
  assert np.ptp(list(by_offset.values())) > 1.0
  # Offset 0 is the unrotated dot product.
  np.testing.assert_allclose(by_offset[0], float(jnp.sum(q * k)), rtol=1e-5)


def test_rope_partial_leaves_tail_and_keeps_dtype():
  x = jax.random.normal(jax.random.key(0), (2, 5, 2, 12), jnp.bfloat16)
  pos = jnp.broadcast_to(jnp.arange(5)[None] + 7, (2, 5))
  out = positions.apply_rope(x, pos, fraction=1 / 3)
  assert out.dtype == jnp.bfloat16 and out.shape == x.shape
  np.testing.assert_array_equal(out[..., 4:], x[..., 4:])
  assert not np.array_equal(np.asarray(out[..., :4]), np.asarray(x[..., :4]))
  # Position 0 is the identity.
  np.testing.assert_array_equal(positions.apply_rope(x, jnp.zeros((2, 5), jnp.int32)), x)


@pytest.mark.parametrize("head_dim, fraction", [(10, 0.5), (8, 0.3), (8, 0.0), (8, 1.5)])
def test_rope_rejects_bad_rotated_width(head_dim, fraction):
  x = jnp.zeros((1, 2, 1, head_dim))
  with pytest.raises(ValueError, match="fraction"):
    positions.apply_rope(x, jnp.zeros((1, 2), jnp.int32), fraction=fraction)


def test_alibi_slopes_power_of_two_are_exact():
  np.testing.assert_array_equal(positions.alibi_slopes(8), [2.0**-k for k in range(1, 9)])
  np.testing.assert_allclose(positions.alibi_slopes(4), [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8])


def test_alibi_slopes_twelve_heads_follow_paper_rule():
  # Paper's rule: the 8-head slopes, then every other slope of the 16-head sequence
  # 2^-0.5, 2^-1, 2^-1.5, ...: that is 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5.
  want = [2.0**-k for k in range(1, 9)] + [2.0**-0.5, 2.0**-1.5, 2.0**-2.5, 2.0**-3.5]
  np.testing.assert_allclose(positions.alibi_slopes(12), want, rtol=1e-7)
  np.testing.assert_allclose(positions.alibi_slopes(1), [2.0**-8])


@JIT
def test_alibi_bias_values(jit):
  slopes = positions.alibi_slopes(4)
  q_pos = jnp.asarray(PACKED_POSITIONS)
  k_pos = jnp.asarray(PACKED_POSITIONS[:, :5])
  q, k, s = PACKED_POSITIONS, PACKED_POSITIONS[:, :5], np.asarray(slopes, np.float64)
  diff = q[:, None, :, None] - k[:, None, None, :]  # i - j, [B, 1, T, S]
  for causal, want in (
    (True, -s[None, :, None, None] * diff),
    (False, -s[None, :, None, None] * np.abs(diff)),
  ):
    got = _maybe_jit(positions.alibi_bias, jit, causal=causal)(slopes, q_pos, k_pos)
    assert got.shape == (2, 4, 7, 5)
    np.testing.assert_allclose(got, want, rtol=1e-6)
  # Where j <= i (all that a causal mask keeps) the two forms agree.
  sym = positions.alibi_bias(slopes, q_pos, k_pos, causal=False)
  cau = positions.alibi_bias(slopes, q_pos, k_pos, causal=True)
  keep = np.broadcast_to(diff >= 0, sym.shape)
  np.testing.assert_array_equal(np.asarray(sym)[keep], np.asarray(cau)[keep])


# Derived by hand from the T5 rule (relative = key - query; n = query - key):
# bidirectional, 32 buckets -> 16 per side, max_exact = 8, log buckets over [8, 128):
#   bucket = offset + (n if n < 8 else min(15, 8 + floor(8 * ln(n / 8) / ln(16)))),
#   offset 16 for keys after the query. E.g. n=12: 8*ln(1.5)/ln(16) = 1.17 -> 9;
#   n=16: 8*ln 2/ln 16 = 2 -> 10; n=32: 4 -> 12; n=64: 6 -> 14; n=100: 7.29 -> 15.
BIDIRECTIONAL_TABLE = [
  (0, 0),
  (-1, 1),
  (-7, 7),
  (-8, 8),
  (-11, 8),
  (-12, 9),
  (-16, 10),
  (-32, 12),
  (-64, 14),
  (-100, 15),
  (-128, 15),
  (-1000, 15),
  (1, 17),
  (7, 23),
  (16, 26),
  (128, 31),
]
# causal, 32 buckets, max_exact = 16, log buckets over [16, 128): keys after the query -> 0;
#   n=20: 16*ln(1.25)/ln 8 = 1.72 -> 17; n=32: 16/3 -> 21; n=64: 32/3 -> 26; n=127: 15.94 -> 31.
CAUSAL_TABLE = [
  (5, 0),
  (0, 0),
  (-1, 1),
  (-15, 15),
  (-16, 16),
  (-20, 17),
  (-32, 21),
  (-64, 26),
  (-127, 31),
  (-128, 31),
  (-5000, 31),
]


@JIT
@pytest.mark.parametrize(
  "bidirectional, table", [(True, BIDIRECTIONAL_TABLE), (False, CAUSAL_TABLE)], ids=["bi", "causal"]
)
def test_t5_buckets_hand_table(jit, bidirectional, table):
  rel, want = (np.array(c) for c in zip(*table, strict=True))
  fn = _maybe_jit(positions.t5_relative_position_bucket, jit, bidirectional=bidirectional)
  got = fn(jnp.asarray(rel))
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(got, want)


def test_t5_buckets_small_config_and_range():
  # 8 buckets causal: max_exact 4, max_distance 16: n=4 -> 4, n=8 -> 4 + floor(4 * 0.5) = 6.
  got = positions.t5_relative_position_bucket(
    jnp.array([-3, -4, -8, -15, -16]), bidirectional=False, num_buckets=8, max_distance=16
  )
  np.testing.assert_array_equal(got, [3, 4, 6, 7, 7])
  every = positions.t5_relative_position_bucket(jnp.arange(-300, 300), bidirectional=True)
  assert int(every.min()) == 0 and int(every.max()) == 31
  assert np.all(np.diff(np.asarray(every[:300])) <= 0)  # farther past keys: never a closer bucket
