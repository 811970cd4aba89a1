"""The models: LanguageModel, EncoderDecoder, Encoder, SequenceClassifier and ViT.

Shapes: B batch, T length, S source length, D d_model, V vocab, C classes. Token ids are int
`[B, T]`; `segment_ids` 0 marks padding (data pipeline convention); logits are float32.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn.layers import LearnedPositionEmbedding2D, SinCos2DPositionEmbedding
from attn.models.config import ModelConfig
from attn.models.transformer import TransformerStack, attention_layer

Array = jax.Array


class TokenEmbedding(nn.Module):
  """Token embedding `[V, D]`; with tied embeddings also the output projection."""

  config: ModelConfig

  def setup(self) -> None:
    # 'scaled' is flax's nn.Embed default: N(0, 1/D) (variance scaling over the fan-in D).
    stddev = 1.0 if self.config.embed_init == "normal" else self.config.d_model ** -0.5
    self.embedding = nn.Embed(
        self.config.vocab_size, self.config.d_model, dtype=self.config.compute_dtype,
        param_dtype=self.config.weights_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(stddev=stddev),
                                                    ("vocab", "embed")))

  def __call__(self, tokens: Array) -> Array:
    return self.embedding(tokens)

  def attend(self, x: Array) -> Array:
    # With N(0, 1) embeddings the tied output is scaled by 1/sqrt(D) to start with unit-scale
    # logits (flax's WMT example does the same); N(0, 1/D) embeddings give them unscaled.
    logits = self.embedding.attend(x)
    if self.config.embed_init == "normal":
      logits = logits / jnp.sqrt(jnp.asarray(x.shape[-1], x.dtype))
    return logits


def _logits(config: ModelConfig, embed: TokenEmbedding, x: Array) -> Array:
  if config.tie_embeddings:
    logits = embed.attend(x)
  else:
    logits = nn.Dense(config.vocab_size, use_bias=False, dtype=config.compute_dtype,
                      param_dtype=config.weights_dtype, name="logits",
                      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                               ("embed", "vocab")))(x)
  return nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))


def _check_decode_positions(module: nn.Module, positions: Array | None, name: str) -> None:
  """Under a KV cache the new tokens' positions cannot be inferred from their count: refuse."""
  if module.decode and positions is None and not module.is_initializing():
    raise ValueError(
        f"{type(module).__name__}(decode=True) was called without `{name}`: pass the positions "
        f"of the new tokens (their KV-cache slots, e.g. [[t]] for the t-th token); otherwise "
        f"every step would be position 0.")


class LanguageModel(nn.Module):
  """Decoder-only, causal (GPT): next-token logits `[B, T, V]`."""

  config: ModelConfig
  decode: bool = False

  @nn.compact
  def __call__(self, inputs: Array, *, segment_ids: Array | None = None,
               positions: Array | None = None, deterministic: bool = True) -> Array:
    _check_decode_positions(self, positions, "positions")
    config = self.config
    embed = TokenEmbedding(config, name="embed")
    x = TransformerStack(config, config.num_layers, causal=True, decode=self.decode,
                         name="decoder")(embed(inputs), positions=positions,
                                         segment_ids=segment_ids, deterministic=deterministic)
    return _logits(config, embed, x)


class EncoderDecoder(nn.Module):
  """The original Transformer (Vaswani et al. 2017): encoder, and a causal decoder with
  cross-attention; source and target share one embedding."""

  config: ModelConfig
  decode: bool = False

  def setup(self) -> None:
    config = self.config
    self.embed = TokenEmbedding(config)
    self.encoder = TransformerStack(config, config.num_layers, causal=False)
    self.decoder = TransformerStack(config, config.decoder_layers, causal=True,
                                    cross_attention=True, decode=self.decode)
    if not config.tie_embeddings:
      self.logits_dense = nn.Dense(
          config.vocab_size, use_bias=False, dtype=config.compute_dtype,
          param_dtype=config.weights_dtype,
          kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                   ("embed", "vocab")))

  def encode(self, inputs: Array, *, inputs_segment_ids: Array | None = None,
             inputs_positions: Array | None = None, deterministic: bool = True) -> Array:
    """Source tokens `[B, S]` -> encoded `[B, S, D]`."""
    return self.encoder(self.embed(inputs), positions=inputs_positions,
                        segment_ids=inputs_segment_ids, deterministic=deterministic)

  def decode_logits(self, encoded: Array, decoder_inputs: Array, *,
                    inputs_segment_ids: Array | None = None,
                    targets_segment_ids: Array | None = None,
                    targets_positions: Array | None = None, deterministic: bool = True) -> Array:
    """Target-side logits `[B, T, V]` given the encoded source."""
    _check_decode_positions(self, targets_positions, "targets_positions")
    x = self.decoder(self.embed(decoder_inputs), positions=targets_positions,
                     segment_ids=targets_segment_ids, encoded=encoded,
                     encoded_segment_ids=inputs_segment_ids, deterministic=deterministic)
    if self.config.tie_embeddings:
      logits = self.embed.attend(x)
    else:
      logits = self.logits_dense(x)
    return nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))

  def __call__(self, inputs: Array, decoder_inputs: Array, *,
               inputs_segment_ids: Array | None = None, inputs_positions: Array | None = None,
               targets_segment_ids: Array | None = None, targets_positions: Array | None = None,
               deterministic: bool = True) -> Array:
    encoded = self.encode(inputs, inputs_segment_ids=inputs_segment_ids,
                          inputs_positions=inputs_positions, deterministic=deterministic)
    return self.decode_logits(encoded, decoder_inputs, inputs_segment_ids=inputs_segment_ids,
                              targets_segment_ids=targets_segment_ids,
                              targets_positions=targets_positions, deterministic=deterministic)


class Pooler(nn.Module):
  """`[B, T, D]` -> `[B, D]`: the CLS token, a masked mean, or attention pooling with a
  learned probe (multihead attention pooling, as in big_vision's MAP head)."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: Array, token_mask: Array | None) -> Array:
    pooling = self.config.pooling
    if pooling == "cls":
      return x[:, 0]
    if token_mask is None:
      token_mask = jnp.ones(x.shape[:2], bool)
    if pooling == "mean":
      weights = token_mask.astype(x.dtype)[..., None]
      return jnp.sum(x * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
    probe = self.param("probe", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (None, None, "embed")), (1, 1, x.shape[-1]),
        self.config.weights_dtype)
    probe = jnp.broadcast_to(probe.astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
    pooled = attention_layer(self.config, "attention", rope=False)(
        probe, x, mask=token_mask[:, None, None, :])
    return pooled[:, 0]


def _prepend_cls(module: nn.Module, config: ModelConfig, x: Array,
                 segment_ids: Array | None) -> tuple[Array, Array | None]:
  """With CLS pooling, prepend a learned token (BERT / ViT) and give it the first segment id."""
  if config.pooling != "cls":
    return x, segment_ids
  cls = module.param("cls", nn.with_logical_partitioning(nn.initializers.zeros, (None, None,
                                                                                   "embed")),
                     (1, 1, config.d_model), config.weights_dtype)
  x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, x.shape[2])), x],
                      axis=1)
  if segment_ids is not None:
    segment_ids = jnp.concatenate([segment_ids[:, :1], segment_ids], axis=1)
  return x, segment_ids


def _head(config: ModelConfig, pooled: Array) -> Array:
  return nn.Dense(config.num_classes, dtype=config.compute_dtype,
                  param_dtype=config.weights_dtype, name="head",
                  kernel_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                           ("embed", None)))(pooled).astype(
                                                               jnp.float32)


class SequenceClassifier(nn.Module):
  """Encoder + pooling + linear head: class logits `[B, C]`."""

  config: ModelConfig

  @nn.compact
  def __call__(self, inputs: Array, *, segment_ids: Array | None = None,
               positions: Array | None = None, deterministic: bool = True) -> Array:
    config = self.config
    x = TokenEmbedding(config, name="embed")(inputs)
    x, segment_ids = _prepend_cls(self, config, x, segment_ids)
    if positions is not None and config.pooling == "cls":
      positions = jnp.concatenate([jnp.zeros_like(positions[:, :1]), positions + 1], axis=1)
    x = TransformerStack(config, config.num_layers, causal=False, name="encoder")(
        x, positions=positions, segment_ids=segment_ids, deterministic=deterministic)
    token_mask = None if segment_ids is None else segment_ids != 0
    return _head(config, Pooler(config, name="pool")(x, token_mask))


class ViT(nn.Module):
  """Vision Transformer (Dosovitskiy et al. 2021): patches, 2-D positions, encoder, head."""

  config: ModelConfig

  @nn.compact
  def __call__(self, image: Array, *, deterministic: bool = True) -> Array:
    """`image` `[B, H, W, C]` -> logits `[B, num_classes]`."""
    config = self.config
    patch, grid = config.patch_size, config.image_size // config.patch_size
    if image.shape[1:] != (config.image_size, config.image_size, config.channels):
      raise ValueError(
          f"ViT expects images [B, {config.image_size}, {config.image_size}, {config.channels}]"
          f" (model.image_size, model.channels), got {image.shape}.")
    x = nn.Conv(config.d_model, (patch, patch), strides=(patch, patch), padding="VALID",
                dtype=config.compute_dtype, param_dtype=config.weights_dtype,
                kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                         (None, None, None, "embed")),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                name="patch_embed")(image)
    x = x.reshape(x.shape[0], grid * grid, config.d_model)
    if config.position == "learned":
      x = x + LearnedPositionEmbedding2D(grid, grid, config.d_model,
                                         param_dtype=config.weights_dtype,
                                         name="position_embedding")().astype(x.dtype)
    elif config.position == "sinusoidal":
      x = x + SinCos2DPositionEmbedding(grid, grid, config.d_model)().astype(x.dtype)
    x, _ = _prepend_cls(self, config, x, None)
    x = TransformerStack(config, config.num_layers, causal=False, absolute_positions=False,
                         name="encoder")(x, deterministic=deterministic)
    return _head(config, Pooler(config, name="pool")(x, None))
