"""ModelConfig: every switch a researcher ablates, typed, frozen and validated.

The ConfigDict world (experiments, sweeps, `--config.model.x=v`) stops here:
`ModelConfig.from_config(config.model)` checks every field and the models only see this
dataclass. Each switch names the paper it comes from in the README's variant table.
"""

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import ml_collections
from flax.core import FrozenDict
from ml_collections import config_dict

from attn.errors import ConfigError, check_choice
from attn.layers import registry
from attn.layers.feedforward import FFN_KINDS
from attn.layers.norms import NORMS
from attn.ops.dispatch import IMPLEMENTATIONS

KINDS = registry.KINDS
POSITIONS = ("sinusoidal", "learned", "rope", "alibi", "t5", "none")
VIT_POSITIONS = ("sinusoidal", "learned", "none")
NORM_PLACEMENTS = ("pre", "post", "sandwich")
# Token embedding inits: 'normal' is N(0, 1); 'scaled' is N(0, 1/d_model), flax's nn.Embed default.
EMBED_INITS = ("normal", "scaled")
POOLINGS = ("cls", "mean", "attention")
REMAT_POLICIES = ("none", "full", "dots")
DTYPES = ("float32", "bfloat16", "float16")
# Fields removed in favour of one spelling: old name -> (mechanism, its option).
RENAMED = {"local_window": ("local", "window"), "attention_chunk": ("chunked", "chunk_size")}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """All model switches. Sizes: D = d_model, N = num_heads, K = num_kv_heads, H = head_dim."""

  kind: str = "lm"
  vocab_size: int = 259
  d_model: int = 128
  num_layers: int = 2
  num_decoder_layers: int | None = None  # encoder_decoder: decoder depth (None = num_layers)
  num_heads: int = 4
  num_kv_heads: int | None = None  # None = num_heads (MHA); 1 = MQA; in between = GQA
  head_dim: int | None = None  # None = d_model // num_heads
  mlp_dim: int = 512
  max_len: int = 512  # longest sequence (learned positions, KV cache size)
  attention: str = "softmax"  # self-attention mechanism, a name in attn.layers.registry
  # The mechanism's options (its module's fields), e.g. {"window": 64} for attention='local'.
  attention_options: Mapping[str, Any] = dataclasses.field(default_factory=FrozenDict)
  # Hybrid stacks: mechanisms repeated over the layers (each stack's depth a multiple of its
  # length), e.g. ('gated_deltanet', 'gated_deltanet', 'gated_deltanet', 'gated') as in
  # Qwen3-Next; empty = `attention` in every layer. Options go to the mechanisms that have them.
  attention_pattern: tuple[str, ...] = ()
  # encoder_decoder: the decoder's cross-attention mechanism, a registry name whose entry has
  # `cross_attention` (its options at their defaults, unless it is also a self-attention one).
  cross_attention: str = "softmax"
  attention_impl: str | None = None  # 'xla', 'cudnn', ... or None = best available
  position: str = "sinusoidal"
  rope_base: float = 10_000.0
  rope_fraction: float = 1.0
  t5_num_buckets: int = 32
  t5_max_distance: int = 128
  norm: str = "layernorm"
  norm_placement: str = "pre"
  norm_epsilon: float = 1e-6
  ffn: str = "gelu"
  use_bias: bool = True
  dropout_rate: float = 0.0  # embeddings and residual branches
  attention_dropout_rate: float = 0.0  # attention weights
  qk_norm: bool = False
  softcap: float | None = None
  dtype: str = "float32"  # computation dtype; softmax, norms statistics and logits stay float32
  param_dtype: str = "float32"
  tie_embeddings: bool = True
  # Token embedding init: 'normal' N(0, 1) (tied logits scaled by 1/sqrt(d_model)) or 'scaled'
  # N(0, 1/d_model) (flax's nn.Embed default; tied logits unscaled). See EMBED_INITS.
  embed_init: str = "normal"
  scan_layers: bool = False
  remat: str = "none"
  num_classes: int = 2  # classifier / vit
  pooling: str = "cls"  # classifier / vit
  image_size: int = 8  # vit: square images
  patch_size: int = 2
  channels: int = 1

  def __post_init__(self) -> None:
    _check_choice("kind", self.kind, KINDS)
    # Frozen (hashable: the model is a static jit argument) and checked against the module.
    self._check_attention()
    _check_choice("position", self.position, VIT_POSITIONS if self.kind == "vit" else POSITIONS)
    _check_choice("norm", self.norm, tuple(NORMS))
    _check_choice("embed_init", self.embed_init, EMBED_INITS)
    _check_choice("norm_placement", self.norm_placement, NORM_PLACEMENTS)
    _check_choice("ffn", self.ffn, tuple(FFN_KINDS))
    _check_choice("pooling", self.pooling, POOLINGS)
    _check_choice("remat", self.remat, REMAT_POLICIES)
    _check_choice("dtype", self.dtype, DTYPES)
    _check_choice("param_dtype", self.param_dtype, DTYPES)
    if self.attention_impl is not None:
      _check_choice("attention_impl", self.attention_impl, IMPLEMENTATIONS)
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "mlp_dim", "max_len",
                 "num_classes", "image_size", "patch_size", "channels", "t5_num_buckets",
                 "t5_max_distance"):
      _check_positive(name, getattr(self, name))
    for name in ("num_decoder_layers", "num_kv_heads", "head_dim", "softcap"):
      if getattr(self, name) is not None:
        _check_positive(name, getattr(self, name))
    for name in ("dropout_rate", "attention_dropout_rate"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f"model.{name} must be in [0, 1), got {getattr(self, name)}.")
    if self.head_dim is None and self.d_model % self.num_heads:
      raise ValueError(
          f"model.d_model ({self.d_model}) must be divisible by model.num_heads "
          f"({self.num_heads}), or set model.head_dim explicitly.")
    if self.num_heads % self.kv_heads:
      raise ValueError(
          f"model.num_heads ({self.num_heads}) must be divisible by model.num_kv_heads "
          f"({self.num_kv_heads}); divisors: "
          f"{[d for d in range(1, self.num_heads + 1) if self.num_heads % d == 0]}.")
    if self.position == "rope":
      rotated = self.rope_fraction * self.head_size
      if not 0.0 < self.rope_fraction <= 1.0 or rotated != int(rotated) or int(rotated) % 2:
        raise ValueError(
            f"model.rope_fraction ({self.rope_fraction}) x head size ({self.head_size}) must "
            f"be a positive even integer <= the head size.")
    if self.kind == "vit" and self.image_size % self.patch_size:
      raise ValueError(f"model.image_size ({self.image_size}) must be divisible by "
                       f"model.patch_size ({self.patch_size}).")

  def _check_attention(self) -> None:
    """The mechanism(s) exist, fit the kind and the depth; the options fit them (frozen)."""
    self._check_cross_attention()
    pattern = self.attention_pattern
    # The command line's `--config.model.attention_pattern=a,a,a,b` arrives as ('a,a,a,b',).
    pattern = tuple(name.strip() for item in ((pattern,) if isinstance(pattern, str) else pattern)
                    for name in item.split(",") if name.strip())
    object.__setattr__(self, "attention_pattern", pattern)
    if not pattern:
      object.__setattr__(self, "attention_options", FrozenDict(
          registry.check_options(self.attention, self.attention_options)))
      registry.check_model(self.attention, self.kind)
      registry.check_layer_config(self.attention, self)
      return
    if self.attention != "softmax":
      raise ConfigError(
          f"model.attention={self.attention!r} and model.attention_pattern={list(pattern)} are "
          f"both set; the pattern names every layer's mechanism: leave model.attention unset.")
    for name in pattern:
      registry.get(name, "model.attention_pattern")
      registry.check_model(name, self.kind)
    depths = {"model.num_layers": self.num_layers}
    if self.kind == "encoder_decoder":
      depths["model.num_decoder_layers"] = self.decoder_layers
    for field, depth in depths.items():
      if depth % len(pattern):
        raise ConfigError(
            f"{field}={depth} is not a multiple of the length of model.attention_pattern "
            f"{list(pattern)} ({len(pattern)}); the pattern repeats over the layers.")
    if self.scan_layers and len(set(pattern)) > 1:
      raise ConfigError(
          f"model.scan_layers=True needs one module for every layer, but "
          f"model.attention_pattern={list(pattern)} mixes mechanisms; set "
          f"model.scan_layers=False.")
    options = {}
    for key, value in self.attention_options.items():
      owners = [name for name in dict.fromkeys(pattern) if key in registry.get(name).options]
      if not owners:
        registry.check_options(pattern[0], {key: value})  # the error lists valid options
      for name in owners:
        options.update(registry.check_options(name, {key: value}))
    object.__setattr__(self, "attention_options", FrozenDict(options))
    for name in dict.fromkeys(pattern):
      registry.check_layer_config(name, self)

  def _check_cross_attention(self) -> None:
    """model.cross_attention: a registry mechanism with the `cross_attention` capability (keys
    from another sequence, S != T), and only where there is cross-attention."""
    entry = registry.get(self.cross_attention, "model.cross_attention")
    if self.kind != "encoder_decoder":
      if self.cross_attention != "softmax":
        raise ConfigError(
            f"model.cross_attention={self.cross_attention!r} has no effect: model.kind="
            f"{self.kind!r} has no cross-attention (only 'encoder_decoder' does); leave it "
            f"'softmax'.")
      return
    if not entry.cross_attention:
      raise ConfigError(
          f"model.cross_attention={self.cross_attention!r} cannot attend to another sequence "
          f"(its registry entry has cross_attention=False: its pattern or state assumes the "
          f"keys are the queries' own sequence); set model.cross_attention to one of "
          f"{registry.supporting('cross_attention')} (default 'softmax').")

  def layer_attention(self, layer: int) -> str:
    """The mechanism of layer `layer` (0-based) of a stack."""
    pattern = self.attention_pattern
    return pattern[layer % len(pattern)] if pattern else self.attention

  @property
  def mechanisms(self) -> tuple[str, ...]:
    """Every mechanism the model uses, once each."""
    return tuple(dict.fromkeys(self.attention_pattern or (self.attention,)))

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def head_size(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  @property
  def decoder_layers(self) -> int:
    return self.num_decoder_layers or self.num_layers

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def weights_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.param_dtype)

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict | dict[str, Any]) -> "ModelConfig":
    """Build and validate from `config.model`; unknown fields are an error naming them."""
    values = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    for old, (mechanism, option) in RENAMED.items():
      if values.get(old) is not None:
        raise ConfigError(
            f"model.{old} is gone; set model.attention={mechanism!r} and "
            f"model.attention_options.{option}={values[old]!r} instead.")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ConfigError(f"Unknown model config field(s) {unknown}; known fields: {sorted(known)}.")
    if isinstance(values.get("attention_pattern"), list):
      values["attention_pattern"] = tuple(values["attention_pattern"])
    # Unset command-line slots (None) are not options: the mechanism's default applies.
    options = values.get("attention_options") or {}
    values["attention_options"] = {k: v for k, v in dict(options).items() if v is not None}
    return cls(**values)


def default_config() -> ml_collections.ConfigDict:
  """`config.model` with every field at its default; optional fields are typed placeholders
  so that `--config.model.num_kv_heads=2` works on the command line."""
  hints = typing.get_type_hints(ModelConfig)
  config = ml_collections.ConfigDict()
  for field in dataclasses.fields(ModelConfig):
    if field.name == "attention_options":
      # One typed slot per option name of every mechanism: `--config.model.attention_options.
      # window=64` and sweeps over `model.attention_options.window` work on a locked config.
      config[field.name] = ml_collections.ConfigDict(
          {k: config_dict.placeholder(t) for k, t in registry.option_slots().items()})
    elif field.default is None:
      inner = [t for t in typing.get_args(hints[field.name]) if t is not type(None)][0]
      config[field.name] = config_dict.placeholder(inner)
    else:
      config[field.name] = field.default
  return config


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
  check_choice(f"model.{name}", value, allowed)


def _check_positive(name: str, value: Any) -> None:
  if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
    raise ValueError(f"model.{name} must be a positive number, got {value!r}.")
