"""The blockwise (flash-style) path against the float64 NumPy oracle and the reference op.

Small tiles (5 query rows x 4 keys on 12 x 12 inputs) so every test crosses tile boundaries,
pads a partial tile and skips tiles; the memory targets are checked on compiled programs only.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.ops import dot_product_attention, reference
from attn.ops.blockwise import blockwise_attention
from tests import np_reference
from tests.ops.test_attention import DTYPES, HEADS, MASK_KINDS, TOLERANCE, _case, _inputs, _rel_err

B, N = 2, 4
SMALL_TILES = {"block_q": 5, "block_kv": 4}


def _blockwise(q, k, v, bias=None, **kwargs):
  return blockwise_attention(q, k, v, bias, **SMALL_TILES, **kwargs)


# Each mask kind once, cycling through MHA / GQA / MQA (the compiles dominate the test time).
@pytest.mark.parametrize("kind, heads", [(kind, list(HEADS)[i % 3])
                                         for i, kind in enumerate(MASK_KINDS)])
def test_forward_and_gradients_match_float64_numpy(kind, heads):
  rng = np.random.default_rng(MASK_KINDS.index(kind))  # str hash() changes between runs
  case = _case(kind, rng)
  q, k, v, dout = _inputs(case, HEADS[heads], jnp.float32, rng)

  @jax.jit  # forward and backward in one program: one compile
  def run(q, k, v, dout):
    out, vjp = jax.vjp(lambda q, k, v: _blockwise(q, k, v, **case["op"]), q, k, v)
    return out, vjp(dout)

  out, grads = run(q, k, v, dout)
  expected_out, _, expected_grads = np_reference.attention(
      q, k, v, mask=case["mask"], bias=case["bias"], softcap=case["softcap"], dout=dout)
  assert _rel_err(out, expected_out) < TOLERANCE["float32"]
  for name, grad, expected in zip("qkv", grads, expected_grads, strict=True):
    assert _rel_err(grad, expected) < 2 * TOLERANCE["float32"], f"d{name}"


@pytest.mark.parametrize("kind, dtype, jit", [
    ("causal", "float32", False), ("segments", "float32", True),
    ("causal_wide", "bfloat16", True), ("softcap", "float16", True)])
def test_dispatch_matches_reference_op_forward_and_gradients(kind, dtype, jit):
  """Through `dot_product_attention(implementation='blockwise')`, every dtype, GQA."""
  rng = np.random.default_rng(100 + MASK_KINDS.index(kind))
  case = _case(kind, rng)
  q, k, v, _ = _inputs(case, 2, DTYPES[dtype], rng)
  kwargs = dict(case["op"])
  bias = kwargs.pop("bias", None)

  def loss(fn, q, k, v):
    out = fn(q, k, v, bias, **kwargs)
    return jnp.sum(jnp.sin(out.astype(jnp.float32))), out

  ours = functools.partial(dot_product_attention, implementation="blockwise")
  grad_fn = jax.value_and_grad(functools.partial(loss, ours), (0, 1, 2), has_aux=True)
  (_, out), grads = (jax.jit(grad_fn) if jit else grad_fn)(q, k, v)
  (_, expected_out), expected_grads = jax.jit(jax.value_and_grad(
      functools.partial(loss, reference.attention), (0, 1, 2), has_aux=True))(q, k, v)
  assert out.dtype == DTYPES[dtype]
  assert _rel_err(out, expected_out) < TOLERANCE[dtype]
  for name, grad, expected in zip("qkv", grads, expected_grads, strict=True):
    assert grad.dtype == DTYPES[dtype], name
    assert _rel_err(grad, expected) < 2 * TOLERANCE[dtype], f"d{name}"


# A full bias, and one broadcast along T, whose gradient sums over several tiles.
@pytest.mark.parametrize("bias_shape", [(1, N, 13, 11), (B, N, 1, 11)])
def test_every_mask_kind_at_once_with_a_broadcast_bias_and_its_gradient(bias_shape):
  """T != S, odd lengths, GQA: padding, segments, window, soft-cap, dense mask and bias."""
  rng = np.random.default_rng(9)
  t, s, kv_heads = 13, 11, 2
  q = jnp.asarray(rng.normal(size=(B, t, N, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(B, s, kv_heads, 8)), jnp.float32) for _ in range(2))
  bias = jnp.asarray(rng.normal(size=bias_shape), jnp.float32)
  q_ids = np.array([[1] * 6 + [2] * 7, [1] * 13], np.int32)
  kv_ids = np.array([[1] * 5 + [2] * 6, [1] * 11], np.int32)
  kwargs = dict(mask=jnp.asarray(rng.random((B, 1, t, s)) < 0.8),
                query_seq_lengths=jnp.array([13, 9]), key_value_seq_lengths=jnp.array([11, 7]),
                segment_ids=(jnp.asarray(q_ids), jnp.asarray(kv_ids)),
                local_window_size=(4, 3), softcap=3.0)
  ours = jax.jit(jax.value_and_grad(lambda *a: jnp.sum(jnp.cos(_blockwise(*a, **kwargs))),
                                    argnums=(0, 1, 2, 3)))(q, k, v, bias)
  theirs = jax.value_and_grad(lambda *a: jnp.sum(jnp.cos(reference.attention(*a, **kwargs))),
                              argnums=(0, 1, 2, 3))(q, k, v, bias)
  np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-5)
  for ours_grad, their_grad in zip(ours[1], theirs[1], strict=True):
    assert ours_grad.shape == their_grad.shape
    np.testing.assert_allclose(ours_grad, their_grad, atol=2e-5, rtol=1e-4)


def test_fully_masked_rows_are_zero_with_zero_finite_gradients():
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 9, 4, 8)), jnp.float32) for _ in range(3))
  mask = np.ones((2, 4, 9, 9), bool)
  mask[0, :, 2] = False  # query 2 of example 0 sees nothing, in every head
  mask[1, 3, 4] = False  # query 4 of example 1 sees nothing in head 3 only
  lengths = jnp.array([9, 0], jnp.int32)  # example 1: no keys at all

  def loss(q, k, v):
    out = _blockwise(q, k, v, mask=jnp.asarray(mask), key_value_seq_lengths=lengths)
    return jnp.sum(out**2), out

  (_, out), (dq, dk, dv) = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))(q, k, v)
  assert np.all(np.asarray(out[0, 2]) == 0) and np.all(np.asarray(out[1]) == 0)
  for g in (dq, dk, dv):
    assert np.all(np.isfinite(np.asarray(g)))
  assert np.all(np.asarray(dq[0, 2]) == 0) and np.all(np.asarray(dq[1]) == 0)
  assert np.all(np.asarray(dk[1]) == 0) and np.all(np.asarray(dv[1]) == 0)
  assert np.any(np.asarray(out[0, 3]) != 0)  # a live row stays live


@pytest.mark.parametrize("kwargs", [{"is_causal": True}, {"local_window_size": (2, 0)}],
                         ids=["causal", "window"])
def test_causality_gradient_wrt_future_keys_and_values_is_exactly_zero(kwargs):
  rng = np.random.default_rng(4)
  t = 10
  q, k, v = (jnp.asarray(rng.normal(size=(1, t, 2, 4)), jnp.float32) for _ in range(3))
  jac_k, jac_v = jax.jit(jax.jacrev(lambda k, v: _blockwise(q, k, v, **kwargs),
                                    argnums=(0, 1)))(k, v)
  i, j = np_reference.positions(t, t)
  for jac in (jac_k, jac_v):
    per_pair = np.abs(np.asarray(jac)).sum(axis=(0, 2, 3, 4, 6, 7))  # [T, S]
    assert np.all(per_pair[j > i] == 0.0)
  # The test can fail: each output does depend on its own position's value.
  assert np.all(np.abs(np.asarray(jac_v)).sum(axis=(0, 2, 3, 4, 6, 7))[i == j] > 0.0)


@pytest.mark.parametrize("argument", ["return_weights", "dropout_rate"])
def test_explicit_blockwise_rejects_what_it_cannot_do_and_auto_falls_back(argument):
  q = jnp.zeros((1, 8, 2, 4))
  kwargs = ({"return_weights": True} if argument == "return_weights"
            else {"dropout_rate": 0.1, "dropout_rng": jax.random.key(0)})
  with pytest.raises(ValueError, match=f"'blockwise' cannot run.*{argument}"):
    dot_product_attention(q, q, q, implementation="blockwise", **kwargs)
  big = jax.ShapeDtypeStruct((1, 4096, 2, 4), jnp.float32)  # auto picks blockwise here...
  jaxpr = str(jax.make_jaxpr(functools.partial(dot_product_attention, **kwargs))(big, big, big))
  assert "while" not in jaxpr  # ...but not when it cannot run these arguments


@pytest.mark.parametrize("length, picks_blockwise", [(256, False), (1024, True)])
def test_auto_picks_blockwise_on_cpu_from_a_size_on(length, picks_blockwise):
  x = jax.ShapeDtypeStruct((1, length, 2, 8), jnp.float32)
  jaxpr = str(jax.make_jaxpr(functools.partial(dot_product_attention, is_causal=True))(x, x, x))
  assert ("while" in jaxpr) == picks_blockwise


def _temp_bytes(implementation: str, length: int, backward: bool) -> int:
  """XLA's temporary memory for one compiled call (B=1, N=4, H=64, causal); nothing runs."""

  def fn(q, k, v):
    return dot_product_attention(q, k, v, is_causal=True, implementation=implementation)

  if backward:
    fn = jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v) ** 2), argnums=(0, 1, 2))
  x = jax.ShapeDtypeStruct((1, length, 4, 64), jnp.float32)
  return jax.jit(fn).lower(x, x, x).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_memory_is_linear_in_length_and_far_below_the_xla_path(backward):
  blockwise = {t: _temp_bytes("blockwise", t, backward) for t in (4096, 8192, 16384)}
  xla = _temp_bytes("xla", 8192, backward)
  assert blockwise[8192] <= xla / 8, (blockwise, xla)
  assert blockwise[16384] <= 5 * blockwise[4096], blockwise


def test_prefix_with_is_causal_means_the_same_as_on_the_xla_path():
  """A prefix-LM mask replaces the causal one (masks.make_attention_mask), on every path."""
  rng = np.random.default_rng(9)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 12, 2, 8)), jnp.float32) for _ in range(3))
  kwargs = dict(is_causal=True, prefix_lengths=jnp.array([9, 2], jnp.int32))
  expected = dot_product_attention(q, k, v, implementation="xla", **kwargs)
  out = blockwise_attention(q, k, v, block_q=4, block_kv=4, **kwargs)
  np.testing.assert_allclose(out, expected, atol=1e-6)
