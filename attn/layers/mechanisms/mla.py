"""Multi-head latent attention (DeepSeek-V2, 2024), around `attn.ops.mla`.

Keys and values come from a normalized low-rank latent (kv_lora_rank = Dc) per token, queries
optionally from one too (q_lora_rank), with a decoupled RoPE part (rope_head_dim = Dr) of the
key shared by every head. Training runs the expanded form; with `decode=True` the cache holds
only the latent and the rotated shared key, (Dc + Dr) numbers per token and layer (the cache of
MultiHeadAttention holds 2 K H), and decoding runs the absorbed form.

Shapes: B batch, T query length, S key length, D model width, N heads, H the per-head nope and
value dims (head_dim), Dr rotary dims, Dc latent dims.
"""

from typing import Any

import flax.linen as nn
import jax

from attn.errors import ConfigError
from attn.layers import registry
from attn.layers.attention import MultiHeadAttention, Projection
from attn.ops import mla as mla_ops
from attn.ops import positions as positions_lib
from attn.ops.dispatch import IMPLEMENTATIONS

Array = jax.Array


@registry.register(
    name="mla", level="layer", paper="DeepSeek-AI 2024 (DeepSeek-V2)",
    summary="keys / values from a cached low-rank latent + a shared RoPE key; absorbed "
    "decoding", cross_attention=False, decoding="kv_cache", weights=True,
    implementations=IMPLEMENTATIONS)
class MultiHeadLatentAttention(MultiHeadAttention):
  """MLA in place of MultiHeadAttention (same attributes and call; num_kv_heads does not apply).

  Attributes:
    kv_lora_rank: Dc, the latent that is cached (DeepSeek-V2: 4 H).
    q_lora_rank: compress the queries through a latent of this size too (0 = no).
    rope_head_dim: Dr, the rotary part of every query head and of the shared key (even;
      DeepSeek-V2: H / 2). RoPE uses `rope_base` (10000 when the model has no RoPE).
  """

  kv_lora_rank: int = 64
  q_lora_rank: int = 0
  rope_head_dim: int = 16

  @classmethod
  def check_config(cls, config: Any) -> None:
    """The ranks are positive (q_lora_rank may be 0) and the rotary part pairs channels."""
    options = {f: config.attention_options.get(f, getattr(cls, f))
               for f in ("kv_lora_rank", "q_lora_rank", "rope_head_dim")}
    if (options["kv_lora_rank"] <= 0 or options["q_lora_rank"] < 0
        or options["rope_head_dim"] <= 0 or options["rope_head_dim"] % 2):
      raise ConfigError(
          f"model.attention='mla': model.attention_options {options} need kv_lora_rank > 0, "
          f"q_lora_rank >= 0 and an even rope_head_dim > 0 (RoPE rotates channel pairs).")

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Array | None = None, *,
               mask: Array | None = None, bias: Array | None = None,
               q_positions: Array | None = None, kv_positions: Array | None = None,
               deterministic: bool = True, **mask_kwargs: Any) -> Array:
    """`[B, T, D]` -> `[B, T, D]`, self-attention; see MultiHeadAttention for the arguments."""
    if inputs_kv is not None:
      raise ValueError("mla is self-attention only (its cache is the latent of the same "
                       "sequence); use attention='softmax' for cross-attention.")
    batch, length, features = inputs_q.shape
    heads, rope_dim, rank = self.num_heads, self.rope_head_dim, self.kv_lora_rank
    head_dim = self.head_dim or features // heads
    x = inputs_q
    if self.q_lora_rank:
      x = self._latent(x, self.q_lora_rank, "query_down", "query_latent_norm")
    query = self._projection(heads, head_dim + rope_dim, "heads", "query")(x)
    q_nope, q_rope = query[..., :head_dim], query[..., head_dim:]
    down = Projection(features=(rank + rope_dim,), in_dims=1, kernel_axes=("embed", "kv_lora"),
                      use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                      kernel_init=self.kernel_init, bias_init=self.bias_init,
                      name="kv_down")(inputs_q)
    latent = _rms_norm(self, down[..., :rank], "kv_latent_norm")
    k_rope = down[..., rank:]
    w_uk, w_uv = (self.param(name, nn.with_logical_partitioning(
        lambda key, shape, dtype: self.kernel_init(key, (shape[0], shape[1] * shape[2]),
                                                   dtype).reshape(shape),
        ("kv_lora", "heads", "head_dim")), (rank, heads, head_dim), self.param_dtype)
        for name in ("key_up", "value_up"))

    q_positions, kv_positions = self._rope_positions(q_rope, q_rope, q_positions, kv_positions,
                                                     True)
    base = self.rope_base or 10000.0
    q_rope = positions_lib.apply_rope(q_rope, q_positions, base=base)
    k_rope = positions_lib.apply_rope(k_rope[:, :, None], kv_positions, base=base)[:, :, 0]
    absorb = False
    if self.decode:  # the cache: latent and rotated shared key, one "head" each
      absorb = self.has_variable("cache", "cache_index")  # decoding steps, not init
      latent, k_rope, mask, mask_kwargs = self._update_cache(
          latent[:, :, None], k_rope[:, :, None], mask, mask_kwargs)
      latent, k_rope = latent[:, :, 0], k_rope[:, :, 0]

    dropout = self.dropout_rate > 0.0 and not deterministic
    dtype = self.dtype or inputs_q.dtype
    result = mla_ops.mla_attention(
        q_nope.astype(dtype), q_rope.astype(dtype), latent.astype(dtype), k_rope.astype(dtype),
        w_uk.astype(dtype), w_uv.astype(dtype), absorb=absorb, scale=self.scale,
        return_weights=self.record_weights, bias=bias, mask=mask, softcap=self.softcap,
        implementation=self.implementation, dropout_rate=self.dropout_rate if dropout else 0.0,
        dropout_rng=self.make_rng("dropout") if dropout else None, **mask_kwargs)
    return self._output(self._record(result), features)

  def _latent(self, x: Array, rank: int, name: str, norm_name: str) -> Array:
    down = Projection(features=(rank,), in_dims=1, kernel_axes=("embed", "q_lora"),
                      use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                      kernel_init=self.kernel_init, bias_init=self.bias_init, name=name)(x)
    return _rms_norm(self, down, norm_name)


def _rms_norm(module: nn.Module, x: Array, name: str) -> Array:
  """RMSNorm of a latent (float32 statistics, learned scale), as DeepSeek-V2 normalizes it."""
  return nn.RMSNorm(epsilon=1e-6, dtype=x.dtype, param_dtype=module.param_dtype,
                    scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                            (None,)),
                    name=name)(x)
