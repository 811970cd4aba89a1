"""Flax linen modules that own parameters and call the pure ops in attn.ops."""

from attn.layers import registry
from attn.layers.attention import MultiHeadAttention
from attn.layers.feedforward import FFN_KINDS, FeedForward
from attn.layers.norms import NORMS, BatchNorm, LayerNorm, RMSNorm, make_norm
from attn.layers.positions import (
    LearnedPositionEmbedding,
    LearnedPositionEmbedding2D,
    SinCos2DPositionEmbedding,
    SinusoidalPositionEmbedding,
    T5RelativePositionBias,
)
from attn.layers.variants import make_attention

__all__ = [
    "FFN_KINDS",
    "NORMS",
    "BatchNorm",
    "FeedForward",
    "LayerNorm",
    "LearnedPositionEmbedding",
    "LearnedPositionEmbedding2D",
    "MultiHeadAttention",
    "RMSNorm",
    "SinCos2DPositionEmbedding",
    "SinusoidalPositionEmbedding",
    "T5RelativePositionBias",
    "make_attention",
    "make_norm",
    "registry",
]
