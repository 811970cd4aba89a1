"""The Transformer stack shared by every model: blocks, residual placement, positions, scan/remat.

Shapes: B batch, T length, D d_model, N heads. `segment_ids` [B, T] follow the data pipeline:
0 is padding, equal ids attend to each other (packed sequences); `positions` [B, T] restart at
0 in each packed segment.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn.layers import (
  FeedForward,
  LearnedPositionEmbedding,
  MultiHeadAttention,
  SinusoidalPositionEmbedding,
  T5RelativePositionBias,
  make_norm,
  registry,
)
from attn.models.config import ModelConfig
from attn.ops import positions as positions_lib

Array = jax.Array

REMAT_POLICIES: dict[str, Callable | None] = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def default_positions(tokens: Array, positions: Array | None) -> Array:
  """`positions` or 0..T-1 for every row."""
  if positions is not None:
    return positions
  return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape[:2])


def _norm(config: ModelConfig, name: str) -> nn.Module:
  return make_norm(config.norm, epsilon=config.norm_epsilon, dtype=config.compute_dtype,
                   param_dtype=config.weights_dtype, name=name)


def attention_layer(config: ModelConfig, name: str, *, rope: bool, decode: bool = False,
                    mechanism: str = "softmax", layer_index: int | None = None) -> nn.Module:
  """The attention layer for `mechanism`, configured from the model config.

  A core-level mechanism runs inside MultiHeadAttention; a layer-level one (registry
  `level='layer'`) is built in its place with the same attributes plus its options.
  `config.attention` (and `config.attention_options`) apply to self-attention only;
  cross-attention is `config.cross_attention` (softmax by default), attention pooling softmax.
  """
  entry = registry.get(mechanism)
  options = ({k: v for k, v in config.attention_options.items() if k in entry.options}
             if mechanism in config.mechanisms else {})
  attributes = dict(
      num_heads=config.num_heads, num_kv_heads=config.kv_heads,
      head_dim=config.head_size, use_bias=config.use_bias,
      dropout_rate=config.attention_dropout_rate, qk_norm=config.qk_norm, softcap=config.softcap,
      rope_base=config.rope_base if rope else None, rope_fraction=config.rope_fraction,
      implementation=config.attention_impl, decode=decode, dtype=config.compute_dtype,
      param_dtype=config.weights_dtype, name=name)
  if entry.level == "layer":
    if "layer_index" in {f.name for f in dataclasses.fields(entry.module)}:
      attributes["layer_index"] = layer_index
    return entry.module(**attributes, **options)
  return MultiHeadAttention(attention=mechanism, attention_options=options or None, **attributes)


def _segment_keywords(mechanism: str, segment_ids: Array | None) -> dict[str, Array]:
  """The self-attention keywords for `segment_ids`: as they are, or, for a mechanism with
  padding but no packing support (registry), as key lengths.

  Key lengths are right only for one sequence per row followed by padding (`data.pack=False`);
  the trainer's config validation requires that for these mechanisms.
  """
  entry = registry.get(mechanism)
  if segment_ids is None:
    return {}
  if entry.packed or not entry.padding:
    return {"segment_ids": segment_ids}
  return {"key_value_seq_lengths": jnp.sum(segment_ids != 0, axis=-1).astype(jnp.int32)}


class Block(nn.Module):
  """Self-attention, optional cross-attention and a feed-forward, each in a residual branch.

  `norm_placement`: 'pre' x + F(LN(x)) (Xiong et al. 2020), 'post' LN(x + F(x)) (Vaswani et
  al. 2017), 'sandwich' x + LN(F(LN(x))) (Ding et al. 2021, CogView).
  """

  config: ModelConfig
  causal: bool
  cross_attention: bool = False
  decode: bool = False
  deterministic: bool = True
  layer_index: int | None = None  # depth in the stack (None: scanned); picks the pattern's entry

  def _residual(self, x: Array, branch: Callable[[Array], Array], name: str,
                token_mask: Array | None) -> Array:
    placement = self.config.norm_placement
    norm_kwargs = dict(mask=token_mask, deterministic=self.deterministic)
    dropout = nn.Dropout(self.config.dropout_rate)
    if placement == "post":
      y = dropout(branch(x), deterministic=self.deterministic)
      return _norm(self.config, f"{name}_norm")(x + y, **norm_kwargs)
    y = branch(_norm(self.config, f"{name}_norm")(x, **norm_kwargs))
    if placement == "sandwich":
      y = _norm(self.config, f"{name}_post_norm")(y, **norm_kwargs)
    return x + dropout(y, deterministic=self.deterministic)

  @nn.compact
  def __call__(self, x: Array, context: dict[str, Any]) -> tuple[Array, None]:
    """`(x, None)`: the scan-friendly signature; `context` holds the per-stack arrays."""
    config = self.config
    token_mask = context.get("token_mask")
    mechanism = config.layer_attention(self.layer_index or 0)
    self_attention = attention_layer(config, "self_attention", rope=config.position == "rope",
                                     decode=self.decode, mechanism=mechanism,
                                     layer_index=self.layer_index)
    x = self._residual(x, lambda h: self_attention(
        h, bias=context.get("bias"), q_positions=context.get("positions"),
        **_segment_keywords(mechanism, context.get("segment_ids")), is_causal=self.causal,
        deterministic=self.deterministic), "self_attention", token_mask)
    if self.cross_attention:
      cross = attention_layer(config, "cross_attention", rope=False,
                              mechanism=config.cross_attention, layer_index=self.layer_index)
      x = self._residual(x, lambda h: cross(
          h, context["encoded"], segment_ids=context.get("cross_segment_ids"),
          deterministic=self.deterministic), "cross_attention", token_mask)
    mlp = FeedForward(hidden_dim=config.mlp_dim, kind=config.ffn, use_bias=config.use_bias,
                      dtype=config.compute_dtype, param_dtype=config.weights_dtype, name="mlp")
    x = self._residual(x, lambda h: mlp(h, deterministic=self.deterministic), "mlp", token_mask)
    return nn.with_logical_constraint(x, ("batch", "length", "embed")), None


class TransformerStack(nn.Module):
  """Absolute positions, relative biases, `num_layers` blocks (looped or scanned), final norm.

  Attributes:
    config: the model config.
    num_layers: depth.
    causal: decoder (True) or encoder (False) self-attention.
    cross_attention: attend to `encoded` in every block (encoder-decoder's decoder).
    decode: KV-cache mode (autoregressive generation).
    absolute_positions: add 1-D sinusoidal / learned positions here (ViT adds 2-D ones itself).
  """

  config: ModelConfig
  num_layers: int
  causal: bool
  cross_attention: bool = False
  decode: bool = False
  absolute_positions: bool = True

  @nn.compact
  def __call__(self, x: Array, *, positions: Array | None = None,
               segment_ids: Array | None = None, encoded: Array | None = None,
               encoded_segment_ids: Array | None = None, deterministic: bool = True) -> Array:
    """`x` `[B, T, D]` embedded inputs -> `[B, T, D]`."""
    config = self.config
    positions = default_positions(x, positions)
    if self.absolute_positions and config.position == "sinusoidal":
      x = x + SinusoidalPositionEmbedding(config.d_model)(positions).astype(x.dtype)
    elif self.absolute_positions and config.position == "learned":
      x = x + LearnedPositionEmbedding(
          config.max_len, config.d_model, param_dtype=config.weights_dtype,
          name="position_embedding")(positions).astype(x.dtype)
    x = nn.Dropout(config.dropout_rate)(x, deterministic=deterministic)
    x = nn.with_logical_constraint(x.astype(config.compute_dtype), ("batch", "length", "embed"))

    context = {
        "positions": positions,
        "segment_ids": segment_ids,
        "token_mask": None if segment_ids is None else segment_ids != 0,
        "bias": self._relative_bias(positions),
        "encoded": encoded,
        "cross_segment_ids": _cross_segments(segment_ids, encoded_segment_ids, x, encoded),
    }
    x = self._blocks(x, context, deterministic)
    if config.norm_placement != "post":
      x = _norm(config, "final_norm")(x, mask=context["token_mask"], deterministic=deterministic)
    return x

  def _relative_bias(self, q_positions: Array) -> Array | None:
    """ALiBi or T5 bias `[B, N, T, S]`, computed once per stack and shared by its layers."""
    config = self.config
    if config.position not in ("alibi", "t5"):
      return None
    # Under a KV cache the keys are the cache slots 0..max_len-1 (one sequence per row).
    k_positions = (jnp.broadcast_to(jnp.arange(config.max_len), (q_positions.shape[0],
                                                                 config.max_len))
                   if self.decode else q_positions)
    if config.position == "alibi":
      slopes = positions_lib.alibi_slopes(config.num_heads)
      return positions_lib.alibi_bias(slopes, q_positions, k_positions, causal=self.causal)
    return T5RelativePositionBias(
        num_heads=config.num_heads, bidirectional=not self.causal,
        num_buckets=config.t5_num_buckets, max_distance=config.t5_max_distance,
        param_dtype=config.weights_dtype, name="relative_bias")(q_positions, k_positions)

  def _blocks(self, x: Array, context: dict[str, Any], deterministic: bool) -> Array:
    config = self.config
    block_cls = Block
    if config.remat != "none":
      block_cls = nn.remat(Block, policy=REMAT_POLICIES[config.remat],
                           prevent_cse=not config.scan_layers)
    block_kwargs = dict(config=config, causal=self.causal, cross_attention=self.cross_attention,
                        decode=self.decode, deterministic=deterministic)
    if config.scan_layers:
      scanned = nn.scan(
          block_cls,
          variable_axes={"params": 0, "cache": 0, "batch_stats": 0, "intermediates": 0},
          split_rngs={"params": True, "dropout": True},
          in_axes=nn.broadcast, length=self.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = scanned(**block_kwargs, name="layers")(x, context)
      return x
    for i in range(self.num_layers):
      x, _ = block_cls(**block_kwargs, layer_index=i, name=f"layer_{i}")(x, context)
    return x


def _cross_segments(segment_ids: Array | None, encoded_segment_ids: Array | None, x: Array,
                    encoded: Array | None) -> tuple[Array, Array] | None:
  """Segment ids for cross-attention: packed targets see the source with the same id."""
  if encoded is None or (segment_ids is None and encoded_segment_ids is None):
    return None
  if segment_ids is None:
    segment_ids = jnp.ones(x.shape[:2], jnp.int32)
  if encoded_segment_ids is None:
    encoded_segment_ids = jnp.ones(encoded.shape[:2], jnp.int32)
  return segment_ids, encoded_segment_ids
