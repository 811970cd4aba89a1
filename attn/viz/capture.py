"""Record the attention weights of every layer of a model, and combine them (rollout).

    weights = capture_attention(model, params, tokens)   # {"decoder/layer_0/self_attention": ...}
    stacked = stack_layers(weights, "self_attention")     # [L, B, N, T, S]

Capture works whatever attention implementation trained the model (xla, blockwise, cudnn,
Pallas): each `MultiHeadAttention` call is re-run as a clone with `record_weights=True`, bound to
the same scope (so the same parameters), which recomputes the weights on the reference path.
Nothing in the model or its config changes, and its outputs are the same. Mechanisms whose
registry entry has no map (`weights=False`: linear, performer, ...) are not recorded.

Shapes: L layers, B batch, N heads, T query length, S key length. Everything returned is
float32 NumPy (figures and notebooks want host arrays).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from attn.layers import MultiHeadAttention, registry

_SOWN_NAME = "attention_weights"
# `layer_3` (looped stacks) or `layers` (an nn.scan stack, weights stacked on axis 0).
_LAYER_RE = re.compile(r"^layer_(\d+)$")
_SCANNED = "layers"


def _recording_interceptor(next_fun: Callable[..., Any], args: tuple, kwargs: dict,
                           context: nn.module.InterceptorContext) -> Any:
  """Runs every MultiHeadAttention call as a recording clone of itself."""
  module = context.module
  if (isinstance(module, MultiHeadAttention) and context.method_name == "__call__"
      and not module.record_weights and registry.get(module.attention).weights):
    # Bound to the original's scope: same parameters, same cache, and the sown weights land
    # under the original's path. Flax binds `apply`'s root module to a scope the same way.
    recording = module.clone(parent=module.scope, record_weights=True)
    return recording(*args, **kwargs)
  return next_fun(*args, **kwargs)


def _variables(params: Any) -> dict[str, Any]:
  """Accepts a params tree or a full variables dict ({'params': ..., 'batch_stats': ...})."""
  params = nn.meta.unbox(params)
  if isinstance(params, Mapping) and "params" in params:
    return dict(params)
  return {"params": params}


def capture_attention(model: nn.Module, params: Any, *args: Any,
                      method: Callable[..., Any] | str | None = None,
                      **kwargs: Any) -> dict[str, np.ndarray]:
  """Runs `model` on its inputs and returns the attention weights of every attention module.

  Args:
    model: any attn model (LanguageModel, EncoderDecoder, SequenceClassifier, ViT, ...).
    params: its parameters, or a variables dict with 'params' (and 'batch_stats').
    *args: the model's positional inputs, e.g. tokens `[B, T]`; for an EncoderDecoder,
      `(inputs, decoder_inputs)`; for a ViT, images `[B, H, W, C]`.
    method: a method of the model to run instead of `__call__` (e.g. `EncoderDecoder.encode`).
    **kwargs: the model's keyword inputs (segment_ids, positions, ...).

  Returns:
    `{path: weights [B, N, T, S]}`, one entry per attention call, keyed by module path
    ("decoder/layer_1/cross_attention"; a module called twice adds "#1", "#2", ...).
    Scanned stacks are split per layer and named like looped ones
    ("encoder/layer_0/self_attention").
  """
  variables = _variables(params)
  # Arrays are traced; flags such as deterministic=True stay Python values.
  arrays = {k: v for k, v in kwargs.items() if isinstance(v, (np.ndarray, jax.Array))}
  static = {k: v for k, v in kwargs.items() if k not in arrays}

  def run(variables: dict[str, Any], args: tuple, arrays: dict[str, Any]) -> Any:
    with nn.intercept_methods(_recording_interceptor):
      _, state = model.apply(variables, *args, method=method, mutable=["intermediates"],
                             **arrays, **static)
    return state.get("intermediates", {})

  # jit: one compilation instead of op-by-op dispatch through the whole model.
  sown = jax.device_get(jax.jit(run)(variables, args, arrays))
  return _flatten(sown)


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
  """Sown `{..., 'attention_weights': (w,)}` trees -> `{path: w}`, scanned stacks split."""
  out: dict[str, np.ndarray] = {}
  for name, value in tree.items():
    if name == _SOWN_NAME:
      for i, weights in enumerate(value):  # one entry per call of the same module
        path = "/".join(prefix) + (f"#{i}" if i else "")
        out.update(_split_scanned(path, np.asarray(weights, np.float32)))
    elif isinstance(value, Mapping):
      out.update(_flatten(value, (*prefix, name)))
  return out


def _split_scanned(path: str, weights: np.ndarray) -> dict[str, np.ndarray]:
  parts = path.split("/")
  if _SCANNED not in parts:
    return {path: weights}
  # nn.scan stacks every sown value on a leading layer axis.
  i = parts.index(_SCANNED)
  return {"/".join(parts[:i] + [f"layer_{n}"] + parts[i + 1:]): w for n, w in enumerate(weights)}


def stack_layers(weights: Mapping[str, np.ndarray], kind: str = "self_attention",
                 stack: str | None = None) -> np.ndarray:
  """Stacks the captured `[B, N, T, S]` of one stack's layers into `[L, B, N, T, S]`.

  Args:
    weights: `capture_attention`'s result.
    kind: the attention module's name: "self_attention" or "cross_attention".
    stack: "encoder" or "decoder"; None is fine when only one stack has `kind` modules.

  Returns:
    The layers in depth order.
  """
  found: dict[str, list[tuple[int, np.ndarray]]] = {}
  for path, value in weights.items():
    parts = path.split("/")
    if len(parts) < 3 or parts[-1] != kind or not _LAYER_RE.match(parts[-2]):
      continue
    name = "/".join(parts[:-2])
    if stack is None or name == stack or name.endswith("/" + stack):
      found.setdefault(name, []).append((int(_LAYER_RE.match(parts[-2]).group(1)), value))
  if len(found) != 1:
    available = sorted({p.rsplit("/", 2)[0] + " " + p.rsplit("/", 1)[-1] for p in weights})
    problem = "no" if not found else f"several ({sorted(found)})"
    raise ValueError(f"{problem} stacks with {kind!r} layers (stack={stack!r}); captured: "
                     f"{available}.")
  layers = sorted(next(iter(found.values())), key=lambda item: item[0])
  return np.stack([value for _, value in layers])


def attention_rollout(weights: np.ndarray, *, head_fusion: str = "mean",
                      residual: bool = True) -> np.ndarray:
  """Attention rollout (Abnar & Zuidema 2020): how much each input token feeds each output.

  Each layer's heads are fused, the residual connection is modeled as 0.5 A + 0.5 I (rows
  renormalized), and the layers are multiplied from the first to the last, so entry [t, s] is
  the share of input token s in the last layer's token t.

  Args:
    weights: self-attention `[L, B, N, T, T]` (or `[L, N, T, T]` for one example).
    head_fusion: "mean", "max" or "min" over heads.
    residual: add the identity for the skip connection (the paper's choice).

  Returns:
    `[B, T, T]` (or `[T, T]`), rows summing to 1.
  """
  weights = np.asarray(weights, np.float64)
  if weights.ndim == 4:
    return attention_rollout(weights[:, None], head_fusion=head_fusion, residual=residual)[0]
  if weights.ndim != 5 or weights.shape[-1] != weights.shape[-2]:
    raise ValueError(f"rollout needs self-attention weights [L, B, N, T, T], got {weights.shape}.")
  fusions = {"mean": np.mean, "max": np.max, "min": np.min}
  if head_fusion not in fusions:
    raise ValueError(f"head_fusion={head_fusion!r} is not one of {sorted(fusions)}.")
  fused = fusions[head_fusion](weights, axis=2)  # [L, B, T, T]
  length = fused.shape[-1]
  if residual:
    fused = 0.5 * fused + 0.5 * np.eye(length)
  fused = fused / np.maximum(fused.sum(-1, keepdims=True), 1e-12)
  rollout = np.broadcast_to(np.eye(length), fused.shape[1:]).copy()
  for layer in fused:
    rollout = layer @ rollout
  return rollout.astype(np.float32)
