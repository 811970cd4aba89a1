"""Which implementation `dot_product_attention` runs: what each backend has, what each path
cannot run, and the automatic choice with its logged fallbacks.

Kept apart from the op so that the rules (and the known cuDNN traps) read in one place; the
tests pretend to be on an NVIDIA GPU or a TPU by patching `is_nvidia_gpu` / `is_tpu` here.
"""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from attn.ops import support
from attn.ops.pallas import pallas_unsupported_reason
from attn.ops.splash import splash_unsupported_reason

Array = jax.Array

# Every implementation this module knows; `available_implementations()` says which run here.
IMPLEMENTATIONS = ("xla", "blockwise", "cudnn", "pallas")
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
_CUDNN_MAX_HEAD_DIM = 128
# Auto picks 'blockwise' when the float32 logits of one call would take more than this...
_BLOCKWISE_MIN_LOGITS_BYTES = 2**30
# ...and on CPU already from this T x S: there XLA's path is bound by memory traffic over the
# T x S matrix, and the tiled loop measured 1.6x to 2.3x faster (forward and forward+backward,
# causal or not) at T = S = 1024 (B=1, N=4, H=64; experiments/benchmarks/attention.py), but
# not faster at T = 512.
_CPU_BLOCKWISE_MIN_LOGITS = 1024 * 1024
# Where cuDNN cannot run (packed segment ids, above all), auto picks the Pallas Triton kernel on
# an NVIDIA GPU for the inputs it was verified with on hardware (tests/ops/test_hardware.py on
# an H200, jax 0.11.2: causal and packed segments against the float64 oracle): bfloat16 at
# head_dim 128. There it measured 0.44-0.48x jax.nn's forward+backward time from T=2048, against
# 1.05-1.08x for the xla path and 1.0-1.2x for blockwise, and the gpt350m train step (packed
# batches) took 166 ms instead of 283 ms (experiments/benchmarks/results/*_h200.json).
_PALLAS_GPU_AUTO_DTYPES = (jnp.bfloat16,)
_PALLAS_GPU_AUTO_HEAD_DIMS = (128,)

_log = logging.getLogger(__name__)


def is_nvidia_gpu() -> bool:
  if jax.default_backend() != "gpu":
    return False
  version = getattr(jax.devices()[0].client, "platform_version", "") or ""
  return "rocm" not in version.lower()


def is_tpu() -> bool:
  return jax.default_backend() == "tpu"


def available_implementations() -> tuple[str, ...]:
  """The implementations that run on the default backend, best first after 'xla'."""
  if is_nvidia_gpu():
    return ("xla", "blockwise", "cudnn", "pallas")
  if is_tpu():
    return ("xla", "blockwise", "pallas")
  return ("xla", "blockwise")


def cudnn_unsupported_reason(
    *,
    query: Array,
    key: Array,
    value: Array,
    bias=None,
    mask=None,
    softcap: float | None = None,
    segment_ids=None,
    prefix_lengths=None,
    chunk_size: int | None = None,
    dropout_rate: float = 0.0,
    return_weights: bool = False,
    is_causal: bool = False,
    local_window_size: tuple[int, int] | None = None,
    **_,  # sequence lengths: cuDNN takes them
) -> str | None:
  """Why JAX's cuDNN flash attention cannot run these arguments, or None if it can.

  Besides what cuDNN lacks, this refuses the cases where `jax.nn`'s cuDNN path is known to be
  silently wrong or to fail, so that they fall back to our own paths:
  - packed sequences: segment ids are not passed to cuDNN at all (boundaries ignored);
  - a sliding window without `is_causal`: only the left bound reaches cuDNN, so queries attend
    to the whole future (jax-ml/jax PR 39576, open);
  - causal with T != S: not verified here on hardware that cuDNN aligns it top-left like
    `masks` (decoding with a cache passes an explicit mask instead);
  - a mask or bias not spelled out over [T, S]: the cuDNN path copies the mask into a bias
    and rejects broadcast shapes (jax-ml/jax issue 28974).
  """
  if query.dtype not in _CUDNN_DTYPES:
    return f"cuDNN flash attention needs bfloat16 or float16 inputs, got {query.dtype}"
  head_dim = query.shape[-1]
  if head_dim > _CUDNN_MAX_HEAD_DIM or head_dim % 8:
    return f"head_dim must be a multiple of 8 and <= {_CUDNN_MAX_HEAD_DIM}, got {head_dim}"
  if key.shape[-1] != value.shape[-1]:
    return "key and value head dims differ"
  reason = support.unsupported("cuDNN path", {
      "softcap": softcap is not None,
      "segment_ids (cuDNN would ignore the packed-segment boundaries)": segment_ids is not None,
      "prefix_lengths": prefix_lengths is not None,
      "chunk_size": chunk_size is not None,
      "dropout_rate": dropout_rate > 0.0,
      "return_weights": return_weights,
  })
  if reason is not None:
    return reason
  if local_window_size is not None and not is_causal:
    return ("jax.nn's cuDNN path passes only the left bound of a sliding window, so without "
            "is_causal=True it would attend to the future")
  q_len, kv_len = query.shape[1], key.shape[1]
  if is_causal and q_len != kv_len:
    return f"causal attention with T != S ({q_len} vs {kv_len}) is not verified on cuDNN"
  for name, x in (("mask", mask), ("bias", bias)):
    if x is not None and tuple(np.shape(x)[-2:]) != (q_len, kv_len):
      return (f"cuDNN needs the {name} over the full [T, S] = [{q_len}, {kv_len}], got shape "
              f"{tuple(np.shape(x))}")
  return None


def blockwise_unsupported_reason(
    *, dropout_rate: float = 0.0, return_weights: bool = False, **_
) -> str | None:
  """Why the blockwise path cannot run these arguments, or None if it can."""
  return support.unsupported("blockwise never forms the weights, so it", {
      "dropout_rate": dropout_rate > 0.0, "return_weights": return_weights})


def _prefer_blockwise(*, query: Array, key: Array, **features) -> bool:
  """Auto: blockwise when the logits would be too large, or on CPU when it is faster."""
  if blockwise_unsupported_reason(**features) is not None:
    return False
  batch, q_len, num_heads, _ = query.shape
  logits = q_len * key.shape[1]
  if batch * num_heads * logits * 4 > _BLOCKWISE_MIN_LOGITS_BYTES:
    return True
  return jax.default_backend() == "cpu" and logits >= _CPU_BLOCKWISE_MIN_LOGITS


def _auto_picks_pallas_on_gpu(*, query: Array, **features) -> bool:
  """Whether auto may use the Pallas GPU kernel: verified dtype and head_dim, and it can run."""
  return (query.dtype in _PALLAS_GPU_AUTO_DTYPES
          and query.shape[-1] in _PALLAS_GPU_AUTO_HEAD_DIMS
          and pallas_unsupported_reason(query=query, **features) is None)


def choose_implementation(implementation: str | None, **features) -> str:
  """Resolve `implementation`; explicit choices that cannot run raise, None falls back."""
  available = available_implementations()
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"implementation={implementation!r} is unknown; choose one of {IMPLEMENTATIONS} "
        f"(on this backend: {available}) or None for the best available."
    )
  if implementation == "xla":
    return "xla"
  if implementation is not None and implementation not in available:
    raise ValueError(
        f"implementation={implementation!r} is not available on backend "
        f"{jax.default_backend()!r}; available here: {available}. Use None to pick the best "
        f"available automatically."
    )
  checks = {"blockwise": blockwise_unsupported_reason,
            "pallas": splash_unsupported_reason if is_tpu() else pallas_unsupported_reason}
  if implementation in checks:
    reason = checks[implementation](**features)
    if reason is not None:
      raise ValueError(f"implementation={implementation!r} cannot run these arguments: "
                       f"{reason}.")
    return implementation
  # Auto never picks the TPU splash kernel (it has run in Pallas interpret mode only, never on
  # a TPU); on an NVIDIA GPU it picks the Triton kernel where cuDNN cannot run, within the
  # verified inputs (_PALLAS_GPU_AUTO_DTYPES, _PALLAS_GPU_AUTO_HEAD_DIMS).
  fallback = "blockwise" if _prefer_blockwise(**features) else "xla"
  if "cudnn" in available:
    reason = cudnn_unsupported_reason(**features)
    if reason is None:
      return "cudnn"
    if implementation == "cudnn":
      raise ValueError(f"implementation='cudnn' cannot run these arguments: {reason}.")
    if "pallas" in available and _auto_picks_pallas_on_gpu(**features):
      fallback = "pallas"
    _log_fallback_once(fallback, reason)
  return fallback


@functools.cache
def _log_fallback_once(fallback: str, reason: str, instead_of: str = "cudnn") -> None:
  _log.info("dot_product_attention: using %r instead of %r because %s.", fallback, instead_of,
            reason)


