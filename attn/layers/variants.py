"""The attention table: name -> the module that turns projected q, k, v into per-head outputs.

`MultiHeadAttention(attention=name)` looks the name up in `ATTENTION`; each entry is a small
linen module that owns the mechanism's own parameters (a sink logit, Linformer projections, a
cosine temperature) and calls the pure op in `attn.ops`. Options reach it through
`MultiHeadAttention(attention_options={...})`.

Every core is called as `core(query, key, value, **kwargs)` with `[B, T, N, H]` queries,
`[B, S, K, H]` keys and values and the keywords of `attn.ops.dot_product_attention` (bias, mask,
scale, softcap, implementation, dropout_rate, dropout_rng, and the mask keywords), and returns
`[B, T, N, Hv]`. A keyword the mechanism cannot honor is an error that names it, never ignored.

  name         paper
  softmax      Vaswani et al. 2017, "Attention Is All You Need"
  local        Beltagy et al. 2020 (Longformer sliding window); Child et al. 2019
  chunked      block-local attention (Parmar et al. 2018; Llama 4's chunked attention)
  bigbird      Zaheer et al. 2020, "Big Bird: Transformers for Longer Sequences"
  longformer   Beltagy et al. 2020, "Longformer: The Long-Document Transformer"
  linear       Katharopoulos et al. 2020, "Transformers are RNNs"
  performer    Choromanski et al. 2021, "Rethinking Attention with Performers" (FAVOR+)
  linformer    Wang et al. 2020, "Linformer: Self-Attention with Linear Complexity"
  cosine       Liu et al. 2022, "Swin Transformer V2" (scaled cosine attention)
  sigmoid      Ramapuram et al. 2024, "Theory, Analysis, and Best Practices for Sigmoid
               Self-Attention"
  sinks        Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks"
               (as a learned per-head sink logit, as in gpt-oss)
"""

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attn.ops import linear, sparse, variants
from attn.ops.attention import dot_product_attention

Array = jax.Array


def _reject(name: str, **used: Any) -> None:
  """Raise if any keyword the mechanism cannot honor is set."""
  named = [key for key, value in used.items()
           if value is not None and value is not False and not (key == "dropout_rate"
                                                                and value == 0.0)]
  if named:
    raise ValueError(f"attention={name!r} does not support {', '.join(sorted(named))}; use "
                     f"attention='softmax' (or a mask-based variant) for those.")


class Softmax(nn.Module):
  """`dot_product_attention` with every keyword it takes."""

  @nn.compact
  def __call__(self, query: Array, key: Array, value: Array, **kwargs: Any) -> Array:
    return dot_product_attention(query, key, value, **kwargs)


class Local(nn.Module):
  """Sliding-window softmax attention; `window` = w or (left, right)."""

  window: int | tuple[int, int] = (128, 0)

  @nn.compact
  def __call__(self, query: Array, key: Array, value: Array, **kwargs: Any) -> Array:
    kwargs.setdefault("local_window_size", self.window)
    return dot_product_attention(query, key, value, **kwargs)


class Chunked(nn.Module):
  """Causal softmax attention inside chunks of `chunk_size` positions."""

  chunk_size: int = 128

  @nn.compact
  def __call__(self, query: Array, key: Array, value: Array, **kwargs: Any) -> Array:
    kwargs.setdefault("chunk_size", self.chunk_size)
    return dot_product_attention(query, key, value, **kwargs)


class BigBird(nn.Module):
  """Softmax attention under the block-sparse global + window + random pattern."""

  block_size: int = 64
  num_window_blocks: int = 3
  num_global_blocks: int = 1
  num_random_blocks: int = 2
  seed: int = 0

  @nn.compact
  def __call__(self, query: Array, key: Array, value: Array, *, mask: Array | None = None,
               **kwargs: Any) -> Array:
    pattern = sparse.bigbird_mask(
        query.shape[1], key.shape[1], block_size=self.block_size,
        num_window_blocks=self.num_window_blocks, num_global_blocks=self.num_global_blocks,
        num_random_blocks=self.num_random_blocks, seed=self.seed)
    mask = pattern if mask is None else jnp.logical_and(mask, pattern)
    return dot_product_attention(query, key, value, mask=mask, **kwargs)


class Longformer(nn.Module):
  """Sliding window plus the first `num_global_tokens` positions as global tokens."""

  window: int | tuple[int, int] = 128
  num_global_tokens: int = 1

  @nn.compact
  def __call__(self, query: Array, key: Array, value: Array, *, mask: Array | None = None,
               **kwargs: Any) -> Array:
    if query.shape[1] != key.shape[1]:
      raise ValueError(f"attention='longformer' is self-attention (T == S); got T = "
                       f"{query.shape[1]}, S = {key.shape[1]}.")
    is_global = jnp.arange(query.shape[1])[None, :] < self.num_global_tokens
    pattern = sparse.longformer_mask(jnp.broadcast_to(is_global, query.shape[:2]), self.window)
    mask = pattern if mask is None else jnp.logical_and(mask, pattern)
    return dot_product_attention(query, key, value, mask=mask, **kwargs)


def _linear_kwargs(name: str, kwargs: dict) -> dict:
  """The keywords linear mechanisms honor (causal, key lengths); reject the rest."""
  kwargs = dict(kwargs)
  kwargs.pop("implementation", None)
  kwargs.pop("dropout_rng", None)
  keep = {"is_causal": kwargs.pop("is_causal", False),
          "key_value_seq_lengths": kwargs.pop("key_value_seq_lengths", None)}
  _reject(name, **kwargs)
  return keep


class Linear(nn.Module):
  """Linear attention with the elu + 1 feature map (causal: chunk-wise prefix sums)."""

  chunk_size: int = 64

  @nn.compact
  def __call__(self, query: Array, key: Array, value: Array, **kwargs: Any) -> Array:
    return linear.linear_attention(query, key, value, chunk_size=self.chunk_size,
                                   **_linear_kwargs("linear", kwargs))


class Performer(nn.Module):
  """FAVOR+ with `num_features` positive orthogonal random features.

  The features are fixed by `seed` unless a 'features' rng is given
  (`apply(..., rngs={'features': key})`): pass a new key every N steps to redraw them, as the
  paper does during training.
  """

  num_features: int = 256
  chunk_size: int = 64
  seed: int = 0

  @nn.compact
  def __call__(self, query: Array, key: Array, value: Array, *, scale: float | None = None,
               **kwargs: Any) -> Array:
    rng = self.make_rng("features") if self.has_rng("features") else jax.random.key(self.seed)
    projection = linear.orthogonal_random_features(rng, self.num_features, query.shape[-1])
    return linear.performer_attention(query, key, value, projection, scale=scale,
                                      chunk_size=self.chunk_size,
                                      **_linear_kwargs("performer", kwargs))


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


ATTENTION: dict[str, type[nn.Module]] = {
    "softmax": Softmax,
    "local": Local,
    "chunked": Chunked,
    "bigbird": BigBird,
    "longformer": Longformer,
    "linear": Linear,
    "performer": Performer,
    "linformer": Linformer,
    "cosine": Cosine,
    "sigmoid": Sigmoid,
    "sinks": Sinks,
}


def make_attention(attention: str, options: Mapping[str, Any] | None = None,
                   **module_kwargs: Any) -> nn.Module:
  """The core module for `attention` built with `options`; unknown names list the valid ones."""
  if attention not in ATTENTION:
    raise ValueError(f"attention={attention!r} is unknown; choose one of {sorted(ATTENTION)}.")
  try:
    return ATTENTION[attention](**dict(options or {}), **module_kwargs)
  except TypeError as e:
    raise ValueError(f"attention_options {dict(options or {})} do not fit "
                     f"attention={attention!r}: {e}") from e
