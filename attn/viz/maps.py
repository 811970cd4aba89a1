"""Attention-map figures: per-head grids, cross-attention alignments, ViT rollout, and a PNG.

Shapes: L layers, B batch, N heads, T query length, S key length.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from matplotlib.figure import Figure

from attn import storage
from attn.viz.capture import attention_rollout, capture_attention, stack_layers
from attn.viz.runs import new_figure

# Past this many tokens an axis labels every k-th token only: below it every label stays legible.
MAX_LABELS = 64
_SPECIAL = {0: "<pad>", 1: "<s>", 2: "</s>"}  # the attn.data id convention
_VISIBLE = {" ": "\u2423", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def token_labels(ids: Sequence[int] | np.ndarray, tokenizer: Any = None) -> list[str]:
  """One short, visible label per token id: special ids named, whitespace and other control
  characters shown (a DEL or NUL byte has no glyph in matplotlib's fonts: it warned)."""
  labels = []
  for i in np.asarray(ids).reshape(-1).tolist():
    if i in _SPECIAL:
      labels.append(_SPECIAL[i])
    elif tokenizer is None:
      labels.append(str(i))
    else:
      text = tokenizer.decode([i])
      # A lone byte of a multi-byte character decodes to U+FFFD: show the id instead.
      visible = "".join(_VISIBLE.get(c, c if c.isprintable() else f"\\x{ord(c):02x}")
                        for c in text)
      labels.append(visible if visible and "\ufffd" not in visible else f"#{i}")
  return labels


def _panel_layout(rows: int, cols: int, t: int, s: int) -> tuple[float, float, float]:
  """(panel width, panel height, label font size): ~0.12 in per token keeps 64 labels legible."""
  width = min(8.0, max(1.8, 0.12 * s))
  height = min(8.0, max(1.8, 0.12 * t))
  fontsize = float(np.clip(0.65 * 72 * min(width / s, height / t), 4.0, 9.0))
  return width, height, fontsize


def _set_ticks(ax: Any, axis: str, labels: Sequence[str] | None, n: int, fontsize: float) -> None:
  if labels is None:
    getattr(ax, f"set_{axis}ticks")([])
    return
  if len(labels) != n:
    raise ValueError(f"{len(labels)} token labels for an axis of {n} tokens.")
  step = math.ceil(n / MAX_LABELS)
  ticks = list(range(0, n, step))
  getattr(ax, f"set_{axis}ticks")(ticks, [labels[i] for i in ticks], fontsize=fontsize,
                                  rotation=90 if axis == "x" else 0)


def _as_layers(weights: Any, example: int) -> tuple[np.ndarray, list[str]]:
  """Any accepted weights input -> (`[L, N, T, S]` of one example, row names)."""
  if isinstance(weights, Mapping):
    names = list(weights)
    arrays = [np.asarray(weights[n], np.float32) for n in names]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
      raise ValueError(f"captured weights of different shapes {sorted(shapes)}; pick one kind "
                       "with stack_layers() or a dict of matching entries.")
    return np.stack([a[example] for a in arrays]), names
  weights = np.asarray(weights, np.float32)
  if weights.ndim == 5:
    weights = weights[:, example]
  elif weights.ndim < 2 or weights.ndim > 5:
    raise ValueError(f"weights must be [L, B, N, T, S], [L, N, T, S], [N, T, S] or [T, S], got "
                     f"shape {weights.shape}.")
  weights = weights.reshape((1,) * (4 - weights.ndim) + weights.shape)
  return weights, [f"layer {i}" for i in range(weights.shape[0])]


def attention_grid(weights: Any, tokens: Sequence[str] | None = None, *,
                   key_tokens: Sequence[str] | None = None, layers: Sequence[int] | None = None,
                   heads: Sequence[int] | None = None, example: int = 0,
                   vmax: float | None = None, cmap: str = "viridis",
                   title: str | None = None) -> Figure:
  """A layers x heads grid of attention heatmaps (queries down, keys across).

  Args:
    weights: `[L, B, N, T, S]` (`stack_layers`), `[L, N, T, S]`, `[N, T, S]`, `[T, S]`, or
      `capture_attention`'s dict (one row per entry, named by its path).
    tokens: the T query labels (`token_labels`); None hides them.
    key_tokens: the S key labels; default `tokens` when S == T.
    layers, heads: the rows and columns to draw (default all).
    example: the batch row drawn from 5-D weights or a dict.
    vmax: a shared color scale [0, vmax] with a colorbar; None scales each panel to its own
      maximum, which shows diffuse heads as clearly as sharp ones.
    cmap: matplotlib colormap.
    title: figure title.

  Returns:
    A Figure with one axes per (layer, head) in row-major order (plus a colorbar with vmax).
    Query labels sit on the first column, key labels on the last row.
  """
  stacked, names = _as_layers(weights, example)
  layers = list(range(stacked.shape[0])) if layers is None else list(layers)
  heads = list(range(stacked.shape[1])) if heads is None else list(heads)
  t, s = stacked.shape[-2:]
  if key_tokens is None and tokens is not None and s == t:
    key_tokens = tokens
  width, height, fontsize = _panel_layout(len(layers), len(heads), t, s)
  fig = new_figure(width * len(heads) + 0.8, height * len(layers) + 0.6)
  axes = fig.subplots(len(layers), len(heads), squeeze=False)
  image = None
  for r, layer in enumerate(layers):
    for c, head in enumerate(heads):
      ax, panel = axes[r, c], stacked[layer, head]
      top = vmax if vmax is not None else max(float(panel.max()), 1e-9)
      image = ax.imshow(panel, cmap=cmap, vmin=0.0, vmax=top, interpolation="nearest",
                        aspect="auto")
      _set_ticks(ax, "y", tokens if c == 0 else None, t, fontsize)
      _set_ticks(ax, "x", key_tokens if r == len(layers) - 1 else None, s, fontsize)
      if r == 0:
        ax.set_title(f"head {head}", fontsize=9)
      if c == 0:
        ax.set_ylabel(names[layer], fontsize=9)
  if vmax is not None and image is not None:
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight")
  if title:
    fig.suptitle(title)
  return fig


def cross_attention_figure(weights: Any, source_tokens: Sequence[str] | None,
                           target_tokens: Sequence[str] | None, *,
                           layers: Sequence[int] | None = None, head: int | None = None,
                           example: int = 0, cmap: str = "Blues",
                           title: str | None = None) -> Figure:
  """Encoder-decoder alignment: one panel per decoder layer, target tokens down, source across.

  Args:
    weights: cross-attention `[L, B, N, T, S]` (`stack_layers(w, "cross_attention")`),
      `[L, N, T, S]`, `[N, T, S]` or `[T, S]`.
    source_tokens: the S source labels. target_tokens: the T decoder-input labels.
    layers: which layers to draw (default all).
    head: one head, or None for the mean over heads (the usual alignment view).
    example: the batch row drawn from 5-D weights.
    cmap: matplotlib colormap. title: figure title.

  Returns:
    A Figure with one axes per drawn layer, each with both token axes labeled.
  """
  stacked, names = _as_layers(weights, example)
  layers = list(range(stacked.shape[0])) if layers is None else list(layers)
  t, s = stacked.shape[-2:]
  width, height, fontsize = _panel_layout(1, len(layers), t, s)
  fig = new_figure(width * len(layers) + 0.8, height + 0.9)
  axes = fig.subplots(1, len(layers), squeeze=False)[0]
  for ax, layer in zip(axes, layers, strict=True):
    panel = stacked[layer].mean(0) if head is None else stacked[layer, head]
    ax.imshow(panel, cmap=cmap, vmin=0.0, vmax=max(float(panel.max()), 1e-9),
              interpolation="nearest", aspect="auto")
    _set_ticks(ax, "y", target_tokens, t, fontsize)
    _set_ticks(ax, "x", source_tokens, s, fontsize)
    ax.set_title(f"{names[layer]}, " + ("mean of heads" if head is None else f"head {head}"),
                 fontsize=9)
    ax.set_xlabel("source", fontsize=9)
  axes[0].set_ylabel("target", fontsize=9)
  if title:
    fig.suptitle(title)
  return fig


def mechanism_maps(weights: Mapping[str, Any], tokens: Sequence[str] | None = None, *,
                   layer: int = -1, head: int | None = None, example: int = 0,
                   title: str | None = None) -> Figure:
  """One mechanism per panel, side by side: softmax's attention and the implicit T x T maps of
  linear / performer / Gated DeltaNet (what `record_weights` gives: the matrix their parallel
  form multiplies the values by) on the same tokens.

  Args:
    weights: mechanism name -> its captured weights (`stack_layers` `[L, B, N, T, S]`, or any
      form `attention_grid` takes).
    tokens: the T labels (`token_labels`), or None.
    layer: the layer drawn from each (default the last).
    head: one head, or None for the mean over heads.
    example: the batch row drawn from 5-D weights.
    title: figure title.

  Returns:
    A Figure with one axes per mechanism. A map with negative entries (the delta rule's can
    have them) is drawn on a diverging scale centred on zero, the others on [0, max].
  """
  panels = {}
  for name, w in weights.items():
    stacked, _ = _as_layers(w, example)
    panels[name] = stacked[layer].mean(0) if head is None else stacked[layer, head]
  t, s = next(iter(panels.values())).shape
  width, height, fontsize = _panel_layout(1, len(panels), t, s)
  fig = new_figure(width * len(panels) + 0.8, height + 0.9)
  axes = fig.subplots(1, len(panels), squeeze=False)[0]
  for i, (ax, (name, panel)) in enumerate(zip(axes, panels.items(), strict=True)):
    top = max(float(np.abs(panel).max()), 1e-9)
    signed = bool((panel < 0).any())
    image = ax.imshow(panel, cmap="RdBu_r" if signed else "viridis",
                      vmin=-top if signed else 0.0, vmax=top, interpolation="nearest",
                      aspect="auto")
    if signed:
      fig.colorbar(image, ax=ax, shrink=0.6)
    _set_ticks(ax, "y", tokens if i == 0 else None, t, fontsize)
    _set_ticks(ax, "x", tokens if s == t else None, s, fontsize)
    ax.set_title(f"{name}, " + ("mean of heads" if head is None else f"head {head}"),
                 fontsize=9)
  if title:
    fig.suptitle(title)
  return fig


def patch_relevance(weights: np.ndarray, grid: tuple[int, int], *, cls_token: bool = True,
                    head_fusion: str = "mean") -> np.ndarray:
  """ViT rollout as a patch map `[B, grid_h, grid_w]` (each map sums to 1).

  With a CLS token its row of the rollout is the relevance (the classifier reads it); without
  one (mean or attention pooling) the mean of all rows is.
  """
  rollout = attention_rollout(weights, head_fusion=head_fusion)
  if rollout.ndim == 2:
    rollout = rollout[None]
  relevance = rollout[:, 0, 1:] if cls_token else rollout.mean(axis=1)
  relevance = relevance / np.maximum(relevance.sum(-1, keepdims=True), 1e-12)
  if relevance.shape[-1] != grid[0] * grid[1]:
    raise ValueError(f"{relevance.shape[-1]} patch tokens do not fill a {grid} grid; check "
                     "cls_token and the patch size.")
  return relevance.reshape(-1, *grid)


def _display_image(image: np.ndarray) -> np.ndarray:
  """[H, W, C] in any range -> [H, W] or [H, W, 3] in [0, 1] for imshow."""
  image = np.asarray(image, np.float32)
  low, high = float(image.min()), float(image.max())
  image = (image - low) / (high - low) if high > low else np.zeros_like(image)
  return image[..., 0] if image.shape[-1] == 1 else image


def vit_rollout_figure(images: np.ndarray, weights: np.ndarray, *, patch_size: int,
                       cls_token: bool = True, labels: Sequence[str] | None = None,
                       head_fusion: str = "mean", alpha: float = 0.6,
                       title: str | None = None) -> Figure:
  """Images (top row) and their attention rollout overlaid (bottom row), one column each.

  Args:
    images: `[B, H, W, C]` (or one `[H, W, C]`), any value range.
    weights: the ViT's self-attention `[L, B, N, T, T]` (`stack_layers(w, stack="encoder")`).
    patch_size: the model's patch size (model.patch_size).
    cls_token: the model prepends a CLS token (pooling="cls").
    labels: a caption per image (e.g. "label 3, predicted 3").
    head_fusion: "mean", "max" or "min" over heads. alpha: overlay opacity. title: figure title.

  Returns:
    A Figure with 2 x B axes.
  """
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[None]
  height, width = images.shape[1:3]
  grid = (height // patch_size, width // patch_size)
  relevance = patch_relevance(weights, grid, cls_token=cls_token, head_fusion=head_fusion)
  if relevance.shape[0] != images.shape[0]:
    raise ValueError(f"{images.shape[0]} images but weights for {relevance.shape[0]}.")
  fig = new_figure(2.0 * images.shape[0] + 0.4, 4.4)
  axes = fig.subplots(2, images.shape[0], squeeze=False)
  for b, image in enumerate(images):
    shown = _display_image(image)
    heat = np.kron(relevance[b], np.ones((patch_size, patch_size)))
    axes[0, b].imshow(shown, cmap="gray", interpolation="nearest")
    axes[1, b].imshow(shown, cmap="gray", interpolation="nearest")
    axes[1, b].imshow(heat / max(float(heat.max()), 1e-12), cmap="inferno", alpha=alpha,
                      interpolation="nearest")
    if labels is not None:
      axes[0, b].set_title(labels[b], fontsize=9)
    for ax in axes[:, b]:
      ax.set_xticks([])
      ax.set_yticks([])
  axes[0, 0].set_ylabel("input", fontsize=9)
  axes[1, 0].set_ylabel("rollout", fontsize=9)
  if title:
    fig.suptitle(title)
  return fig


def save_attention_png(model: nn.Module, params: Any, tokens: str | Sequence[int] | np.ndarray,
                       path: str, tokenizer: Any = None, *, max_tokens: int = 48,
                       bos_id: int = 1) -> str:
  """Draws the self-attention of every layer and head on one sample and writes it as a PNG.

  Args:
    model: a model that takes token ids `[B, T]` (lm, encoder, classifier; an encoder-decoder
      shows its encoder) or a ViT (then `tokens` is one image `[H, W, C]`).
    params: its parameters (or variables).
    tokens: ids `[T]`, or text when a tokenizer is given (encoded after a bos id).
    path: the PNG to write; its directory is created.
    tokenizer: labels the tokens (and encodes text).
    max_tokens: longer samples are cut to their first `max_tokens` tokens (legibility).
    bos_id: prepended to encoded text.

  Returns:
    `path`.
  """
  from attn.models import EncoderDecoder, ViT  # Deferred: models import the whole layer stack.

  if isinstance(model, ViT):
    image = np.asarray(tokens, np.float32)
    weights = stack_layers(capture_attention(model, params, image[None]), stack="encoder")
    fig = vit_rollout_figure(image, weights, patch_size=model.config.patch_size,
                             cls_token=model.config.pooling == "cls", title="attention rollout")
  else:
    if isinstance(tokens, str):
      if tokenizer is None:
        raise ValueError("save_attention_png got text but no tokenizer to encode it.")
      tokens = np.concatenate([[bos_id], tokenizer.encode(tokens)])
    ids = np.asarray(tokens, np.int32).reshape(-1)[:max_tokens]
    method = EncoderDecoder.encode if isinstance(model, EncoderDecoder) else None
    captured = capture_attention(model, params, ids[None], method=method)
    weights = stack_layers(captured, "self_attention")
    labels = token_labels(ids, tokenizer)
    if weights.shape[-1] == len(ids) + 1:  # a classifier's prepended CLS token
      labels = ["<cls>", *labels]
    fig = attention_grid(weights, labels,
                         title=f"{type(model).__name__} self-attention ({len(ids)} tokens)")
  if jax.process_index() == 0:
    storage.save_figure(fig, path, dpi=100)  # `path` may be a bucket URL.
  return path
