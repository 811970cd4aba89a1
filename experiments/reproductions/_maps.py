"""Attention-map measurements on a finished reproduction run (not a claim: the runner skips
files starting with `_`): the run's model and last checkpoint, its eval rows, and the weights of
every layer (attn.viz.capture_attention, so the mechanism's own map: differential attention's
difference of two softmax maps, gated attention's softmax map before the gate).

Shapes: L layers, B rows, N heads, T query positions, S key positions (S = T, causal).
"""

from __future__ import annotations

import json
import os

import numpy as np


def eval_maps(run_dir: str, *, rows: int = 16) -> tuple[np.ndarray, np.ndarray]:
  """(weights [L, B, N, T, S], segment_ids [B, T]) of the run's model on its first eval rows,
  with the segments (packed documents) and positions the trainer gives it."""
  import ml_collections

  from attn import data, models, train, viz

  with open(os.path.join(run_dir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f)["config"])
  model = models.build(models.ModelConfig.from_config(config.model))
  params = train.checkpoint.load_params(run_dir)
  _, eval_iters, _ = data.make_iterators(config.data, global_batch_size=rows, seed=0)
  batch = next(eval_iters(num_batches=1))
  weights = viz.capture_attention(model, params, batch["inputs"],
                                  segment_ids=batch["segment_ids"], positions=batch["positions"])
  return viz.stack_layers(weights), np.asarray(batch["segment_ids"])


def _segment_starts(segment_ids: np.ndarray) -> np.ndarray:
  """[B, T]: the index of the first token of each token's segment (document)."""
  b, t = segment_ids.shape
  new = np.ones((b, t), bool)
  new[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
  return np.maximum.accumulate(np.where(new, np.arange(t)[None], 0), axis=1)


def first_token_mass(weights: np.ndarray, segment_ids: np.ndarray, *, min_keys: int = 2) -> float:
  """The mean attention weight on the first token of the query's segment (the attention sink
  position of Xiao et al. 2023 / Qiu et al. 2025), over layers, heads and the real (non-padding)
  queries that see at least `min_keys` keys of their segment."""
  weights = np.asarray(weights, np.float64)
  starts = _segment_starts(segment_ids)  # [B, T]
  b_idx, t_idx = np.indices(starts.shape)
  on_first = weights[:, b_idx, :, t_idx, starts]  # [B, T, L, N] (advanced indexing first)
  keep = (segment_ids > 0) & (t_idx - starts + 1 >= min_keys)
  return float(on_first[keep].mean())


def top_k_share(weights: np.ndarray, segment_ids: np.ndarray, *, k: int = 8,
                min_keys: int = 64) -> float:
  """The share of a query's absolute attention mass held by its k largest entries, averaged
  over layers, heads and the real queries that see at least `min_keys` keys of their segment
  (so every row has the same room to spread). 1.0 = all mass on k keys; a uniform row over S
  keys gives k / S. Absolute values, since differential attention's map has negative entries."""
  weights = np.abs(np.asarray(weights, np.float64))
  starts = _segment_starts(segment_ids)
  t_idx = np.arange(segment_ids.shape[1])[None]
  keep = (segment_ids > 0) & (t_idx - starts + 1 >= min_keys)  # [B, T]
  rows = np.moveaxis(weights, (1, 3), (0, 1))[keep]  # [rows, L, N, S]
  top = -np.sort(-rows, axis=-1)[..., :k].sum(-1)
  return float(np.mean(top / np.maximum(rows.sum(-1), 1e-12)))


def map_panel(ax, run_dir: str, title: str, *, layer: int = -1, size: int = 64) -> None:
  """One row's head-averaged map of `layer` (first `size` positions) on `ax`."""
  weights, _ = eval_maps(run_dir, rows=1)
  shown = weights[layer, 0].mean(0)[:size, :size]
  limit = float(np.abs(shown).max())
  ax.imshow(shown, cmap="RdBu_r", vmin=-limit, vmax=limit, interpolation="nearest")
  ax.set_title(title, fontsize=8)
  ax.set_xlabel("key")
  ax.set_ylabel("query")


def measure_figure(cells, metric: str, variants: dict[str, str], ylabel: str, title: str):
  """Bars of `metric` per attention variant (mean, std over seeds), then each variant's
  last-layer map (head mean, first 64 positions of the first eval row, first seed)."""
  from attn import viz

  fig = viz.new_figure(3.2 * (1 + len(variants)), 3.2)
  axes = fig.subplots(1, 1 + len(variants))
  stats = []
  for name in variants:
    cell = cells.find(attention=name)
    stats.append(cell.stats.get(metric, (float("nan"), None, 0)) if cell else
                 (float("nan"), None, 0))
  axes[0].bar(list(variants.values()), [m for m, _, _ in stats],
              yerr=[s or 0 for _, s, _ in stats], capsize=4, color=["tab:blue", "tab:orange"])
  axes[0].set_ylabel(ylabel)
  axes[0].set_title("seeds: " + ", ".join(f"{label} {n}" for label, (_, _, n)
                                          in zip(variants.values(), stats, strict=True)),
                    fontsize=8)
  for ax, (name, label) in zip(axes[1:], variants.items(), strict=True):
    cell = cells.find(attention=name)
    if cell and cell.dirs:
      map_panel(ax, cell.dirs[0], f"{label}: last layer, head mean")
  fig.suptitle(title, fontsize=9)
  return fig
