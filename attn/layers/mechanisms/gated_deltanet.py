"""The Gated DeltaNet layer (Yang, Kautz & Hatamizadeh 2024, ICLR 2025), around
`attn.ops.gated_deltanet`.

As in the paper's layer (and its reference implementation in fla): q, k, v projections, each
through a short causal depthwise convolution and SiLU; per head a write strength
beta = sigmoid(W_b x) and a decay alpha = exp(-exp(A_log) softplus(W_a x + dt_bias)) (Mamba-2's
parametrization); the gated delta rule with L2-normalized q and k and scale H^-1/2; then a
per-head RMSNorm gated by SiLU(W_g x) and the output projection. It needs no positions (the
convolution and the decay order the tokens), so `rope_base` is ignored.

Training runs the chunkwise form; with `decode=True` the layer keeps its recurrent state
`[B, N, H, Hv]` (float32) and the convolution's last `conv_size - 1` inputs in the 'cache'
collection: O(1) memory per layer whatever the context. Packed sequences restart the state and
the convolution at segment boundaries.

Shapes: B batch, T length, D model width, N heads, H key head dim, Hv value head dim
(= expand_v * H), C convolved channels (N (2 H + Hv)), K conv_size.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attn.layers import registry
from attn.layers.attention import MultiHeadAttention, Projection
from attn.ops import gated_deltanet as gdn

Array = jax.Array

_F32 = jnp.float32


def _dt_bias_init(key: Array, shape: tuple[int, ...], dtype: Any) -> Array:
  """softplus^-1 of a step dt ~ log-uniform in [1e-3, 0.1] (Mamba-2; fla's GatedDeltaNet)."""
  dt = jnp.exp(jax.random.uniform(key, shape, _F32, np.log(1e-3), np.log(0.1)))
  dt = jnp.maximum(dt, 1e-4)
  return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)


def _a_log_init(key: Array, shape: tuple[int, ...], dtype: Any) -> Array:
  """log A with A ~ uniform(1, 16): per-head decay rates spread over an order of magnitude."""
  return jnp.log(jax.random.uniform(key, shape, _F32, 1.0, 16.0)).astype(dtype)


def _conv_init(key: Array, shape: tuple[int, ...], dtype: Any) -> Array:
  """uniform(+-1 / sqrt(K)): PyTorch's Conv1d default for a depthwise kernel (fan-in K)."""
  bound = shape[0] ** -0.5
  return jax.random.uniform(key, shape, _F32, -bound, bound).astype(dtype)


def causal_short_conv(x: Array, kernel: Array, *, previous: Array | None = None,
                      segment_ids: Array | None = None) -> Array:
  """Depthwise causal convolution: out_t = sum_j kernel[j] x_{t - K + 1 + j}, per channel.

  Args:
    x: `[B, T, C]`.
    kernel: `[K, C]`; kernel[K - 1] weights the current token.
    previous: `[B, K - 1, C]` inputs before x (decoding), or None for zeros.
    segment_ids: `[B, T]`: taps in another segment contribute nothing.

  Returns:
    `[B, T, C]` in float32.
  """
  taps, length = kernel.shape[0], x.shape[1]
  if previous is None:
    previous = jnp.zeros((x.shape[0], taps - 1, x.shape[2]), x.dtype)
  full = jnp.concatenate([previous.astype(x.dtype), x], axis=1).astype(_F32)
  seg_full = None if segment_ids is None else jnp.pad(segment_ids, ((0, 0), (taps - 1, 0)),
                                                      constant_values=-1)
  out = jnp.zeros(x.shape, _F32)
  for j in range(taps):
    tap = full[:, j:j + length] * kernel[j].astype(_F32)[None, None, :]
    if seg_full is not None:
      tap = jnp.where((seg_full[:, j:j + length] == segment_ids)[:, :, None], tap, 0.0)
    out = out + tap
  return out


@registry.register(
    name="gated_deltanet", level="layer", paper="Yang et al. 2024 (ICLR 2025)",
    summary="gated delta rule: decayed matrix state, chunkwise (WY) training, O(1)-state "
    "decoding; short conv, output gate", bidirectional=False, cross_attention=False,
    decoding="recurrent", weights=True)
class GatedDeltaNet(MultiHeadAttention):
  """Gated DeltaNet: a delta-rule recurrence with a data-dependent decay, in place of attention.

  Built with MultiHeadAttention's attributes (num_heads N, head_dim H, use_bias, decode, dtype,
  param_dtype; num_kv_heads, rope, softcap, scale and implementation do not apply) plus:

  Attributes:
    chunk_size: chunk length of the chunkwise-parallel training form.
    conv_size: taps of the short causal convolution on q, k, v (1 = none).
    decay: learn the decay alpha (Gated DeltaNet); False is alpha = 1, plain DeltaNet.
    output_gate: gate the normalized output with SiLU(W_g x) (the paper's layer).
    expand_v: value head dim = expand_v * H.
  """

  chunk_size: int = 64
  conv_size: int = 4
  decay: bool = True
  output_gate: bool = True
  expand_v: int = 1

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Array | None = None, *,
               mask: Array | None = None, bias: Array | None = None,
               q_positions: Array | None = None, kv_positions: Array | None = None,
               deterministic: bool = True, **mask_kwargs: Any) -> Array:
    """`[B, T, D]` -> `[B, T, D]`, causal; see MultiHeadAttention for the arguments.

    Honours `segment_ids` (restarts) and `key_value_seq_lengths` (padding leaves the state
    as it is); a dense `mask`, `bias` or a non-causal call is an error.
    """
    del q_positions, kv_positions, deterministic  # no positions; no dropout on a recurrence
    segment_ids = mask_kwargs.pop("segment_ids", None)
    lengths = mask_kwargs.pop("key_value_seq_lengths", None)
    is_causal = mask_kwargs.pop("is_causal", True)
    unsupported = [k for k, v in mask_kwargs.items() if v is not None]
    if inputs_kv is not None or mask is not None or bias is not None or not is_causal or (
        unsupported):
      raise ValueError(
          "gated_deltanet is causal self-attention only: it takes segment_ids and "
          "key_value_seq_lengths, not inputs_kv, mask, bias, is_causal=False or "
          f"{unsupported}.")
    batch, length, features = inputs_q.shape
    heads = self.num_heads
    head_dim = self.head_dim or features // heads
    value_dim = self.expand_v * head_dim

    q = self._projection(heads, head_dim, "heads", "query")(inputs_q)
    k = self._projection(heads, head_dim, "heads", "key")(inputs_q)
    v = self._projection(heads, value_dim, "heads", "value")(inputs_q)
    qkv = jnp.concatenate([x.reshape(batch, length, -1) for x in (q, k, v)], axis=-1)

    cached = self.decode and self.has_variable("cache", "state")
    if self.decode:
      state = self.variable("cache", "state", jnp.zeros, (batch, heads, head_dim, value_dim),
                            _F32)
      conv_cache = self.variable("cache", "conv", jnp.zeros,
                                 (batch, self.conv_size - 1, qkv.shape[-1]), qkv.dtype)
      if cached and segment_ids is not None:
        raise ValueError("segment_ids (packed sequences) are not supported with decode=True; "
                         "decode one sequence per batch row.")
    if self.conv_size > 1:
      kernel = self.param("conv", nn.with_logical_partitioning(_conv_init, (None, None)),
                          (self.conv_size, qkv.shape[-1]), self.param_dtype)
      previous = conv_cache.value if cached else None
      convolved = causal_short_conv(qkv, kernel, previous=previous, segment_ids=segment_ids)
      if cached:
        full = jnp.concatenate([previous, qkv], axis=1)
        conv_cache.value = full[:, full.shape[1] - (self.conv_size - 1):]
      qkv = nn.silu(convolved)
    else:
      qkv = nn.silu(qkv.astype(_F32))
    q, k, v = jnp.split(qkv, [heads * head_dim, 2 * heads * head_dim], axis=-1)
    q, k = (x.reshape(batch, length, heads, head_dim) for x in (q, k))
    v = v.reshape(batch, length, heads, value_dim).astype(self.dtype or inputs_q.dtype)

    beta = nn.sigmoid(self._head_scalars("beta", inputs_q).astype(_F32))
    log_alpha = None
    if self.decay:
      a_log = self.param("A_log", nn.with_logical_partitioning(_a_log_init, ("heads",)),
                         (heads,), self.param_dtype)
      dt_bias = self.param("dt_bias", nn.with_logical_partitioning(_dt_bias_init, ("heads",)),
                           (heads,), self.param_dtype)
      dt = jax.nn.softplus(self._head_scalars("alpha", inputs_q).astype(_F32)
                           + dt_bias.astype(_F32)[None, None, :])
      log_alpha = -jnp.exp(a_log.astype(_F32))[None, None, :] * dt

    kwargs = dict(scale=head_dim**-0.5)
    if cached:  # decoding: continue from the cached state
      out, state.value = gdn.gated_delta_rule(
          q, k, v, beta, log_alpha, initial_state=state.value, chunk_size=self.chunk_size,
          return_final_state=True, **kwargs)
    else:
      out = gdn.gated_delta_rule(q, k, v, beta, log_alpha, segment_ids=segment_ids,
                                 key_value_seq_lengths=lengths, chunk_size=self.chunk_size,
                                 **kwargs)
    if self.record_weights:
      self.sow("intermediates", "attention_weights", gdn.gated_delta_weights(
          q, k, beta, log_alpha, segment_ids=segment_ids, key_value_seq_lengths=lengths,
          **kwargs))

    return self._output(self._gated_norm(out, inputs_q, heads, value_dim), features)

  def _head_scalars(self, name: str, x: Array) -> Array:
    """One scalar per head and token, `[B, T, N]` (no bias: dt_bias plays that part)."""
    return Projection(features=(self.num_heads,), in_dims=1, kernel_axes=("embed", "heads"),
                      use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                      kernel_init=self.kernel_init, name=name)(x)

  def _gated_norm(self, out: Array, x: Array, heads: int, value_dim: int) -> Array:
    """RMSNorm over each head's Hv channels (float32 statistics), times SiLU(W_g x)."""
    scale = self.param("norm_scale", nn.with_logical_partitioning(nn.initializers.ones,
                                                                  ("head_dim",)),
                       (value_dim,), self.param_dtype)
    y = out.astype(_F32)
    y = y * jax.lax.rsqrt(jnp.mean(y * y, axis=-1, keepdims=True) + 1e-5)
    y = y * scale.astype(_F32)[None, None, None, :]
    if self.output_gate:
      y = y * nn.silu(self._projection(heads, value_dim, "heads", "gate")(x).astype(_F32))
    return y.astype(self.dtype or x.dtype)
