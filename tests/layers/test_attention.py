"""MultiHeadAttention against flax's layer, a NumPy composition, and its own KV cache."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from attn.layers import MultiHeadAttention
from attn.ops import reference
from tests import np_reference

B, T, D = 2, 10, 32


def _x(seed: int, shape=(B, T, D)) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_matches_flax_multi_head_dot_product_attention_with_same_weights(cross):
  x, kv = _x(0), _x(1, (B, 7, D)) if cross else None
  kv_len = 7 if cross else T
  mask = jnp.asarray(np.random.default_rng(2).random((B, 1, T, kv_len)) < 0.7).at[..., 0].set(True)
  ours = MultiHeadAttention(num_heads=4)
  params = meta.unbox(ours.init(jax.random.key(0), x, kv, mask=mask))
  theirs = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=D, out_features=D)
  their_params = theirs.init(jax.random.key(1), x, kv, mask=mask)
  assert jax.tree.structure(their_params) == jax.tree.structure(params)
  expected = theirs.apply(params, x, kv, mask=mask)
  np.testing.assert_allclose(ours.apply(params, x, kv, mask=mask), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_matches_numpy_projections_and_attention(num_kv_heads):
  x = _x(3)
  layer = MultiHeadAttention(num_heads=4, num_kv_heads=num_kv_heads, head_dim=6, use_bias=True,
                             bias_init=nn.initializers.normal(0.1))
  p = meta.unbox(layer.init(jax.random.key(0), x, is_causal=True))["params"]
  out = layer.apply({"params": p}, x, is_causal=True)

  xn = np.asarray(x, np.float64)
  def proj(name):
    return np.einsum("btd,dnh->btnh", xn, p[name]["kernel"]) + np.asarray(p[name]["bias"])
  i, j = np_reference.positions(T, T)
  heads, _ = np_reference.attention(proj("query"), proj("key"), proj("value"), mask=j <= i)
  expected = np.einsum("btnh,nhd->btd", heads, p["out"]["kernel"]) + np.asarray(p["out"]["bias"])
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)
  assert p["key"]["kernel"].shape == (D, num_kv_heads, 6)


def test_parameters_carry_logical_axis_names():
  variables = MultiHeadAttention(num_heads=4, num_kv_heads=2, qk_norm=True).init(
      jax.random.key(0), _x(0))
  names = {"/".join(k.key for k in path): leaf.names
           for path, leaf in jax.tree_util.tree_flatten_with_path(
               variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]}
  assert names["query/kernel"] == ("embed", "heads", "head_dim")
  assert names["key/kernel"] == ("embed", "kv_heads", "head_dim")
  assert names["out/kernel"] == ("heads", "head_dim", "embed")
  assert names["out/bias"] == ("embed",)
  assert names["query_norm/scale"] == ("head_dim",)


DECODE_CASES = {
    "mha": dict(num_heads=4),
    "gqa_rope": dict(num_heads=4, num_kv_heads=2, rope_base=10_000.0),
    "mqa_qknorm_softcap": dict(num_heads=4, num_kv_heads=1, qk_norm=True, softcap=5.0),
    "partial_rope": dict(num_heads=2, rope_base=500.0, rope_fraction=0.5),
}


@pytest.mark.parametrize("window", [None, (3, 0)], ids=["full", "window"])
@pytest.mark.parametrize("name", list(DECODE_CASES))
def test_kv_cache_decoding_equals_the_full_causal_forward(name, window):
  layer = MultiHeadAttention(**DECODE_CASES[name])
  x = _x(4)
  extra = {} if window is None else {"local_window_size": window}
  params = layer.init(jax.random.key(0), x)["params"]
  full = layer.apply({"params": params}, x, is_causal=True, **extra)

  decoder = MultiHeadAttention(**DECODE_CASES[name], decode=True)
  cache = decoder.init(jax.random.key(0), x)["cache"]
  outputs, prefill = [], 4  # a 4-token prompt in one call, then one token at a time
  chunks = [(0, prefill)] + [(t, t + 1) for t in range(prefill, T)]
  for start, stop in chunks:
    out, state = decoder.apply({"params": params, "cache": cache}, x[:, start:stop],
                               is_causal=True, mutable=["cache"], **extra)
    cache = state["cache"]
    outputs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outputs, axis=1), full, atol=2e-5, rtol=2e-5)
  assert int(cache["cache_index"]) == T


def test_decoding_a_prefix_lm_prompt_in_chunks_never_reads_unwritten_slots():
  layer = MultiHeadAttention(num_heads=2)
  x, prefix = _x(5), jnp.array([6, 6], jnp.int32)
  params = layer.init(jax.random.key(0), x)["params"]
  full = layer.apply({"params": params}, x, prefix_lengths=prefix)
  decoder = MultiHeadAttention(num_heads=2, decode=True)
  cache = decoder.init(jax.random.key(0), x)["cache"]
  outputs = []
  for start, stop in [(0, 6)] + [(t, t + 1) for t in range(6, T)]:
    out, state = decoder.apply({"params": params, "cache": cache}, x[:, start:stop],
                               prefix_lengths=prefix, mutable=["cache"])
    cache = state["cache"]
    outputs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outputs, axis=1), full, atol=2e-5, rtol=2e-5)


def test_rope_attention_depends_only_on_relative_positions():
  layer = MultiHeadAttention(num_heads=4, rope_base=10_000.0)
  x = _x(6)
  params = layer.init(jax.random.key(0), x)
  positions = jnp.broadcast_to(jnp.arange(T), (B, T))
  base = layer.apply(params, x, q_positions=positions, is_causal=True)
  shifted = layer.apply(params, x, q_positions=positions + 37, is_causal=True)
  np.testing.assert_allclose(shifted, base, atol=2e-5)
  without = MultiHeadAttention(num_heads=4).apply(params, x, is_causal=True)
  assert not np.allclose(base, without, atol=1e-3)  # RoPE did change something


def test_recorded_weights_match_the_reference_on_the_projected_inputs():
  layer = MultiHeadAttention(num_heads=4, num_kv_heads=2, record_weights=True)
  x = _x(7)
  params = layer.init(jax.random.key(0), x, is_causal=True)["params"]
  _, state = layer.apply({"params": params}, x, is_causal=True, mutable=["intermediates"])
  (weights,) = state["intermediates"]["attention_weights"]
  p = meta.unbox(params)
  q, k, v = (jnp.einsum("btd,dnh->btnh", x, p[n]["kernel"]) + p[n]["bias"][None, None]
             for n in ("query", "key", "value"))
  _, expected = reference.attention(q, k, v, is_causal=True, return_weights=True)
  assert weights.shape == (B, 4, T, T)
  np.testing.assert_allclose(weights, expected, atol=1e-6)
  np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
  assert np.all(np.triu(np.asarray(weights), k=1) == 0)


def test_dropout_only_in_training_and_driven_by_the_dropout_rng():
  layer = MultiHeadAttention(num_heads=4, dropout_rate=0.3)
  x = _x(8)
  params = layer.init(jax.random.key(0), x)
  eval_out = layer.apply(params, x)
  np.testing.assert_array_equal(eval_out, MultiHeadAttention(num_heads=4).apply(params, x))
  train = [layer.apply(params, x, deterministic=False, rngs={"dropout": jax.random.key(s)})
           for s in (0, 0, 1)]
  np.testing.assert_array_equal(train[0], train[1])
  assert not np.allclose(train[0], train[2]) and not np.allclose(train[0], eval_out)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_heads=5), r"features 32 must be divisible by num_heads 5"),
    (dict(num_heads=4, num_kv_heads=3), r"num_heads \(4\) must be a multiple of num_kv_heads"),
])
def test_bad_configuration_raises_value_error(kwargs, match):
  with pytest.raises(ValueError, match=match):
    MultiHeadAttention(**kwargs).init(jax.random.key(0), _x(0))


def test_packed_sequences_are_rejected_with_a_kv_cache():
  decoder = MultiHeadAttention(num_heads=2, decode=True)
  x = _x(0)
  variables = decoder.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="segment_ids"):
    decoder.apply(variables, x[:, :1], segment_ids=jnp.ones((B, 1), jnp.int32), mutable=["cache"])
