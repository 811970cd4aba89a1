"""The core attention mechanisms: each turns projected q, k, v into per-head outputs.

Each class is a small linen module that owns the mechanism's own parameters (a sink logit,
Linformer projections, a cosine temperature), calls the pure op in `attn.ops`, and carries its
registry entry (`@registry.register(...)`: paper, capabilities; see attn/layers/registry.py).
Its dataclass fields are its options (`model.attention_options`).

Every core is called as `core(query, key, value, **kwargs)` with `[B, T, N, H]` queries,
`[B, S, K, H]` keys and values and the keywords of `attn.ops.dot_product_attention` (bias, mask,
scale, softcap, implementation, dropout_rate, dropout_rng, and the mask keywords), and returns
`[B, T, N, Hv]`. A keyword the mechanism cannot honor is an error that names it, never ignored.
Softmax cores with a sparsity pattern (local, chunked, bigbird, longformer) give it as
`pattern(q_len, kv_len)`, which MultiHeadAttention merges into the mask keywords (so caches and
recorded weights see it too).
"""

import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attn.layers import registry
from attn.ops import linear, performer, sparse, variants
from attn.ops import masks as masks_lib
from attn.ops.attention import dot_product_attention
from attn.ops.dispatch import IMPLEMENTATIONS

Array = jax.Array


def _reject(name: str, **used: Any) -> None:
  """Raise if any keyword the mechanism cannot honor is set."""
  named = [key for key, value in used.items()
           if value is not None and value is not False and not (key == "dropout_rate"
                                                                and value == 0.0)]
  if named:
    raise ValueError(f"attention={name!r} does not support {', '.join(sorted(named))}; use "
                     f"attention='softmax' (or a mask-based variant) for those.")


@registry.register(
    name="softmax", paper="Vaswani et al. 2017", summary="scaled dot-product attention",
    decoding="kv_cache", weights=True, implementations=IMPLEMENTATIONS)
class Softmax(nn.Module):
  """`dot_product_attention` with every keyword it takes."""

  @nn.compact
  def __call__(self, query: Array, key: Array, value: Array, **kwargs: Any) -> Array:
    return dot_product_attention(query, key, value, **kwargs)


@registry.register(
    name="local", paper="Beltagy et al. 2020; Child et al. 2019",
    summary="sliding window: keys within `window` positions (causal: the previous `window`)",
    cross_attention=False, decoding="window_cache", weights=True,
    implementations=IMPLEMENTATIONS)
class Local(Softmax):
  """Sliding-window softmax attention; `window` = w (both sides) or (left, right)."""

  window: int | tuple[int, int] = 128

  def pattern(self, q_len: int, kv_len: int) -> dict[str, Any]:
    del q_len, kv_len
    return {"local_window_size": self.window}

  def cache_slots(self) -> int:
    """Past keys a causal query can see (the window cache's size)."""
    return max(1, masks_lib.normalize_window(self.window)[0])


@registry.register(
    name="chunked", paper="Parmar et al. 2018; Llama 4 (2025)",
    summary="causal attention inside chunks of `chunk_size` positions", bidirectional=False,
    cross_attention=False, decoding="window_cache", weights=True,
    implementations=IMPLEMENTATIONS)
class Chunked(Softmax):
  """Causal softmax attention inside chunks of `chunk_size` positions."""

  chunk_size: int = 128

  def pattern(self, q_len: int, kv_len: int) -> dict[str, Any]:
    del q_len, kv_len
    return {"chunk_size": self.chunk_size}

  def cache_slots(self) -> int:
    return max(1, self.chunk_size - 1)


@registry.register(
    name="bigbird", paper="Zaheer et al. 2020",
    summary="block-sparse global + window + random blocks (dense block mask)", weights=True,
    implementations=IMPLEMENTATIONS)
class BigBird(Softmax):
  """Softmax attention under the block-sparse global + window + random pattern."""

  block_size: int = 64
  num_window_blocks: int = 3
  num_global_blocks: int = 1
  num_random_blocks: int = 2
  seed: int = 0

  def pattern(self, q_len: int, kv_len: int) -> dict[str, Any]:
    return {"mask": sparse.bigbird_mask(
        q_len, kv_len, block_size=self.block_size, num_window_blocks=self.num_window_blocks,
        num_global_blocks=self.num_global_blocks, num_random_blocks=self.num_random_blocks,
        seed=self.seed)}


@registry.register(
    name="longformer", paper="Beltagy et al. 2020",
    summary="sliding window + the first `num_global_tokens` tokens global", cross_attention=False,
    weights=True, implementations=IMPLEMENTATIONS)
class Longformer(Softmax):
  """Sliding window plus the first `num_global_tokens` positions as global tokens."""

  window: int | tuple[int, int] = 128
  num_global_tokens: int = 1

  def pattern(self, q_len: int, kv_len: int) -> dict[str, Any]:
    if q_len != kv_len:
      raise ValueError(f"attention='longformer' is self-attention (T == S); got T = {q_len}, "
                       f"S = {kv_len}.")
    is_global = jnp.arange(q_len)[None, :] < self.num_global_tokens
    return {"mask": sparse.longformer_mask(is_global, self.window)}


def _linear_kwargs(name: str, kwargs: dict) -> dict:
  """The keywords linear mechanisms honor (causal, key lengths, segments); reject the rest."""
  kwargs = dict(kwargs)
  kwargs.pop("implementation", None)
  kwargs.pop("dropout_rng", None)
  keep = {"is_causal": kwargs.pop("is_causal", False),
          "key_value_seq_lengths": kwargs.pop("key_value_seq_lengths", None),
          "segment_ids": kwargs.pop("segment_ids", None)}
  _reject(name, **kwargs)
  return keep


def _recurrent(module: nn.Module, name: str, value: Array, features: int, kwargs: dict,
               parallel: Any, step: Any) -> Array:
  """The parallel form, or with `module.decode` the recurrent one on the 'cache' state.

  The decode-mode `init` call (the maximum-length input) creates the empty state and runs the
  parallel form; every later call continues the state with its new tokens (causal).
  `return_weights=True` (the parallel form only) also returns the implicit attention matrix.
  """
  return_weights = kwargs.pop("return_weights", False)
  kwargs = _linear_kwargs(name, kwargs)
  if return_weights:
    _reject(name, decode=module.decode)
    return parallel(return_weights=True, **kwargs)
  if not module.decode:
    return parallel(**kwargs)
  if not kwargs["is_causal"] or any(kwargs[key] is not None
                                    for key in ("segment_ids", "key_value_seq_lengths")):
    raise ValueError(f"attention={name!r} with decode=True is causal self-attention over one "
                     f"unpadded sequence per row: pass is_causal=True and no segment_ids or "
                     f"key_value_seq_lengths.")
  initialized = module.has_variable("cache", "kv")
  empty = linear.init_state(value.shape[0], value.shape[2], features, value.shape[3])
  cache = {key: module.variable("cache", key, lambda x=x: x)
           for key, x in empty._asdict().items()}
  if not initialized:
    return parallel(**kwargs)
  out, state = step(linear.RecurrentState(**{key: x.value for key, x in cache.items()}))
  for key, x in cache.items():
    x.value = getattr(state, key)
  return out


@registry.register(
    name="linear", paper="Katharopoulos et al. 2020",
    summary="elu+1 feature map; causal form by chunk-wise prefix sums", decoding="recurrent",
    weights=True, cross_attention=False)  # its op takes segment ids (padding) only for T == S
class Linear(nn.Module):
  """Linear attention with the elu + 1 feature map (causal: chunk-wise prefix sums).

  decode=True: recurrent decoding, O(1) state per token (S, z in the 'cache' collection).
  `return_weights=True` gives (output, its implicit `[B, N, T, S]` attention matrix).
  """

  returns_weights = True  # MultiHeadAttention's record_weights asks it for its own map
  chunk_size: int = 64
  decode: bool = False

  @nn.compact
  def __call__(self, query: Array, key: Array, value: Array, **kwargs: Any) -> Array:
    return _recurrent(
        self, "linear", value, query.shape[-1], kwargs,
        lambda **kw: linear.linear_attention(query, key, value, chunk_size=self.chunk_size,
                                             **kw),
        lambda state: linear.linear_attention_step(query, key, value, state,
                                                   chunk_size=self.chunk_size))


@functools.lru_cache(maxsize=32)
def seed_features(seed: int, num_features: int, head_dim: int) -> np.ndarray:
  """Performer's fixed `[M, H]` features for `seed`: computed once, eagerly (also when called
  while a function is being traced), so a jitted step holds them as a constant."""
  with jax.ensure_compile_time_eval():
    features = performer.orthogonal_random_features(jax.random.key(seed), num_features, head_dim)
    features = np.asarray(features)
  features.flags.writeable = False
  return features


@registry.register(
    name="performer", paper="Choromanski et al. 2021",
    summary="FAVOR+: positive orthogonal random features, redrawable", decoding="recurrent",
    weights=True, cross_attention=False)  # its op takes segment ids (padding) only for T == S
class Performer(nn.Module):
  """FAVOR+ with `num_features` positive orthogonal random features.

  The features are fixed by `seed` unless a 'features' rng is given
  (`apply(..., rngs={'features': key})`): pass a new key every N steps to redraw them, as the
  paper does during training. The fixed features are drawn once per (seed, num_features,
  head_dim) and enter the compiled program as a constant (`seed_features`), so neither a
  training step nor a decoding step redraws them (a QR per call), and decoding uses exactly
  the features training used. decode=True: recurrent decoding, O(1) state per token; it
  always uses the seed's features. `return_weights=True` gives (output, its implicit
  `[B, N, T, S]` attention matrix).
  """

  returns_weights = True  # MultiHeadAttention's record_weights asks it for its own map
  num_features: int = 256
  chunk_size: int = 64
  seed: int = 0
  decode: bool = False

  @nn.compact
  def __call__(self, query: Array, key: Array, value: Array, *, scale: float | None = None,
               **kwargs: Any) -> Array:
    if self.has_rng("features") and not self.decode:  # a redraw (training)
      projection = performer.orthogonal_random_features(self.make_rng("features"),
                                                        self.num_features, query.shape[-1])
    else:
      projection = seed_features(self.seed, self.num_features, query.shape[-1])
    return _recurrent(
        self, "performer", value, self.num_features, kwargs,
        lambda **kw: performer.performer_attention(query, key, value, projection, scale=scale,
                                                   chunk_size=self.chunk_size, **kw),
        lambda state: performer.performer_attention_step(query, key, value, projection, state,
                                                         scale=scale, chunk_size=self.chunk_size))


@registry.register(
    name="linformer", paper="Wang et al. 2020",
    summary="keys / values projected along the sequence to `projected_length`", causal=False,
    packed=False, cross_attention=False,  # the decoder's cross-attention passes segment ids
    implementations=IMPLEMENTATIONS)
class Linformer(nn.Module):
  """Keys and values projected from S <= `max_length` positions down to `projected_length`."""

  projected_length: int = 64
  max_length: int = 512
  share_projections: bool = True

  @nn.compact
  def __call__(self, query: Array, key: Array, value: Array, *, scale: float | None = None,
               implementation: str | None = None, **kwargs: Any) -> Array:
    kv_len = key.shape[1]
    if kv_len > self.max_length:
      raise ValueError(f"attention='linformer' was built for at most max_length="
                       f"{self.max_length} keys, got {kv_len}; raise max_length.")
    kv_lengths = kwargs.pop("key_value_seq_lengths", None)
    kwargs.pop("dropout_rng", None)
    _reject("linformer", **kwargs)
    shape = (self.projected_length, self.max_length)
    init = nn.with_logical_partitioning(
        nn.initializers.normal(stddev=1.0 / np.sqrt(self.max_length)), (None, None))
    e = self.param("key_projection", init, shape)
    f = e if self.share_projections else self.param("value_projection", init, shape)
    return variants.linformer_attention(query, key, value, e[:, :kv_len], f[:, :kv_len],
                                        scale=scale, key_value_seq_lengths=kv_lengths,
                                        implementation=implementation)


@registry.register(
    name="cosine", paper="Liu et al. 2022 (Swin V2)",
    summary="cosine similarity over a learned per-head temperature", decoding="kv_cache",
    implementations=IMPLEMENTATIONS)
class Cosine(nn.Module):
  """Cosine similarity over a learned per-head temperature, clamped at `min_temperature`."""

  init_temperature: float = 0.1
  min_temperature: float = 0.01

  @nn.compact
  def __call__(self, query: Array, key: Array, value: Array, *, scale: float | None = None,
               **kwargs: Any) -> Array:
    _reject("cosine", scale=scale)
    # Learned as log(1 / tau), as in Swin V2, so the step size is relative.
    log_inv_tau = self.param(
        "log_inverse_temperature",
        nn.with_logical_partitioning(nn.initializers.constant(-np.log(self.init_temperature)),
                                     ("heads",)), (query.shape[2],))
    log_inv_tau = jnp.minimum(log_inv_tau, -np.log(self.min_temperature))
    return variants.cosine_attention(query, key, value, temperature=jnp.exp(-log_inv_tau),
                                     **kwargs)


@registry.register(
    name="sigmoid", paper="Ramapuram et al. 2024",
    summary="elementwise sigmoid with bias -log S")  # Its bias depends on S: no cache.
class Sigmoid(nn.Module):
  """Sigmoid attention with the bias b (default -log S)."""

  sigmoid_bias: float | None = None

  @nn.compact
  def __call__(self, query: Array, key: Array, value: Array, **kwargs: Any) -> Array:
    kwargs.pop("implementation", None)
    kwargs.pop("dropout_rng", None)
    _reject("sigmoid", softcap=kwargs.pop("softcap", None),
            dropout_rate=kwargs.pop("dropout_rate", 0.0))
    return variants.sigmoid_attention(query, key, value, sigmoid_bias=self.sigmoid_bias,
                                      **kwargs)


@registry.register(
    name="sinks", paper="Xiao et al. 2023; gpt-oss (2025)",
    summary="softmax with a learned per-head sink logit", decoding="kv_cache")
class Sinks(nn.Module):
  """Softmax attention with a learned per-head sink logit (initialized to `init_logit`)."""

  init_logit: float = 0.0

  @nn.compact
  def __call__(self, query: Array, key: Array, value: Array, **kwargs: Any) -> Array:
    kwargs.pop("implementation", None)
    kwargs.pop("dropout_rng", None)
    _reject("sinks", dropout_rate=kwargs.pop("dropout_rate", 0.0))
    sink_logits = self.param(
        "sink_logits",
        nn.with_logical_partitioning(nn.initializers.constant(self.init_logit), ("heads",)),
        (query.shape[2],))
    return variants.sink_attention(query, key, value, sink_logits, **kwargs)


def make_attention(attention: str, options: Mapping[str, Any] | None = None,
                   **module_kwargs: Any) -> nn.Module:
  """The module for `attention` built with `options` (checked against its fields); unknown
  names and options are ConfigErrors listing the valid ones."""
  mechanism = registry.get(attention)
  return mechanism.module(**registry.check_options(attention, options), **module_kwargs)
