"""dot_product_attention against the float64 NumPy oracle, jax.nn, and its own contracts."""

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.ops import attention as attention_lib
from attn.ops import dispatch, dot_product_attention, reference
from attn.ops import masks as masks_lib
from tests import np_reference

B, N, H = 2, 4, 16
HEADS = {"mha": 4, "gqa": 2, "mqa": 1}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Max error relative to the largest reference magnitude: float32 as the issue asks; the half
# types get ~4 ulps of their mantissa (bf16 eps 2^-7, fp16 eps 2^-10), since the weights are
# rounded to the input dtype before the value matmul, as in jax.nn.
TOLERANCE = {"float32": 1e-5, "bfloat16": 3e-2, "float16": 4e-3}


def _case(kind: str, rng: np.random.Generator) -> dict:
  """Arguments for our op plus the same mask / bias written as explicit NumPy predicates."""
  t, s = 12, 12
  op, np_mask, np_bias, softcap, logit_gain = {}, None, None, None, 1.0
  if kind == "causal":
    op = {"is_causal": True}
    i, j = np_reference.positions(t, s)
    np_mask = j <= i
  elif kind in ("causal_wide", "causal_tall"):
    # T != S: the first query aligns with the first key, as in jax.nn.
    t, s = (6, 10) if kind == "causal_wide" else (10, 6)
    op = {"is_causal": True}
    i, j = np_reference.positions(t, s)
    np_mask = j <= i
  elif kind == "padding":
    q_lens, kv_lens = np.array([12, 5], np.int32), np.array([9, 0], np.int32)
    op = {"query_seq_lengths": q_lens, "key_value_seq_lengths": kv_lens}
    i, j = np_reference.positions(t, s)
    np_mask = (i[None] < q_lens[:, None, None]) & (j[None] < kv_lens[:, None, None])
    np_mask = np_mask[:, None]
  elif kind == "segments":
    seg = np.array([[1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 0, 0],
                    [1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2]], np.int32)
    op = {"segment_ids": seg, "is_causal": True}
    i, j = np_reference.positions(t, s)
    np_mask = ((seg[:, :, None] == seg[:, None, :]) & (j <= i)[None])[:, None]
  elif kind == "window":
    op = {"local_window_size": (2, 1)}
    i, j = np_reference.positions(t, s)
    np_mask = (j >= i - 2) & (j <= i + 1)
  elif kind == "prefix":
    prefix = np.array([4, 0], np.int32)
    op = {"prefix_lengths": prefix}
    i, j = np_reference.positions(t, s)
    np_mask = ((j <= i)[None] | (j[None] < prefix[:, None, None]))[:, None]
  elif kind == "chunked":
    op = {"chunk_size": 5}
    i, j = np_reference.positions(t, s)
    np_mask = (j <= i) & (i // 5 == j // 5)
  elif kind == "bool_mask":
    np_mask = rng.random((B, N, t, s)) < 0.6
    np_mask[0, 1, 3] = False  # one fully masked row in one head
    op = {"mask": np_mask}
  elif kind == "bias":
    np_bias = rng.normal(size=(1, N, t, s)) * 2.0
    np_mask = rng.random((B, 1, t, s)) < 0.8
    op = {"bias": np_bias.astype(np.float32), "mask": np_mask}
  elif kind == "softcap":
    softcap, logit_gain = 5.0, 3.0  # large enough logits that tanh is far from linear
    op = {"softcap": softcap, "is_causal": True}
    i, j = np_reference.positions(t, s)
    np_mask = j <= i
  elif kind != "none":
    raise ValueError(kind)
  if np_mask is not None:
    np_mask = np.broadcast_to(np_mask, np.broadcast_shapes(np_mask.shape, (1, 1, t, s)))
  return dict(t=t, s=s, op=op, mask=np_mask, bias=np_bias, softcap=softcap, gain=logit_gain)


MASK_KINDS = ["none", "causal", "causal_wide", "causal_tall", "padding", "segments", "window",
              "prefix", "chunked", "bool_mask", "bias", "softcap"]


def _inputs(case: dict, num_kv_heads: int, dtype, rng: np.random.Generator):
  """Random q, k, v, output cotangent, rounded to `dtype` (the oracle sees the rounded values)."""
  shapes = [(B, case["t"], N, H), (B, case["s"], num_kv_heads, H),
            (B, case["s"], num_kv_heads, H), (B, case["t"], N, H)]
  arrays = [rng.normal(size=shape) for shape in shapes]
  arrays[0] = arrays[0] * case["gain"]
  return [jnp.asarray(a, dtype) for a in arrays]


def _rel_err(actual, expected) -> float:
  expected = np.asarray(expected, np.float64)
  return float(np.max(np.abs(np.asarray(actual, np.float64) - expected)) / np.max(np.abs(expected)))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_forward_and_gradients_match_float64_numpy(kind, dtype, heads, jit):
  # crc32, not hash(): str hashes change with PYTHONHASHSEED, the inputs must not.
  rng = np.random.default_rng(zlib.crc32(f"{kind}-{dtype}-{heads}".encode()))
  case = _case(kind, rng)
  q, k, v, dout = _inputs(case, HEADS[heads], DTYPES[dtype], rng)

  def run(q, k, v):
    return dot_product_attention(q, k, v, **case["op"])

  fn = jax.jit(run) if jit else run
  out, vjp = jax.vjp(fn, q, k, v)
  grads = vjp(dout)
  expected_out, _, expected_grads = np_reference.attention(
      q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), mask=case["mask"],
      bias=case["bias"], softcap=case["softcap"], dout=dout.astype(jnp.float32))

  assert out.dtype == DTYPES[dtype]
  tol = TOLERANCE[dtype]
  assert _rel_err(out, expected_out) < tol
  for name, grad, expected in zip("qkv", grads, expected_grads, strict=True):
    assert grad.dtype == DTYPES[dtype], name
    assert _rel_err(grad, expected) < 2 * tol, f"d{name}"


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_reference_matches_float64_numpy(kind):
  rng = np.random.default_rng(7)
  case = _case(kind, rng)
  q, k, v, dout = _inputs(case, 2, jnp.float32, rng)
  out, weights = reference.attention(q, k, v, return_weights=True, **case["op"])
  expected_out, expected_weights = np_reference.attention(
      q, k, v, mask=case["mask"], bias=case["bias"], softcap=case["softcap"])
  assert _rel_err(out, expected_out) < 1e-5
  np.testing.assert_allclose(weights, expected_weights, atol=1e-6)


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_returned_weights_match_numpy(kind):
  rng = np.random.default_rng(3)
  case = _case(kind, rng)
  q, k, v, _ = _inputs(case, 2, jnp.float32, rng)
  _, weights = dot_product_attention(q, k, v, return_weights=True, **case["op"])
  _, expected = np_reference.attention(q, k, v, mask=case["mask"], bias=case["bias"],
                                       softcap=case["softcap"])
  assert weights.dtype == jnp.float32
  np.testing.assert_allclose(weights, expected, atol=1e-6)


# Features jax.nn.dot_product_attention shares with us. Rows that jax.nn leaves undefined
# (every key masked: it returns the mean of the values) are compared separately below.
JAX_NN_CASES = {
    "plain": {},
    "causal": {"is_causal": True},
    "causal_wide": {"is_causal": True, "_t": 5},
    "scale": {"scale": 0.3},
    "padding": {"query_seq_lengths": np.array([12, 7], np.int32),
                "key_value_seq_lengths": np.array([10, 4], np.int32)},
    "window": {"local_window_size": (3, 0), "is_causal": True},
    "window_sym": {"local_window_size": 2},
    "mask_bias": {"mask": "random", "bias": "random"},
}


@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("name", list(JAX_NN_CASES))
def test_matches_jax_nn_forward_and_gradients(name, heads):
  rng = np.random.default_rng(11)
  kwargs = dict(JAX_NN_CASES[name])
  t = kwargs.pop("_t", 12)
  kv = HEADS[heads]
  q = jnp.asarray(rng.normal(size=(B, t, N, H)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(B, 12, kv, H)), jnp.float32) for _ in range(2))
  if kwargs.get("mask") == "random":
    kwargs["mask"] = jnp.asarray(rng.random((B, N, t, 12)) < 0.7).at[..., 0].set(True)
    kwargs["bias"] = jnp.asarray(rng.normal(size=(1, N, t, 12)), jnp.float32)

  def loss(fn, q, k, v):
    out = fn(q, k, v, **kwargs)
    return jnp.sum(out * jnp.cos(out)), out

  ours = jax.value_and_grad(functools.partial(loss, dot_product_attention), (0, 1, 2),
                            has_aux=True)(q, k, v)
  theirs = jax.value_and_grad(functools.partial(loss, jax.nn.dot_product_attention),
                              (0, 1, 2), has_aux=True)(q, k, v)
  np.testing.assert_allclose(ours[0][1], theirs[0][1], rtol=1e-5, atol=1e-5)
  for ours_grad, their_grad in zip(ours[1], theirs[1], strict=True):
    np.testing.assert_allclose(ours_grad, their_grad, rtol=1e-5, atol=1e-5)


def test_fully_masked_rows_differ_from_jax_nn_by_design():
  """jax.nn averages the values when every key is masked; we return zeros."""
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(1, 4, 2, 8)), jnp.float32) for _ in range(3))
  lengths = jnp.array([0], jnp.int32)
  ours = dot_product_attention(q, k, v, key_value_seq_lengths=lengths)
  theirs = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths)
  assert np.all(np.asarray(ours) == 0.0)
  np.testing.assert_allclose(theirs[0, 0], jnp.mean(v[0], axis=0), rtol=1e-5)


_NO_MASKS = dict(mask=None, is_causal=False, query_seq_lengths=None, key_value_seq_lengths=None,
                 segment_ids=None, local_window_size=None, prefix_lengths=None, chunk_size=None)


def test_row_check_is_skipped_only_where_no_row_can_be_empty():
  """`_rows_never_empty` (which skips the zero-row fix-up) never claims a row that is empty.

  Random combinations of every mask keyword, square and not; whenever the rule says 'never
  empty', every row of the dense mask must see a key, and the rule must hold for the common
  LM cases (causal + packed segments, windows, chunks, prefixes) so they skip the fix-up.
  """
  rng = np.random.default_rng(0)
  skipped = 0
  for _ in range(400):
    t = int(rng.integers(1, 9))
    s = t if rng.random() < 0.6 else int(rng.integers(1, 9))
    kwargs = {"is_causal": bool(rng.random() < 0.5)}
    if rng.random() < 0.4:
      ids = rng.integers(0, 3, size=(2, t)).astype(np.int32)
      kwargs["segment_ids"] = ids if s == t and rng.random() < 0.7 else (
          ids, rng.integers(0, 3, size=(2, s)).astype(np.int32))
    if rng.random() < 0.3:
      kwargs["local_window_size"] = (int(rng.integers(0, 3)), int(rng.integers(0, 3)))
    if rng.random() < 0.3:
      kwargs["chunk_size"] = int(rng.integers(1, 4))
    if rng.random() < 0.2:
      kwargs["prefix_lengths"] = rng.integers(0, t + 1, size=2).astype(np.int32)
    if rng.random() < 0.15:
      kwargs["key_value_seq_lengths"] = rng.integers(0, s + 1, size=2).astype(np.int32)
    if rng.random() < 0.15:
      kwargs["query_seq_lengths"] = rng.integers(0, t + 1, size=2).astype(np.int32)
    if rng.random() < 0.1:
      kwargs["mask"] = rng.random((2, 1, t, s)) < 0.5
    if not attention_lib._rows_never_empty(t, s, **{**_NO_MASKS, **kwargs}):
      continue
    skipped += 1
    dense = masks_lib.make_attention_mask(t, s, **kwargs)  # None: nothing masked
    assert dense is None or np.asarray(dense).any(axis=-1).all(), (t, s, kwargs)
  assert skipped > 100
  packed = np.array([[1, 1, 2, 2, 0]], np.int32)
  for kwargs in ({"is_causal": True, "segment_ids": packed},
                 {"is_causal": True, "local_window_size": (2, 0), "segment_ids": packed},
                 {"is_causal": True, "chunk_size": 2}, {"prefix_lengths": np.array([2])}):
    assert attention_lib._rows_never_empty(5, 5, **{**_NO_MASKS, **kwargs}), kwargs
  assert attention_lib._rows_never_empty(5, 3, **_NO_MASKS)  # unmasked cross-attention


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_fully_masked_rows_are_zero_with_zero_finite_gradients(dtype):
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 6, 4, 8)), DTYPES[dtype]) for _ in range(3))
  mask = np.ones((2, 4, 6, 6), bool)
  mask[0, :, 2] = False  # query 2 of example 0 sees nothing, in every head
  mask[1, 3, 4] = False  # query 4 of example 1 sees nothing in head 3 only
  lengths = jnp.array([6, 0], jnp.int32)  # example 1: no keys at all

  def loss(q, k, v):
    out = dot_product_attention(q, k, v, mask=jnp.asarray(mask), key_value_seq_lengths=lengths)
    return jnp.sum(out.astype(jnp.float32) ** 2), out

  (_, out), (dq, dk, dv) = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
  assert np.all(np.asarray(out[0, 2]) == 0) and np.all(np.asarray(out[1]) == 0)
  for g in (dq, dk, dv):
    assert np.all(np.isfinite(np.asarray(g, np.float32)))
  assert np.all(np.asarray(dq[0, 2]) == 0) and np.all(np.asarray(dq[1]) == 0)
  assert np.all(np.asarray(dk[1]) == 0) and np.all(np.asarray(dv[1]) == 0)
  assert np.any(np.asarray(out[1 - 1, 3]) != 0)  # a live row stays live


def test_large_logits_in_float16_stay_finite_and_correct():
  rng = np.random.default_rng(2)
  head_dim = 16
  # q.k reaches 1.6e5, past float16's 65504; logits (scale 1/16) reach 1e4.
  q = jnp.asarray(100.0 + rng.normal(size=(1, 8, 2, head_dim)), jnp.float16)
  k = jnp.asarray(100.0 + rng.normal(size=(1, 8, 2, head_dim)), jnp.float16)
  v = jnp.asarray(rng.normal(size=(1, 8, 2, head_dim)), jnp.float16)
  fn = functools.partial(dot_product_attention, scale=1.0 / head_dim, is_causal=True)
  out, vjp = jax.vjp(fn, q, k, v)
  grads = vjp(jnp.ones_like(out))
  for x in (out, *grads):
    assert np.all(np.isfinite(np.asarray(x, np.float32)))
  i, j = np_reference.positions(8, 8)
  expected, _ = np_reference.attention(q.astype(jnp.float32), k.astype(jnp.float32),
                                       v.astype(jnp.float32), mask=j <= i, scale=1 / head_dim)
  assert _rel_err(out, expected) < TOLERANCE["float16"]


@pytest.mark.parametrize("kind", ["causal", "chunked", "window_left", "segments"])
def test_causality_gradient_of_past_outputs_wrt_future_keys_is_exactly_zero(kind):
  rng = np.random.default_rng(4)
  t = 8
  kwargs = {
      "causal": {"is_causal": True},
      "chunked": {"chunk_size": 3},
      "window_left": {"local_window_size": (2, 0)},
      "segments": {"segment_ids": jnp.array([[1, 1, 1, 2, 2, 2, 2, 2]]), "is_causal": True},
  }[kind]
  q, k, v = (jnp.asarray(rng.normal(size=(1, t, 2, 4)), jnp.float32) for _ in range(3))
  jac_k, jac_v = jax.jacrev(
      lambda k, v: dot_product_attention(q, k, v, **kwargs), argnums=(0, 1))(k, v)
  # jac[b, t, n, h, b', s, k, h']: output position t against key/value position s.
  i, j = np_reference.positions(t, t)
  for jac in (jac_k, jac_v):
    per_pair = np.abs(np.asarray(jac)).sum(axis=(0, 2, 3, 4, 6, 7))  # [T, S]
    assert np.all(per_pair[j > i] == 0.0)
  # The test can fail: each output does depend on its own position's value.
  per_pair_v = np.abs(np.asarray(jac_v)).sum(axis=(0, 2, 3, 4, 6, 7))
  assert np.all(per_pair_v[i == j] > 0.0)


def test_dropout_keeps_expected_mass_and_is_deterministic_per_key():
  rng = np.random.default_rng(5)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 16, 4, 8)), jnp.float32) for _ in range(3))
  key = jax.random.key(0)
  a = dot_product_attention(q, k, v, dropout_rate=0.5, dropout_rng=key)
  b = dot_product_attention(q, k, v, dropout_rate=0.5, dropout_rng=key)
  c = dot_product_attention(q, k, v, dropout_rate=0.5, dropout_rng=jax.random.key(1))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  # Inverted dropout is unbiased: averaging many masks recovers the deterministic output.
  outs = jax.vmap(lambda r: dot_product_attention(q, k, v, dropout_rate=0.5, dropout_rng=r))(
      jax.random.split(key, 2000))
  np.testing.assert_allclose(outs.mean(0), dot_product_attention(q, k, v), atol=0.05)


def test_unbatched_inputs_like_jax_nn():
  rng = np.random.default_rng(6)
  q, k, v = (jnp.asarray(rng.normal(size=(5, 2, 8)), jnp.float32) for _ in range(3))
  np.testing.assert_allclose(dot_product_attention(q, k, v, is_causal=True),
                             jax.nn.dot_product_attention(q, k, v, is_causal=True), atol=1e-6)


def test_value_head_dim_may_differ_from_query_head_dim():
  rng = np.random.default_rng(8)
  q, k = (jnp.asarray(rng.normal(size=(1, 5, 2, 8)), jnp.float32) for _ in range(2))
  v = jnp.asarray(rng.normal(size=(1, 5, 2, 3)), jnp.float32)
  expected, _ = np_reference.attention(q, k, v)
  np.testing.assert_allclose(dot_product_attention(q, k, v), expected, atol=1e-6)


def _qkv(t=4, n=4, kv=4, hq=8, hk=8, s=4):
  return (jnp.zeros((2, t, n, hq)), jnp.zeros((2, s, kv, hk)), jnp.zeros((2, s, kv, hk)))


@pytest.mark.parametrize("make, match", [
    (lambda: dot_product_attention(*_qkv(hk=4)), r"query head_dim 8 != key head_dim 4"),
    (lambda: dot_product_attention(*_qkv(n=6, kv=4)), r"query heads \(6\).*key/value heads \(4\)"),
    (lambda: dot_product_attention(*_qkv(), mask=jnp.ones((2, 1, 3, 4), bool)),
     r"mask has shape \(2, 1, 3, 4\).*\(2, 4, 4, 4\)"),
    (lambda: dot_product_attention(*_qkv(), mask=jnp.ones((2, 4), bool)),
     r"mask has shape \(2, 4\)"),
    (lambda: dot_product_attention(*_qkv(), mask=jnp.ones((1, 1, 4, 4))), r"mask must be boolean"),
    (lambda: dot_product_attention(*_qkv(), bias=jnp.ones((3, 1, 4, 4))), r"bias has shape"),
    (lambda: dot_product_attention(*_qkv(), implementation="flash"),
     r"implementation='flash' is unknown.*'xla'"),
    (lambda: dot_product_attention(*_qkv(), query_seq_lengths=jnp.ones((3,), jnp.int32)),
     r"query_seq_lengths must have shape \[B\] = \(2,\)"),
    (lambda: dot_product_attention(*_qkv(), segment_ids=jnp.ones((2, 5), jnp.int32)),
     r"segment_ids must be \[B, T\]"),
    (lambda: dot_product_attention(*_qkv(), local_window_size=(-1, 2)), r"local_window_size"),
    (lambda: dot_product_attention(*_qkv(), softcap=0.0), r"softcap must be positive"),
    (lambda: dot_product_attention(*_qkv(), dropout_rate=0.1), r"needs dropout_rng"),
    (lambda: dot_product_attention(jnp.zeros((2, 4, 8)), *_qkv()[1:]), r"must be \[B, T, N, H\]"),
])
def test_bad_input_raises_a_clear_value_error(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_explicit_cudnn_on_cpu_says_what_is_available():
  assert dispatch.available_implementations() == ("xla", "blockwise")
  with pytest.raises(ValueError,
                     match=r"'cudnn' is not available on backend 'cpu'.*\('xla', 'blockwise'\)"):
    dot_product_attention(*_qkv(), implementation="cudnn")


@pytest.mark.parametrize("overrides, expected", [
    ({}, None),
    ({"dtype": jnp.float32}, "bfloat16 or float16"),
    ({"head_dim": 256}, "head_dim must be a multiple of 8"),
    ({"softcap": 30.0}, "softcap"),
    ({"segment_ids": object(), "return_weights": True}, "boundaries), return_weights"),
    ({"segment_ids": object()}, "packed-segment boundaries"),
    ({"local_window_size": (4, 4)}, "left bound"),
    ({"local_window_size": (4, 0)}, "left bound"),  # jax PR 39576: would see the future
    ({"local_window_size": (4, 4), "is_causal": True}, None),
    ({"mask": np.ones((1, 1, 1, 8), bool)}, "full [T, S]"),  # jax issue 28974
    ({"mask": np.ones((1, 1, 8, 8), bool), "bias": np.zeros((1, 4, 8, 8))}, None),
])
def test_cudnn_support_rules(overrides, expected):
  dtype = overrides.pop("dtype", jnp.bfloat16)
  head_dim = overrides.pop("head_dim", 64)
  q = jax.ShapeDtypeStruct((1, 8, 4, head_dim), dtype)
  reason = dispatch.cudnn_unsupported_reason(query=q, key=q, value=q, **overrides)
  if expected is None:
    assert reason is None
  else:
    assert expected in reason


def test_cudnn_rejects_causal_with_different_lengths():
  q = jax.ShapeDtypeStruct((1, 8, 4, 64), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((1, 12, 4, 64), jnp.bfloat16)
  reason = dispatch.cudnn_unsupported_reason(query=q, key=k, value=k, is_causal=True)
  assert "T != S" in reason
  assert dispatch.cudnn_unsupported_reason(query=q, key=k, value=k) is None


# The cases jax.nn's cuDNN path gets silently wrong or refuses: on an NVIDIA GPU auto must
# route them elsewhere, log why, and give the reference's numbers.
_CUDNN_TRAPS = {
    "packed_segments": dict(is_causal=True, segment_ids=np.repeat([[1, 2]], 8, axis=1)),
    "window_not_causal": dict(local_window_size=(3, 0)),
    "two_sided_window": dict(local_window_size=(2, 2)),
    "broadcast_key_mask": dict(mask=(np.arange(16) < 11)[None, None, None, :]),
}


@pytest.mark.parametrize("case", list(_CUDNN_TRAPS))
def test_cudnn_traps_fall_back_with_a_logged_reason_and_match_the_reference(
    case, monkeypatch, caplog):
  monkeypatch.setattr(dispatch, "is_nvidia_gpu", lambda: True)
  dispatch._log_fallback_once.cache_clear()
  rng = np.random.default_rng(7)
  q, k, v = (jnp.asarray(rng.normal(size=(1, 16, 4, 64)), jnp.bfloat16) for _ in range(3))
  kwargs = {name: jnp.asarray(x) if isinstance(x, np.ndarray) else x
            for name, x in _CUDNN_TRAPS[case].items()}
  features = dict(query=q, key=k, value=v, **kwargs)
  assert "cudnn" in dispatch.available_implementations()
  assert dispatch.cudnn_unsupported_reason(**features) is not None
  with caplog.at_level("INFO", logger=dispatch.__name__):
    out = dot_product_attention(q, k, v, **kwargs)  # would raise on CPU if it chose cuDNN
  assert "instead of 'cudnn'" in caplog.text
  with pytest.raises(ValueError, match="cannot run these arguments"):
    dot_product_attention(q, k, v, implementation="cudnn", **kwargs)
  expected = reference.attention(*(x.astype(jnp.float32) for x in (q, k, v)), **kwargs)
  np.testing.assert_allclose(np.asarray(out, np.float32), expected, atol=3e-2, rtol=3e-2)


def test_gpu_auto_picks_the_pallas_kernel_where_cudnn_cannot_run_on_verified_inputs(
    monkeypatch, caplog):
  """Packed segments on a (simulated) NVIDIA GPU go to the Triton kernel for bfloat16 at
  head_dim 128 (what tests/ops/test_hardware.py verified on an H200), else to the XLA paths."""
  monkeypatch.setattr(dispatch, "is_nvidia_gpu", lambda: True)
  dispatch._log_fallback_once.cache_clear()

  def choose(t=16, s=16, head_dim=128, dtype=jnp.bfloat16, **kwargs):
    q = jax.ShapeDtypeStruct((1, t, 4, head_dim), dtype)
    k = jax.ShapeDtypeStruct((1, s, 2, head_dim), dtype)
    return dispatch.choose_implementation(None, query=q, key=k, value=k, **kwargs)

  seg = np.repeat([[1, 2]], 8, axis=1)
  with caplog.at_level("INFO", logger=dispatch.__name__):
    assert choose(is_causal=True, segment_ids=seg) == "pallas"
  assert "using 'pallas' instead of 'cudnn'" in caplog.text
  assert choose(is_causal=True) == "cudnn"  # cuDNN first wherever it runs
  # Outside the verified inputs, or where the kernel cannot run: the XLA paths as before.
  assert choose(segment_ids=seg, head_dim=64) == "xla"
  assert choose(segment_ids=seg, dtype=jnp.float16) == "xla"
  assert choose(segment_ids=seg, is_causal=True, local_window_size=(3, 0)) == "xla"
  assert choose(t=8, segment_ids=(seg[:, :8], seg)) == "xla"
  big = np.ones((1, 32768), np.int32)  # float32 logits of 16 GiB: O(T) memory either way
  assert choose(t=32768, s=32768, segment_ids=big) == "pallas"
  assert choose(t=32768, s=32768, segment_ids=big, head_dim=64) == "blockwise"


def test_cudnn_call_fixes_up_windows_bias_dtype_and_empty_rows(monkeypatch):
  """On a (simulated) GPU the cuDNN call gets a causal window without its meaningless right
  bound, a bias in the inputs' dtype, and rows that see no key come back as zeros (jax.nn,
  like cuDNN's mask-as-bias, gives the mean of the values there)."""
  monkeypatch.setattr(dispatch, "is_nvidia_gpu", lambda: True)
  original = jax.nn.dot_product_attention
  calls = []

  def fake_cudnn(*args, implementation=None, **kwargs):
    calls.append((args, kwargs))
    assert implementation == "cudnn"
    return original(*args, implementation="xla", **kwargs)

  monkeypatch.setattr(jax.nn, "dot_product_attention", fake_cudnn)
  rng = np.random.default_rng(8)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 16, 4, 64)), jnp.bfloat16) for _ in range(3))
  mask = np.ones((2, 1, 16, 16), bool)
  mask[0, :, 5] = False  # query 5 of example 0 sees no key
  cases = [
      dict(is_causal=True, local_window_size=(4, 4),
           key_value_seq_lengths=jnp.array([16, 9], jnp.int32)),
      dict(mask=jnp.asarray(mask), bias=jnp.asarray(rng.normal(size=(1, 4, 16, 16)),
                                                    jnp.float32)),
      dict(key_slice=slice(0, 8)),  # unmasked, S != T (linformer's projected keys): no fix-up
  ]
  for kwargs in cases:
    calls.clear()
    keys = kwargs.pop("key_slice", slice(None))
    out = dot_product_attention(q, k[:, keys], v[:, keys], **kwargs)
    (args, call_kwargs), = calls
    if "local_window_size" in kwargs:
      assert call_kwargs["local_window_size"] == (4, 0)
    if "bias" in kwargs:
      assert args[3].dtype == jnp.bfloat16
    expected = reference.attention(*(x.astype(jnp.float32) for x in (q, k[:, keys],
                                                                     v[:, keys])), **kwargs)
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, atol=5e-2, rtol=5e-2)
    if "mask" in kwargs:
      assert np.all(np.asarray(out[0, 5], np.float32) == 0)
