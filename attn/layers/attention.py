"""MultiHeadAttention: projections, RoPE, QK-norm and a KV cache around `dot_product_attention`.

Shapes: B batch, T query length, S key length, D model features, N query heads, K key/value
heads, H head dim. Parameters follow `flax.linen.MultiHeadDotProductAttention` (query, key,
value, out DenseGeneral kernels `[D, N, H]`, `[D, K, H]`, `[D, K, H]`, `[N, H, D]`), so weights
move between the two, and carry logical axis names for sharding.
"""

import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn.errors import ConfigError
from attn.layers import registry, variants
from attn.ops import masks as masks_lib
from attn.ops import positions as positions_lib
from attn.ops import reference

Array = jax.Array
Initializer = Callable[..., Array]

# Mask keywords that describe positions; under a KV cache they are rebuilt for the cache slots.
_POSITIONAL_MASKS = ("is_causal", "local_window_size", "prefix_lengths", "chunk_size")


class MultiHeadAttention(nn.Module):
  """Multi-head attention (Vaswani et al. 2017) with GQA/MQA, RoPE, QK-norm, soft-cap, KV cache.

  Attributes:
    num_heads: query heads N.
    num_kv_heads: key/value heads K (None = N: MHA; 1 < K < N: GQA; 1: MQA).
    head_dim: H (None = D // N).
    out_features: output features (None = the input's D).
    use_bias: biases on the four projections.
    dropout_rate: dropout on the attention weights (training only).
    qk_norm: RMS-normalize queries and keys per head before the dot product (ViT-22B;
      stabilizes large-scale training).
    softcap: logit soft-capping value (Gemma 2), or None.
    rope_base: apply rotary embeddings (RoFormer) with this base to q and k, or None.
    rope_fraction: fraction of head_dim that RoPE rotates (partial rotary, GPT-NeoX).
    scale: logit scale (None = 1 / sqrt(H)).
    implementation: passed to `dot_product_attention` ('xla', 'blockwise', 'cudnn', None =
      best).
    attention: the mechanism, a core-level name in `attn.layers.registry` ('softmax',
      'linear', 'performer', ...); 'softmax' is `dot_product_attention` itself.
    attention_options: keyword arguments of that mechanism's module (e.g. {'num_features': 64}
      for 'performer'); its parameters live under params[attention].
    decode: autoregressive decoding (self-attention only), as the registry entry's `decoding`
      says: 'kv_cache' keeps every key and value in the 'cache' collection, 'window_cache' a
      ring buffer of the window's keys, 'recurrent' leaves the state to the core (built with
      decode=True). `init` with an input of the maximum length sizes the cache; every later
      apply (mutable=['cache']) appends its tokens and attends to everything cached so far.
    record_weights: sow the attention weights `[B, N, T, S]` (float32) into 'intermediates',
      recomputed on the reference path so they exist whichever kernel ran (linear / performer
      give their implicit attention matrix, the one their output is the product of with V).
    dtype: computation dtype (None = input's). param_dtype: parameter dtype.
  """

  num_heads: int
  num_kv_heads: int | None = None
  head_dim: int | None = None
  out_features: int | None = None
  use_bias: bool = True
  dropout_rate: float = 0.0
  qk_norm: bool = False
  softcap: float | None = None
  rope_base: float | None = None
  rope_fraction: float = 1.0
  scale: float | None = None
  implementation: str | None = None
  attention: str = "softmax"
  attention_options: Mapping[str, Any] | None = None
  decode: bool = False
  record_weights: bool = False
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros_init()

  def _projection(self, heads: int, head_dim: int, heads_axis: str, name: str) -> "Projection":
    return Projection(features=(heads, head_dim), in_dims=1,
                      kernel_axes=("embed", heads_axis, "head_dim"), use_bias=self.use_bias,
                      dtype=self.dtype, param_dtype=self.param_dtype,
                      kernel_init=self.kernel_init, bias_init=self.bias_init, name=name)

  @nn.compact
  def __call__(
      self,
      inputs_q: Array,
      inputs_kv: Array | None = None,
      *,
      mask: Array | None = None,
      bias: Array | None = None,
      q_positions: Array | None = None,
      kv_positions: Array | None = None,
      deterministic: bool = True,
      **mask_kwargs: Any,
  ) -> Array:
    """Attend from `inputs_q` `[B, T, D]` to `inputs_kv` `[B, S, D]` (self-attention if None).

    Args:
      inputs_q: queries' inputs.
      inputs_kv: keys' and values' inputs, or None for self-attention.
      mask: boolean `[B|1, N|1, T, S]`, True = attend.
      bias: additive logits bias `[B|1, N|1, T, S]` (ALiBi, T5 relative positions).
      q_positions: int `[B, T]` positions for RoPE (default 0..T-1, or the cache slots when
        decoding); pass per-segment positions for packed sequences.
      kv_positions: int `[B, S]` positions of the keys (default: q_positions for self-attention).
      deterministic: disables dropout.
      **mask_kwargs: any mask keyword of `attn.ops.dot_product_attention` (is_causal,
        query_seq_lengths, key_value_seq_lengths, local_window_size, segment_ids,
        prefix_lengths, chunk_size).

    Returns:
      `[B, T, out_features or D]`.
    """
    features = inputs_q.shape[-1]
    num_kv_heads = self.num_kv_heads or self.num_heads
    head_dim = self.head_dim or features // self.num_heads
    if not self.head_dim and features % self.num_heads:
      raise ValueError(f"features {features} must be divisible by num_heads {self.num_heads} "
                       f"when head_dim is not given; set head_dim explicitly.")
    if self.num_heads % num_kv_heads:
      raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                       f"({num_kv_heads}).")
    self_attention = inputs_kv is None
    inputs_kv = inputs_q if self_attention else inputs_kv
    mechanism = self._mechanism()
    recurrent = mechanism.decoding == "recurrent"
    core = variants.make_attention(self.attention, self.attention_options, name=self.attention,
                                   **({"decode": self.decode} if recurrent else {}))

    query = self._projection(self.num_heads, head_dim, "heads", "query")(inputs_q)
    key = self._projection(num_kv_heads, head_dim, "kv_heads", "key")(inputs_kv)
    value = self._projection(num_kv_heads, head_dim, "kv_heads", "value")(inputs_kv)
    if self.qk_norm:
      query = _head_rms_norm(self.param_dtype, "query_norm")(query)
      key = _head_rms_norm(self.param_dtype, "key_norm")(key)

    query, key = self._apply_rope(query, key, q_positions, kv_positions, self_attention)
    query = nn.with_logical_constraint(query, ("batch", "length", "heads", "head_dim"))
    key = nn.with_logical_constraint(key, ("batch", "length", "kv_heads", "head_dim"))
    value = nn.with_logical_constraint(value, ("batch", "length", "kv_heads", "head_dim"))

    if hasattr(core, "pattern"):  # local / chunked / bigbird / longformer: their mask
      mask, mask_kwargs = _merge_pattern(self.attention, core.pattern(query.shape[1],
                                                                      key.shape[1]),
                                         mask, mask_kwargs)
    if self.decode and self_attention and not recurrent:  # a recurrent core keeps its state
      if mechanism.decoding == "window_cache" and bias is None:
        key, value, mask, mask_kwargs = self._update_window_cache(
            key, value, mask, mask_kwargs, core.cache_slots())
      else:  # kv_cache, or a window under a [T, max_len] relative bias (ALiBi / T5)
        key, value, mask, mask_kwargs = self._update_cache(key, value, mask, mask_kwargs)

    attention_kwargs = dict(bias=bias, mask=mask, scale=self.scale, softcap=self.softcap,
                            **mask_kwargs)
    dropout = self.dropout_rate > 0.0 and not deterministic
    # A core whose map is not softmax's (linear, performer) returns its own with the output.
    own_map = self.record_weights and getattr(core, "returns_weights", False)
    out = core(
        query, key, value, implementation=self.implementation,
        dropout_rate=self.dropout_rate if dropout else 0.0,
        dropout_rng=self.make_rng("dropout") if dropout else None,
        **({"return_weights": True} if own_map else {}), **attention_kwargs)
    if own_map:
      out, weights = out
    elif self.record_weights:
      _, weights = reference.attention(query, key, value, return_weights=True, **attention_kwargs)
    if self.record_weights:
      self.sow("intermediates", "attention_weights", weights)

    return self._output(self._before_output(out, inputs_q), features)

  def _output(self, out: Array, features: int) -> Array:
    """The output projection of the head outputs `[B, T, N, Hv]` to `[B, T, D]`."""
    out = Projection(features=(self.out_features or features,), in_dims=2,
                     kernel_axes=("heads", "head_dim", "embed"), use_bias=self.use_bias,
                     dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=self.kernel_init,
                     bias_init=self.bias_init, name="out")(out)
    return nn.with_logical_constraint(out, ("batch", "length", "embed"))

  def _record(self, result: Array | tuple[Array, Array]) -> Array:
    """An op's output, or `(output, weights)` with record_weights: the weights are sown."""
    if not self.record_weights:
      return result
    out, weights = result
    self.sow("intermediates", "attention_weights", weights)
    return out

  def _apply_rope(self, query: Array, key: Array, q_positions: Array | None,
                  kv_positions: Array | None, self_attention: bool) -> tuple[Array, Array]:
    """RoPE on `[B, T, N, H]` queries and `[B, S, K, H]` keys (when rope_base is set)."""
    if self.rope_base is None:
      return query, key
    q_positions, kv_positions = self._rope_positions(query, key, q_positions, kv_positions,
                                                     self_attention)
    return (positions_lib.apply_rope(query, q_positions, base=self.rope_base,
                                     fraction=self.rope_fraction),
            positions_lib.apply_rope(key, kv_positions, base=self.rope_base,
                                     fraction=self.rope_fraction))

  def _before_output(self, out: Array, inputs_q: Array) -> Array:
    """The head outputs `[B, T, N, Hv]` before the output projection; a layer-level subclass
    may transform them from the layer's input (gated attention gates them)."""
    del inputs_q
    return out

  def _mechanism(self) -> registry.Mechanism:
    """The registry entry; decode / record_weights it cannot honor are errors naming it."""
    mechanism = registry.get(self.attention, "attention")
    if mechanism.level != "core":
      raise ValueError(
          f"attention={self.attention!r} is a layer-level mechanism: build "
          f"{mechanism.module.__name__} in place of MultiHeadAttention "
          f"(attn.models.transformer.attention_layer does).")
    if self.decode and mechanism.decoding is None:
      raise ConfigError(
          f"attention={self.attention!r} cannot decode (its registry entry has decoding=None); "
          f"mechanisms that decode: {registry.supporting('decoding')}.")
    if self.record_weights and not mechanism.weights:
      raise ConfigError(
          f"record_weights: attention={self.attention!r} has no attention map to record; "
          f"mechanisms with maps: {registry.supporting('weights')}.")
    return mechanism

  def _rope_positions(self, query: Array, key: Array, q_positions: Array | None,
                      kv_positions: Array | None, self_attention: bool) -> tuple[Array, Array]:
    """The positions RoPE uses: as given, else 0..T-1 (from the cache index when decoding);
    the keys' default to the queries' in self-attention."""
    if q_positions is None:
      start = 0
      if self.decode and self_attention and self.has_variable("cache", "cache_index"):
        start = self.get_variable("cache", "cache_index")
      q_positions = jnp.broadcast_to(start + jnp.arange(query.shape[1]), query.shape[:2])
    if kv_positions is None:
      kv_positions = q_positions if self_attention else jnp.broadcast_to(
          jnp.arange(key.shape[1]), key.shape[:2])
    return q_positions, kv_positions

  def _update_cache(self, key: Array, value: Array, mask: Array | None,
                    mask_kwargs: dict) -> tuple[Array, Array, Array | None, dict]:
    """Write the new keys/values at the cache index; mask out the slots not written yet.

    The first call (at init) only creates a cache as long as its input. Each later call with
    L new tokens attends from query i (cache slot index + i) to slots <= index + i: the
    causal mask aligned bottom-right, plus any window / prefix / chunk mask, on cache slots.
    """
    initialized = self.has_variable("cache", "cached_key")
    cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
    cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    if not initialized:
      return key, value, mask, mask_kwargs
    _check_unpacked(mask_kwargs)
    index, step_len, max_len = cache_index.value, key.shape[1], cached_key.value.shape[1]
    cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, key, (0, index, 0, 0))
    cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, value, (0, index, 0, 0))
    cache_index.value = index + step_len
    positional = {name: mask_kwargs.pop(name) for name in _POSITIONAL_MASKS if name in mask_kwargs}
    positional["is_causal"] = True  # slots past index + i are empty or in the future
    slots_mask = masks_lib.make_attention_mask(step_len, max_len, q_offset=index, **positional)
    # A prefix may reach past the slots written so far: those hold zeros, never attend to them.
    written = masks_lib.causal_mask(1, max_len, q_offset=index + step_len - 1)
    return (cached_key.value, cached_value.value, masks_lib.and_masks(mask, slots_mask, written),
            mask_kwargs)


  def _update_window_cache(self, key: Array, value: Array, mask: Array | None,
                           mask_kwargs: dict, slots: int) -> tuple[Array, Array, Array, dict]:
    """A ring buffer of the last `slots` keys / values (local, chunked): O(window) memory.

    A step with L new tokens attends to the ring's slots plus its own L keys (so a prompt
    longer than the window still sees every key its window needs), masked by absolute
    positions, then writes its last min(L, slots) keys into the ring. Slot positions are
    stored + 1 (0 = empty: a cache zero-initialized from `eval_shape` starts empty).
    """
    initialized = self.has_variable("cache", "cached_key")
    ring = lambda x: (x.shape[0], slots) + x.shape[2:]  # noqa: E731
    cached_key = self.variable("cache", "cached_key", jnp.zeros, ring(key), key.dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, ring(value), value.dtype)
    cached_slot = self.variable("cache", "cached_positions",
                                lambda: jnp.zeros((slots,), jnp.int32))
    cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    if not initialized:
      return key, value, mask, mask_kwargs
    _check_unpacked(mask_kwargs)
    index, step_len = cache_index.value, key.shape[1]
    q_pos = index + jnp.arange(step_len, dtype=jnp.int32)
    k_pos = jnp.concatenate([cached_slot.value - 1, q_pos])
    positional = {name: mask_kwargs.pop(name) for name in _POSITIONAL_MASKS if name in mask_kwargs}
    slots_mask = _positions_mask(q_pos, k_pos, **positional)
    keys = jnp.concatenate([cached_key.value, key], axis=1)
    values = jnp.concatenate([cached_value.value, value], axis=1)
    kept = min(step_len, slots)
    write = (index + step_len - kept + jnp.arange(kept)) % slots
    cached_key.value = cached_key.value.at[:, write].set(key[:, step_len - kept:])
    cached_value.value = cached_value.value.at[:, write].set(value[:, step_len - kept:])
    cached_slot.value = cached_slot.value.at[write].set(q_pos[step_len - kept:] + 1)
    cache_index.value = index + step_len
    return keys, values, masks_lib.and_masks(mask, slots_mask), mask_kwargs


def _check_unpacked(mask_kwargs: dict) -> None:
  if mask_kwargs.get("segment_ids") is not None:
    raise ValueError("segment_ids (packed sequences) are not supported with decode=True; "
                     "decode one sequence per batch row.")


def _positions_mask(q_pos: Array, k_pos: Array, *, is_causal: bool = True,
                    local_window_size: int | tuple[int, int] | None = None,
                    chunk_size: int | None = None, prefix_lengths: Array | None = None) -> Array:
  """`[1, 1, T, S]` causal (+ window / chunk) mask over explicit key positions (-1 = empty)."""
  del is_causal  # Decoding is causal: a cached key is never in the future.
  if prefix_lengths is not None:
    raise ValueError("prefix_lengths is not supported by the window cache; use "
                     "attention='softmax' for prefix-LM decoding.")
  q, k = q_pos[:, None], k_pos[None, :]
  visible = (k >= 0) & (k <= q)
  if local_window_size is not None:
    visible &= k >= q - masks_lib.normalize_window(local_window_size)[0]
  if chunk_size is not None:
    visible &= (k // chunk_size) == (q // chunk_size)
  return visible[None, None]


def _merge_pattern(name: str, pattern: dict[str, Any], mask: Array | None,
                   mask_kwargs: dict) -> tuple[Array | None, dict]:
  """The mechanism's pattern AND the caller's mask; a pattern keyword also passed is an error."""
  mask_kwargs = dict(mask_kwargs)
  for key, value in pattern.items():
    if key == "mask":
      mask = masks_lib.and_masks(mask, value)
    elif mask_kwargs.get(key) is not None:
      raise ValueError(f"attention={name!r} sets {key} from its options "
                       f"(model.attention_options); do not also pass {key}.")
    else:
      mask_kwargs[key] = value
  return mask, mask_kwargs


class Projection(nn.Module):
  """`nn.DenseGeneral` over the last `in_dims` axes, with logical axes on the unflattened kernel.

  DenseGeneral initializes a flattened kernel and boxes it before reshaping, which breaks
  logical partitioning under a mesh; this initializes the same values (the flattened fan-in)
  and boxes the final shape. Parameter names and shapes match DenseGeneral's.
  """

  features: tuple[int, ...]
  in_dims: int
  kernel_axes: tuple[str, ...]
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: Array) -> Array:
    in_shape = x.shape[x.ndim - self.in_dims:]

    def init(key, shape, dtype):
      flat = (math.prod(in_shape), math.prod(self.features))
      return self.kernel_init(key, flat, dtype).reshape(shape)

    kernel = self.param("kernel", nn.with_logical_partitioning(init, self.kernel_axes),
                        in_shape + self.features, self.param_dtype)
    bias = None
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(
          self.bias_init, self.kernel_axes[self.in_dims:]), self.features, self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    contract = (tuple(range(x.ndim - self.in_dims, x.ndim)), tuple(range(self.in_dims)))
    y = jax.lax.dot_general(x, kernel, (contract, ((), ())))
    if bias is not None:
      y = y + bias.reshape((1,) * (y.ndim - bias.ndim) + bias.shape)
    return y


def _head_rms_norm(param_dtype: Any, name: str) -> nn.RMSNorm:
  """RMSNorm over head_dim with one learned scale per channel, shared by the heads."""
  return nn.RMSNorm(epsilon=1e-6, param_dtype=param_dtype, name=name,
                    scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                            ("head_dim",)))
