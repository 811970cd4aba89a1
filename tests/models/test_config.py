"""ModelConfig validation: every bad value names the field and the allowed values."""

import dataclasses

import pytest

from attn.errors import ConfigError
from attn.models import ModelConfig, default_config


def test_default_config_round_trips_to_the_dataclass_defaults():
  assert ModelConfig.from_config(default_config()) == ModelConfig()


def test_optional_fields_accept_overrides_of_their_type():
  config = default_config()
  config.num_kv_heads = 2
  config.softcap = 30.0
  assert ModelConfig.from_config(config).kv_heads == 2


@pytest.mark.parametrize("overrides, match", [
    (dict(d_model=130, num_heads=4), r"model.d_model \(130\) must be divisible by model.num_heads"),
    (dict(num_heads=4, num_kv_heads=3), r"model.num_heads \(4\) must be divisible by model.num_kv"),
    (dict(attention="flash"), r"model.attention='flash' is unknown; choose one of \['bigbird', "),
    (dict(kind="gpt"), r"model.kind='gpt' is not one of \['lm', 'encoder_decoder'"),
    (dict(position="xpos"), r"model.position='xpos' is not one of \['sinusoidal'"),
    (dict(kind="vit", position="rope"), r"model.position='rope' is not one of \['sinusoidal', 'l"),
    (dict(norm="groupnorm"), r"model.norm='groupnorm' is not one of \['layernorm'"),
    (dict(norm_placement="middle"), r"model.norm_placement='middle'.*\['pre', 'post', 'sandw"),
    (dict(ffn="mish"), r"model.ffn='mish' is not one of"),
    (dict(attention_impl="flash"), r"model.attention_impl='flash' is not one of \['xla'"),
    (dict(remat="some"), r"model.remat='some'"),
    (dict(dtype="float64"), r"model.dtype='float64'"),
    (dict(num_layers=0), r"model.num_layers must be a positive number, got 0"),
    (dict(dropout_rate=1.0), r"model.dropout_rate must be in \[0, 1\)"),
    (dict(position="rope", rope_fraction=0.3), r"model.rope_fraction \(0.3\) x head size \(32\)"),
    (dict(kind="vit", image_size=9, patch_size=2), r"model.image_size \(9\) must be divisible"),
    (dict(kind="classifier", attention="chunked"),
     r"model.attention='chunked' cannot be used in model.kind='classifier': it lacks a "
     r"bidirectional form"),
    (dict(attention="linformer"), r"model.attention='linformer' cannot be used in "
     r"model.kind='lm': it lacks a causal form.*kind in \['classifier', 'vit'\]"),
    (dict(attention="local", attention_options={"widow": 3}),
     r"model.attention_options.widow is not an option of model.attention='local'; its options "
     r"\(with defaults\): window=128"),
    (dict(kind="encoder_decoder", cross_attention="local"),
     r"model.cross_attention='local' cannot attend to another sequence \(its registry entry has "
     r"cross_attention=False.*set model.cross_attention to one of \['softmax', 'bigbird'"),
    (dict(kind="encoder_decoder", cross_attention="flash"),
     r"model.cross_attention='flash' is unknown; choose one of"),
    (dict(kind="lm", cross_attention="cosine"),
     r"model.cross_attention='cosine' has no effect: model.kind='lm' has no cross-attention"),
    (dict(attention="performer", attention_options={"num_features": 2.5}),
     r"model.attention_options.num_features=2.5 does not fit model.attention='performer': "
     r"expected int \(default 256\)"),
])
def test_bad_values_raise_errors_naming_the_field(overrides, match):
  with pytest.raises(ValueError, match=match):
    ModelConfig(**overrides)


def test_attention_options_are_set_from_a_locked_config_and_frozen():
  config = default_config()
  config.lock()
  config.attention = "local"
  config.attention_options.window = 64
  model = ModelConfig.from_config(config)
  assert dict(model.attention_options) == {"window": 64}
  assert hash(model) == hash(ModelConfig(attention="local", attention_options={"window": 64}))
  # Lists (JSON, YAML) become tuples, so the config stays hashable.
  pair = ModelConfig(attention="local", attention_options={"window": [4, 0]})
  assert pair.attention_options["window"] == (4, 0)


@pytest.mark.parametrize("old, new", [("local_window", r"attention='local' and model."
                                                       r"attention_options.window=8"),
                                      ("attention_chunk", r"attention='chunked' and model."
                                                          r"attention_options.chunk_size=8")])
def test_removed_fields_name_the_new_spelling(old, new):
  with pytest.raises(ConfigError, match=rf"model.{old} is gone; set model.{new} instead"):
    ModelConfig.from_config(default_config().to_dict() | {old: 8})


def test_unknown_fields_are_listed():
  config = default_config().to_dict() | {"n_layers": 3}
  with pytest.raises(ValueError, match=r"Unknown model config field\(s\) \['n_layers'\]"):
    ModelConfig.from_config(config)


def test_config_is_frozen_and_hashable():
  config = ModelConfig()
  with pytest.raises(dataclasses.FrozenInstanceError):
    config.d_model = 3  # type: ignore[misc]
  assert hash(config) == hash(ModelConfig())


def test_attention_options_are_sweep_axes():
  from attn import train
  from launch import grid

  points = grid.grid({"model.attention_options.window": [16, 64]})
  grid.check_points(points, train.default_config())  # a config field, so a valid sweep axis
