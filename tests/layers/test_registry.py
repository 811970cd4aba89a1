"""The mechanism registry: entries, options, and the two hooks (layer level, recurrent decoding)
exercised with temporary test mechanisms through the real layer and model."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from attn import decode
from attn.errors import ConfigError
from attn.layers import MultiHeadAttention, registry
from attn.models import ModelConfig, build
from tests.test_decode import _naive_greedy

SMALL = dict(vocab_size=30, d_model=16, num_heads=2, mlp_dim=32, max_len=16, num_layers=2)


def test_every_entry_names_a_paper_and_consistent_capabilities():
  table = registry.mechanisms()
  assert "softmax" in table and len(table) >= 11
  for name, entry in table.items():
    assert entry.name == name and entry.paper and entry.summary, name
    assert entry.kinds, f"{name} supports no model kind"
    assert entry.decoding is None or entry.causal, f"{name} decodes without a causal form"
    assert entry.padding or not entry.packed, name  # packing implies padding (segment 0)
    for option, (_, default) in entry.options.items():  # defaults pass their own check
      assert registry.check_options(name, {option: default}) == {option: default}


def test_option_slots_cover_every_option_with_one_type():
  slots = registry.option_slots()
  for entry in registry.mechanisms().values():
    assert set(entry.options) <= set(slots) | {"sigmoid_bias"} or entry.level == "layer"
  assert slots["window"] is int and slots["init_temperature"] is float


@pytest.mark.parametrize("name, kind, match", [
    ("linformer", "lm", r"lacks a causal form"),
    ("linformer", "encoder_decoder", r"lacks a causal form"),
    ("chunked", "vit", r"lacks a bidirectional form"),
    ("chunked", "classifier", r"lacks a bidirectional form"),
])
def test_unsupported_kinds_are_config_errors_naming_the_fix(name, kind, match):
  with pytest.raises(ConfigError, match=rf"model.attention='{name}' cannot be used in "
                                        rf"model.kind='{kind}': it {match}.*pick a mechanism"):
    ModelConfig(attention=name, kind=kind)


class _RunningMean(nn.Module):
  """A test-only recurrent core: out_t = mean(v_1..v_t) (causal), state in 'cache'."""

  decode: bool = False

  @nn.compact
  def __call__(self, query, key, value, **kwargs):
    del query, key
    assert kwargs.get("is_causal"), "recurrent cores are called causal"
    sums = jnp.cumsum(value.astype(jnp.float32), axis=1)
    if not self.decode:
      return sums / jnp.arange(1, value.shape[1] + 1)[None, :, None, None]
    initialized = self.has_variable("cache", "sum")
    total = self.variable("cache", "sum", jnp.zeros, value.shape[:1] + value.shape[2:])
    count = self.variable("cache", "count", lambda: jnp.zeros((), jnp.int32))
    if not initialized:
      return sums / jnp.arange(1, value.shape[1] + 1)[None, :, None, None]
    out = (total.value[:, None] + sums) / (
        count.value + jnp.arange(1, value.shape[1] + 1))[None, :, None, None]
    total.value = total.value + sums[:, -1]
    count.value = count.value + value.shape[1]
    return out


class _GatedLayer(MultiHeadAttention):
  """A test-only layer-level mechanism: softmax attention times a sigmoid gate of the input."""

  gate_bias: float = 0.0

  @nn.compact
  def __call__(self, inputs_q, inputs_kv=None, **kwargs):
    out = super().__call__(inputs_q, inputs_kv, **kwargs)
    gate = nn.Dense(out.shape[-1], name="gate",
                    bias_init=nn.initializers.constant(self.gate_bias))(inputs_q)
    return out * jax.nn.sigmoid(gate)


@pytest.fixture
def test_mechanisms():
  registry.register(name="test_recurrent", paper="test", summary="running mean",
                    bidirectional=False, decoding="recurrent")(_RunningMean)
  registry.register(name="test_gated", paper="test", summary="gated softmax", level="layer",
                    decoding="kv_cache", weights=True)(_GatedLayer)
  yield
  registry.unregister("test_recurrent")
  registry.unregister("test_gated")


def test_a_recurrent_core_gets_decode_and_keeps_the_only_cache(test_mechanisms):
  model = build(ModelConfig(attention="test_recurrent", **SMALL))
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, 30, size=(2, 10)), jnp.int32)
  params = model.init(jax.random.key(0), tokens)["params"]
  cache = model.clone(decode=True).init(jax.random.key(0), jnp.zeros((2, 16), jnp.int32))["cache"]
  layer_cache = meta.unbox(cache)["decoder"]["layer_0"]["self_attention"]
  assert set(layer_cache) == {"test_recurrent"}  # no cached_key / cached_value of its own
  assert set(layer_cache["test_recurrent"]) == {"sum", "count"}
  out = decode.generate(model, params, tokens[:, :4], max_new_tokens=6)
  np.testing.assert_array_equal(out, _naive_greedy(model, params, tokens[:, :4], 6))


def test_a_layer_level_mechanism_replaces_the_attention_layer(test_mechanisms):
  config = ModelConfig(attention="test_gated", attention_options={"gate_bias": 3.0}, **SMALL)
  with pytest.raises(ConfigError, match=r"num_heads is not an option.*gate_bias=0.0"):
    registry.check_options("test_gated", {"num_heads": 3})
  model = build(config)
  tokens = jnp.asarray(np.random.default_rng(1).integers(3, 30, size=(2, 8)), jnp.int32)
  params = meta.unbox(model.init(jax.random.key(0), tokens)["params"])
  attention = params["decoder"]["layer_0"]["self_attention"]
  assert set(attention) == {"query", "key", "value", "out", "gate"}
  np.testing.assert_allclose(attention["gate"]["bias"], 3.0)
  # The gate changes the output: equal to the softmax model with the gate's factor applied.
  softmax = build(ModelConfig(**SMALL))
  assert not np.allclose(model.apply({"params": params}, tokens),
                         softmax.apply({"params": params}, tokens))
  out = decode.generate(model, params, tokens[:, :3], max_new_tokens=4)
  np.testing.assert_array_equal(out, _naive_greedy(model, params, tokens[:, :3], 4))


def test_decode_and_maps_follow_the_registry():
  x = jnp.ones((1, 4, 8))
  with pytest.raises(ConfigError, match=r"attention='bigbird' cannot decode.*'softmax'"):
    MultiHeadAttention(num_heads=2, attention="bigbird", decode=True).init(jax.random.key(0), x)
  with pytest.raises(ConfigError, match=r"record_weights: attention='sigmoid' has no attention"):
    MultiHeadAttention(num_heads=2, attention="sigmoid", record_weights=True).init(
        jax.random.key(0), x)
  with pytest.raises(ConfigError, match=r"model.attention='bigbird' cannot decode"):
    model = build(ModelConfig(attention="bigbird", **SMALL))
    decode.generate(model, {}, jnp.ones((1, 2), jnp.int32), max_new_tokens=2)


def test_readme_mechanism_table_is_the_registry():
  with open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md")) as f:
    readme = f.read()
  start = readme.index("| `attention` | what | paper |")
  table = readme[start:].split("\n\n")[0].splitlines()[2:]
  assert table == registry.readme_rows()
