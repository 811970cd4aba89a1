"""Every core mechanism in the registry, selected by name in MultiHeadAttention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from attn.layers import MultiHeadAttention, registry

B, T, D = 2, 12, 16
# Small options so the tiny inputs still cross blocks, chunks and windows.
OPTIONS = {
    "local": {"window": (3, 0)},
    "chunked": {"chunk_size": 4},
    "bigbird": {"block_size": 4, "num_random_blocks": 1},
    "longformer": {"window": 2},
    "linear": {"chunk_size": 5},
    "performer": {"num_features": 16, "chunk_size": 5},
    "linformer": {"projected_length": 4, "max_length": 16},
}
# Mechanism-specific parameters, beside the four projections.
OWN_PARAMS = {"linformer": {"key_projection"}, "cosine": {"log_inverse_temperature"},
              "sinks": {"sink_logits"}}
CORES = [n for n, m in registry.mechanisms().items() if m.level == "core"]


def _x(seed: int = 0) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).normal(size=(B, T, D)), jnp.float32)


@pytest.mark.parametrize("name", CORES)
def test_every_mechanism_runs_by_name_with_finite_outputs_and_gradients(name):
  layer = MultiHeadAttention(num_heads=4, num_kv_heads=2, attention=name,
                             attention_options=OPTIONS.get(name))
  kwargs = {"is_causal": True} if registry.get(name).causal else {}
  x = _x()
  params = meta.unbox(jax.jit(lambda x: layer.init(jax.random.key(0), x, **kwargs))(x))["params"]
  assert set(params) == {"query", "key", "value", "out"} | ({name} if name in OWN_PARAMS else set())
  assert set(params.get(name, {})) == OWN_PARAMS.get(name, set())

  @jax.jit
  def loss(params, x):
    out = layer.apply({"params": params}, x, **kwargs)
    return jnp.sum(out**2), out

  (_, out), grads = jax.value_and_grad(loss, has_aux=True)(params, x)
  assert out.shape == (B, T, D)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
  if name in OWN_PARAMS:  # the mechanism's own parameters do learn
    assert any(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(grads[name]))


def test_mask_based_mechanisms_equal_softmax_with_the_same_mask_keywords():
  x = _x(1)
  softmax = MultiHeadAttention(num_heads=4)
  params = softmax.init(jax.random.key(0), x)
  local = MultiHeadAttention(num_heads=4, attention="local",
                             attention_options={"window": (3, 0)})
  np.testing.assert_allclose(local.apply(params, x, is_causal=True),
                             softmax.apply(params, x, is_causal=True, local_window_size=(3, 0)),
                             atol=1e-6)
  chunked = MultiHeadAttention(num_heads=4, attention="chunked",
                               attention_options={"chunk_size": 4})
  np.testing.assert_allclose(chunked.apply(params, x),
                             softmax.apply(params, x, chunk_size=4), atol=1e-6)


def test_performer_features_are_fixed_by_default_and_redrawn_by_a_features_rng():
  layer = MultiHeadAttention(num_heads=4, attention="performer",
                             attention_options={"num_features": 8})
  x = _x(2)
  params = jax.jit(layer.init)(jax.random.key(0), x)
  apply = jax.jit(layer.apply)
  a, b = apply(params, x), apply(params, x)
  np.testing.assert_array_equal(a, b)
  redrawn = [apply(params, x, rngs={"features": jax.random.key(s)}) for s in (1, 1, 2)]
  np.testing.assert_array_equal(redrawn[0], redrawn[1])
  assert not np.allclose(redrawn[0], redrawn[2]) and not np.allclose(redrawn[0], a)


def test_unknown_name_lists_the_valid_ones():
  with pytest.raises(ValueError, match=r"attention='flash' is unknown; choose one of \[.*"
                                       r"'linear'.*'performer'.*'softmax'"):
    MultiHeadAttention(num_heads=4, attention="flash").init(jax.random.key(0), _x())


@pytest.mark.parametrize("name, kwargs, match", [
    ("linear", {"mask": jnp.ones((1, 1, T, T), bool)}, r"'linear' does not support mask"),
    ("performer", {"bias": jnp.zeros((1, 1, T, T))}, r"'performer' does not support bias"),
    ("linformer", {"is_causal": True}, r"'linformer' does not support is_causal"),
])
def test_keywords_a_mechanism_cannot_honor_are_errors(name, kwargs, match):
  layer = MultiHeadAttention(num_heads=4, attention=name, attention_options=OPTIONS.get(name))
  with pytest.raises(ValueError, match=match):
    layer.init(jax.random.key(0), _x(), **kwargs)


@pytest.mark.parametrize("layer, match", [
    (MultiHeadAttention(num_heads=4, attention="linformer",
                        attention_options={"max_length": 8}), r"max_length=8 keys, got 12"),
    (MultiHeadAttention(num_heads=4, attention="bigbird", decode=True), r"cannot decode"),
    (MultiHeadAttention(num_heads=4, attention="sinks", attention_options={"features": 3}),
     r"attention_options.features is not an option of model.attention='sinks'; its options "
     r"\(with defaults\): init_logit=0.0"),
])
def test_bad_configuration_raises_value_error(layer, match):
  with pytest.raises(ValueError, match=match):
    layer.init(jax.random.key(0), _x())


@pytest.mark.parametrize("name", [n for n in CORES if registry.get(n).decoding == "recurrent"])
def test_linear_mechanisms_on_packed_rows_equal_each_sequence_alone(name):
  """Two sequences and padding in one row give what each sequence gives alone."""
  layer = MultiHeadAttention(num_heads=4, num_kv_heads=2, attention=name,
                             attention_options=OPTIONS.get(name))
  x = _x(3)[:1]
  params = layer.init(jax.random.key(0), x, is_causal=True)
  segments = jnp.asarray([[1] * 7 + [2] * 3 + [0] * 2])
  packed = layer.apply(params, x, is_causal=True, segment_ids=segments)
  alone = [layer.apply(params, x[:, s], is_causal=True) for s in (slice(0, 7), slice(7, 10))]
  np.testing.assert_allclose(packed[:, :10], jnp.concatenate(alone, axis=1), atol=2e-5)


def test_linear_record_weights_gives_its_implicit_map():
  """The recorded map is linear attention's own (rows sum to 1, causal), not softmax's."""
  layer = MultiHeadAttention(num_heads=4, attention="linear", record_weights=True)
  x = _x(4)
  params = layer.init(jax.random.key(0), x, is_causal=True)
  _, state = layer.apply(params, x, is_causal=True, mutable=["intermediates"])
  (weights,) = state["intermediates"]["attention_weights"]
  np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
  assert np.all(np.asarray(weights)[:, :, np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]]
                == 0.0)
  softmax = MultiHeadAttention(num_heads=4, record_weights=True).apply(
      params, x, is_causal=True, mutable=["intermediates"])[1]
  assert not np.allclose(weights, softmax["intermediates"]["attention_weights"][0], atol=1e-3)
