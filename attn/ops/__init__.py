"""Pure JAX attention ops: no Flax, no config objects. Layout [batch, seq, heads, head_dim]."""

from attn.ops import (
    blockwise,
    differential,
    gated,
    gated_deltanet,
    linear,
    masks,
    mla,
    performer,
    positions,
    reference,
    sparse,
    variants,
)
from attn.ops.attention import dot_product_attention
from attn.ops.blockwise import blockwise_attention
from attn.ops.dispatch import IMPLEMENTATIONS, available_implementations
from attn.ops.linear import linear_attention
from attn.ops.performer import performer_attention
from attn.ops.variants import (
    cosine_attention,
    linformer_attention,
    sigmoid_attention,
    sink_attention,
)

__all__ = [
    "IMPLEMENTATIONS",
    "available_implementations",
    "blockwise",
    "blockwise_attention",
    "cosine_attention",
    "differential",
    "dot_product_attention",
    "gated",
    "gated_deltanet",
    "linear",
    "linear_attention",
    "linformer_attention",
    "masks",
    "mla",
    "performer",
    "performer_attention",
    "positions",
    "reference",
    "sigmoid_attention",
    "sink_attention",
    "sparse",
    "variants",
]
