"""Pure JAX attention ops: no Flax, no config objects. Layout [batch, seq, heads, head_dim]."""

from attn.ops import masks, positions, reference
from attn.ops.attention import (
    IMPLEMENTATIONS,
    available_implementations,
    dot_product_attention,
)

__all__ = [
    "IMPLEMENTATIONS",
    "available_implementations",
    "dot_product_attention",
    "masks",
    "positions",
    "reference",
]
