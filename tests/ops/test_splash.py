"""The TPU splash kernel, run in Pallas interpret mode on CPU against the float64 NumPy oracle.

128-wide blocks (the smallest splash takes) on lengths up to 200, so the cases pad a partial
block, cross block boundaries and skip masked blocks. The routing tests pretend the backend is a
TPU; the kernel itself only ever runs in interpret mode here.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.ops import attention as attention_lib
from attn.ops import dispatch, dot_product_attention, splash
from attn.ops.splash import splash_attention, splash_unsupported_reason
from tests import np_reference
from tests.ops.test_attention import TOLERANCE, _rel_err

B, N, H = 2, 4, 32
_splash = functools.partial(splash_attention, block_q=128, block_kv=128, interpret=True)


def _case(name: str) -> dict:
  """Shapes, splash arguments and the same mask as an explicit NumPy predicate `[B, 1, T, S]`."""
  t = s = 130
  kv_heads, op, gain, value_dim = 2, {}, 1.0, H
  extra = None  # a [B, T, S] predicate ANDed to the positional one
  if name == "causal":
    t = s = 128  # block-aligned: no padding, no segment ids inside
    kv_heads, op = 4, {"is_causal": True}
  elif name == "none":
    t = s = 100
  elif name == "window_causal":
    kv_heads, op = 1, {"local_window_size": (7, 3), "is_causal": True}
  elif name == "window_two_sided":
    op = {"local_window_size": (5, 3)}
  elif name == "chunked_window":
    op = {"chunk_size": 48, "local_window_size": (20, 0)}
  elif name == "segments":
    t = s = 150
    seg = np.repeat([[1, 2, 3], [4, 4, 5]], [60, 50, 40], axis=1).astype(np.int32)
    op = {"segment_ids": seg, "is_causal": True}
    extra = seg[:, :, None] == seg[:, None, :]
  elif name == "separate_segments":
    t, s, kv_heads = 100, 140, 1
    q_seg = np.repeat([[1, 2, 9], [3, 3, 3]], [40, 50, 10], axis=1).astype(np.int32)
    kv_seg = np.repeat([[1, 2, 2], [3, 4, 4]], [70, 60, 10], axis=1).astype(np.int32)
    op = {"segment_ids": (q_seg, kv_seg)}  # segment 9 has no key: those rows are zero
    extra = q_seg[:, :, None] == kv_seg[:, None, :]
  elif name == "softcap":
    kv_heads, gain = 4, 3.0  # large logits: tanh far from linear
    op = {"softcap": 5.0, "is_causal": True}
  elif name == "causal_wide":
    t, s, op = 100, 160, {"is_causal": True}
  elif name == "causal_tall":
    t, s, op = 160, 100, {"is_causal": True}
  elif name == "window_tall":
    # Rows i >= 67 see no key: the static mask empties a suffix of the queries.
    t, s, kv_heads, op = 200, 64, 1, {"local_window_size": (3, 2)}
  elif name == "chunked_tall":
    # T > S with chunks: rows from 96 on have no key in their chunk (a suffix of empty rows).
    t, s, op = 200, 64, {"chunk_size": 48}
  elif name == "value_dim":
    op, value_dim = {"is_causal": True}, 2 * H  # Hv != H
  elif name == "lengths":
    q_lens, kv_lens = np.array([90, 130], np.int32), np.array([0, 70], np.int32)
    op = {"is_causal": True, "query_seq_lengths": q_lens, "key_value_seq_lengths": kv_lens}
    i, j = np_reference.positions(t, s)
    extra = (i[None] < q_lens[:, None, None]) & (j[None] < kv_lens[:, None, None])
  else:
    raise ValueError(name)
  i, j = np_reference.positions(t, s)
  mask = np.ones((t, s), bool)
  if op.get("is_causal") or "chunk_size" in op:
    mask &= j <= i
  if "local_window_size" in op:
    left, right = op["local_window_size"]
    mask &= (j >= i - left) & (j <= i + right)
  if "chunk_size" in op:
    mask &= i // op["chunk_size"] == j // op["chunk_size"]
  mask = np.broadcast_to(mask, (B, t, s)) & (True if extra is None else extra)
  return dict(t=t, s=s, kv_heads=kv_heads, op=op, gain=gain, mask=mask[:, None],
              softcap=op.get("softcap"), value_dim=value_dim)


def _inputs(case: dict, dtype, rng: np.random.Generator):
  value_dim = case["value_dim"]
  shapes = [(B, case["t"], N, H), (B, case["s"], case["kv_heads"], H),
            (B, case["s"], case["kv_heads"], value_dim), (B, case["t"], N, value_dim)]
  arrays = [rng.normal(size=shape) for shape in shapes]
  arrays[0] = arrays[0] * case["gain"]
  return [jnp.asarray(a, dtype) for a in arrays]


@functools.partial(jax.jit, static_argnames="static")
def _jitted(q, k, v, dout, arrays, static):
  """Forward and backward in one program: one compile per case."""
  def attend(q, k, v):
    return _splash(q, k, v, scale=H**-0.5, **arrays, **dict(static))
  out, vjp = jax.vjp(attend, q, k, v)
  return out, vjp(dout)


def _forward_and_grads(q, k, v, dout, op: dict):
  """Splits `op` into traced arrays (ids, lengths) and static Python values for the jit."""
  traced = ("segment_ids", "query_seq_lengths", "key_value_seq_lengths")
  arrays = {name: x for name, x in op.items() if name in traced}
  static = tuple((name, x) for name, x in op.items() if name not in traced)
  return _jitted(q, k, v, dout, arrays, static)


CASES = ["causal", "none", "window_causal", "window_two_sided", "chunked_window", "segments",
         "separate_segments", "softcap", "causal_wide", "causal_tall", "window_tall", "lengths",
         "chunked_tall", "value_dim"]


@pytest.mark.parametrize("name", CASES)
def test_forward_and_gradients_match_float64_numpy(name):
  rng = np.random.default_rng(CASES.index(name))
  case = _case(name)
  q, k, v, dout = _inputs(case, jnp.float32, rng)
  out, grads = _forward_and_grads(q, k, v, dout, case["op"])
  expected_out, _, expected_grads = np_reference.attention(
      q, k, v, mask=case["mask"], softcap=case["softcap"], dout=dout)
  assert out.dtype == jnp.float32
  assert _rel_err(out, expected_out) < TOLERANCE["float32"]
  for name_, grad, expected in zip("qkv", grads, expected_grads, strict=True):
    assert np.all(np.isfinite(grad)), f"d{name_}"
    assert _rel_err(grad, expected) < 2 * TOLERANCE["float32"], f"d{name_}"
  # Rows that see no key are exactly zero, with exactly zero query gradients.
  empty = ~case["mask"][:, 0].any(-1)  # [B, T]
  if name in ("separate_segments", "window_tall", "lengths", "chunked_tall"):
    assert empty.any()
  np.testing.assert_array_equal(np.asarray(out)[empty], 0.0)
  np.testing.assert_array_equal(np.asarray(grads[0])[empty], 0.0)


def test_bfloat16_gqa_causal_segments_within_bfloat16_tolerance():
  rng = np.random.default_rng(20)
  case = _case("segments")
  q, k, v, dout = _inputs(case, jnp.bfloat16, rng)
  out, grads = _forward_and_grads(q, k, v, dout, case["op"])
  f32 = [x.astype(jnp.float32) for x in (q, k, v, dout)]
  expected_out, _, expected_grads = np_reference.attention(*f32[:3], mask=case["mask"],
                                                           dout=f32[3])
  assert out.dtype == jnp.bfloat16
  assert _rel_err(out, expected_out) < TOLERANCE["bfloat16"]
  for name, grad, expected in zip("qkv", grads, expected_grads, strict=True):
    assert grad.dtype == jnp.bfloat16, name
    assert _rel_err(grad, expected) < 2 * TOLERANCE["bfloat16"], f"d{name}"


def test_eager_matches_xla_path_with_a_non_power_of_two_scale():
  """Not jitted; the scale is folded into the query, so any scale must match."""
  rng = np.random.default_rng(30)
  q = jnp.asarray(rng.normal(size=(1, 70, 2, 16)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(1, 70, 1, 16)), jnp.float32) for _ in range(2))
  out = _splash(q, k, v, scale=0.3, is_causal=True)
  expected = dot_product_attention(q, k, v, scale=0.3, is_causal=True, implementation="xla")
  assert _rel_err(out, expected) < TOLERANCE["float32"]


@pytest.mark.parametrize("length, block, expected", [
    (100, 512, (128, 128)), (600, 512, (128, 640)), (2048, 512, (512, 2048)),
    (1536, 1024, (768, 1536)), (256, 128, (128, 256))])
def test_block_is_the_largest_fitting_multiple_of_128(length, block, expected):
  assert splash._block_and_padded(length, block) == expected


def test_block_sizes_must_be_multiples_of_128():
  q = jnp.zeros((1, 8, 1, 8))
  with pytest.raises(ValueError, match="multiples of 128"):
    splash_attention(q, q, q, scale=1.0, block_q=64, interpret=True)


@pytest.mark.parametrize("kwargs, expected", [
    ({}, None),
    ({"is_causal": True, "segment_ids": (object(), object()), "softcap": 5.0,
      "local_window_size": (4, 0), "chunk_size": 8, "key_value_seq_lengths": object(),
      "query_seq_lengths": object()}, None),
    ({"bias": object()}, "bias"),
    ({"mask": object()}, "mask"),
    ({"prefix_lengths": object()}, "prefix_lengths"),
    ({"dropout_rate": 0.1}, "dropout_rate"),
    ({"return_weights": True}, "return_weights"),
    ({"bias": object(), "dropout_rate": 0.1}, "bias, dropout_rate"),
    ({"softcap": jnp.float32(5.0)}, "softcap as a Python float"),
    ({"kv_len": 0}, "non-empty"),
])
def test_splash_support_rules(kwargs, expected):
  kv_len = kwargs.pop("kv_len", 8)
  q = jax.ShapeDtypeStruct((1, 8, 4, 16), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((1, kv_len, 2, 16), jnp.bfloat16)
  reason = splash_unsupported_reason(query=q, key=k, value=k, **kwargs)
  assert reason is None if expected is None else expected in reason


@pytest.fixture
def on_tpu(monkeypatch):
  """Pretend the default backend is a TPU (the kernel still runs in interpret mode)."""
  monkeypatch.setattr(dispatch, "is_tpu", lambda: True)
  monkeypatch.setattr(attention_lib, "splash_attention", _splash)
  dispatch._log_fallback_once.cache_clear()  # each test sees its own log line
  yield
  dispatch._log_fallback_once.cache_clear()


def _features(t=8, s=8, head_dim=128, **kwargs):
  q = jax.ShapeDtypeStruct((1, t, 4, head_dim), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((1, s, 2, head_dim), jnp.bfloat16)
  return dict(query=q, key=k, value=k, **kwargs)


def test_tpu_offers_pallas_and_explicit_pallas_resolves_or_raises(on_tpu):
  assert dispatch.available_implementations() == ("xla", "blockwise", "pallas")
  choose = dispatch.choose_implementation
  assert choose("pallas", **_features(is_causal=True, softcap=30.0)) == "pallas"
  with pytest.raises(ValueError, match=r"'pallas' cannot run.*splash.*bias, prefix_lengths"):
    choose("pallas", **_features(bias=object(), prefix_lengths=object()))
  with pytest.raises(ValueError, match=r"'cudnn' is not available on backend"):
    choose("cudnn", **_features())


def test_tpu_auto_never_picks_splash(on_tpu, monkeypatch):
  """Auto keeps to the XLA paths until the kernel has run on a real TPU."""
  monkeypatch.setattr(jax, "device_count", lambda: 1)
  choose = dispatch.choose_implementation
  assert choose(None, **_features(t=2048, s=2048, is_causal=True)) == "blockwise"
  assert choose(None, **_features(is_causal=True)) == "xla"


def test_tpu_dispatch_matches_xla_path(on_tpu):
  """dot_product_attention(implementation='pallas') passes every supported argument through."""
  rng = np.random.default_rng(40)
  q = jnp.asarray(rng.normal(size=(B, 40, N, 16)) * 3.0, jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(B, 40, 2, 16)), jnp.float32) for _ in range(2))
  seg = jnp.asarray(np.repeat([[1, 2], [3, 4]], [25, 15], axis=1), jnp.int32)
  kwargs = dict(is_causal=True, local_window_size=(9, 0), chunk_size=16, segment_ids=seg,
                softcap=4.0, query_seq_lengths=jnp.array([40, 33]),
                key_value_seq_lengths=jnp.array([30, 40]), scale=0.2)
  out = dot_product_attention(q, k, v, implementation="pallas", **kwargs)
  expected = dot_product_attention(q, k, v, implementation="xla", **kwargs)
  assert _rel_err(out, expected) < TOLERANCE["float32"]
  # Unbatched inputs, as in jax.nn.
  out = dot_product_attention(q[0], k[0], v[0], implementation="pallas", is_causal=True)
  expected = dot_product_attention(q[0], k[0], v[0], implementation="xla", is_causal=True)
  assert _rel_err(out, expected) < TOLERANCE["float32"]
