"""Differential attention (Ye et al. 2024, ICLR 2025), around `attn.ops.differential`.

The paper matches parameters with ordinary attention by halving the heads: N / 2 differential
heads, each with two H-dim query / key halves (the query projection keeps MultiHeadAttention's
`[D, N, H]` shape, heads 2i and 2i + 1 forming head i's pair) and a 2H-dim value. lambda is
re-parametrized per layer (four learned H-vectors) around lambda_init = 0.8 - 0.6 exp(-0.3
(l - 1)), which depends on the layer's depth l; the head outputs go through a per-head RMSNorm
with a learned 2H scale, times (1 - lambda_init). Decoding keeps MultiHeadAttention's KV cache
(the two key halves and the shared value).

Shapes: B batch, T query length, S key length, D width, N heads of the model (N / 2
differential heads), K key/value heads (K / 2 differential ones, or 1), H head_dim.
"""

from typing import Any

import flax.linen as nn
import jax

from attn.errors import ConfigError
from attn.layers import registry
from attn.layers.attention import MultiHeadAttention
from attn.ops import differential as diff_ops
from attn.ops.dispatch import IMPLEMENTATIONS

Array = jax.Array


@registry.register(
    name="differential", level="layer", paper="Ye et al. 2024 (ICLR 2025)",
    summary="difference of two softmax maps (learned lambda), per-head RMSNorm",
    decoding="kv_cache", weights=True, implementations=IMPLEMENTATIONS)
class DifferentialAttention(MultiHeadAttention):
  """Differential attention in place of MultiHeadAttention (same attributes and call).

  Attributes:
    lambda_init: the fixed lambda_init; None = the paper's depth schedule, from layer_index.
    layer_index: the 0-based depth of this layer (set by the model, not an option).
  """

  lambda_init: float | None = None
  layer_index: int | None = None

  @classmethod
  def check_config(cls, config: Any) -> None:
    """Paired heads, and a depth for the paper's lambda_init (a scanned stack has none)."""
    if config.num_heads % 2 or (config.kv_heads % 2 and config.kv_heads != 1):
      raise ConfigError(
          f"model.attention='differential' pairs the heads: model.num_heads "
          f"({config.num_heads}) must be even and model.num_kv_heads ({config.kv_heads}) even "
          f"or 1.")
    if config.scan_layers and config.attention_options.get("lambda_init") is None:
      raise ConfigError(
          "model.attention='differential' takes lambda_init from each layer's depth, which a "
          "scanned stack does not have: set model.scan_layers=False or "
          "model.attention_options.lambda_init.")

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Array | None = None, *,
               mask: Array | None = None, bias: Array | None = None,
               q_positions: Array | None = None, kv_positions: Array | None = None,
               deterministic: bool = True, **mask_kwargs: Any) -> Array:
    """`[B, T, D]` -> `[B, T, D]`; see MultiHeadAttention for the arguments."""
    features = inputs_q.shape[-1]
    heads, kv_heads = self.num_heads, self.num_kv_heads or self.num_heads
    head_dim = self.head_dim or features // heads
    if heads % 2 or (kv_heads % 2 and kv_heads != 1):
      raise ValueError(
          f"differential attention pairs the heads: num_heads ({heads}) must be even and "
          f"num_kv_heads ({kv_heads}) even or 1 (model.num_heads / model.num_kv_heads).")
    pairs, kv_pairs = heads // 2, max(kv_heads // 2, 1)
    self_attention = inputs_kv is None
    inputs_kv = inputs_q if self_attention else inputs_kv
    query = self._projection(heads, head_dim, "heads", "query")(inputs_q)
    key = self._projection(2 * kv_pairs, head_dim, "kv_heads", "key")(inputs_kv)
    value = self._projection(kv_pairs, 2 * head_dim, "kv_heads", "value")(inputs_kv)
    query, key = self._apply_rope(query, key, q_positions, kv_positions, self_attention)
    if self.decode and self_attention:
      key, value, mask, mask_kwargs = self._update_cache(key, value, mask, mask_kwargs)

    if self.lambda_init is None and self.layer_index is None:
      raise ValueError("differential attention needs its layer_index (the paper's lambda_init "
                       "depends on depth) or a fixed lambda_init.")
    init = (diff_ops.lambda_init(self.layer_index) if self.lambda_init is None
            else self.lambda_init)
    vectors = [self.param(name, nn.with_logical_partitioning(nn.initializers.normal(0.1),
                                                             ("head_dim",)),
                          (head_dim,), self.param_dtype)
               for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")]
    lam = diff_ops.reparametrized_lambda(*vectors, init)
    norm_scale = self.param("norm_scale", nn.with_logical_partitioning(nn.initializers.ones,
                                                                       ("head_dim",)),
                            (2 * head_dim,), self.param_dtype)
    dropout = self.dropout_rate > 0.0 and not deterministic
    b, t, s = query.shape[0], query.shape[1], key.shape[1]
    result = diff_ops.differential_attention(
        query.reshape(b, t, pairs, 2, head_dim), key.reshape(b, s, kv_pairs, 2, head_dim),
        value, lam, lambda_init=init, norm_scale=norm_scale,
        return_weights=self.record_weights, bias=bias, mask=mask, scale=self.scale,
        softcap=self.softcap, implementation=self.implementation,
        dropout_rate=self.dropout_rate if dropout else 0.0,
        dropout_rng=self.make_rng("dropout") if dropout else None, **mask_kwargs)
    return self._output(self._record(result), features)
