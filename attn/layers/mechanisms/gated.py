"""Gated attention (Qiu et al. 2025; Qwen3-Next), around `attn.ops.gated`.

MultiHeadAttention whose head outputs are multiplied by sigmoid(W_g x) before the output
projection, x being the layer's (normalized) input: the paper's G1 position, elementwise and
head-specific by default (`headwise=True`: one gate per head). Everything else, the KV cache
included, is MultiHeadAttention's.
"""

import jax

from attn.layers import registry
from attn.layers.attention import MultiHeadAttention
from attn.ops import gated as gated_ops
from attn.ops.dispatch import IMPLEMENTATIONS

Array = jax.Array


@registry.register(
    name="gated", level="layer", paper="Qiu et al. 2025 (Qwen3-Next)",
    summary="softmax attention, head outputs times sigmoid(W_g x) before the output projection",
    decoding="kv_cache", weights=True, implementations=IMPLEMENTATIONS)
class GatedAttention(MultiHeadAttention):
  """Gated attention in place of MultiHeadAttention (same attributes and call).

  Attributes:
    headwise: one gate per head instead of one per channel.
  """

  headwise: bool = False

  def _before_output(self, out: Array, inputs_q: Array) -> Array:
    width = 1 if self.headwise else out.shape[-1]
    gate = self._projection(self.num_heads, width, "heads", "gate")(inputs_q)
    return gated_ops.sigmoid_gate(out, gate)
