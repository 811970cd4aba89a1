"""Attention-map figures: per-head grids, cross-attention alignments, ViT rollout, and a PNG.

    weights = viz.capture_attention(model, params, tokens)        # {path: [B, N, T, S]}
    fig = viz.attention_grid(viz.stack_layers(weights), viz.token_labels(ids, tokenizer))
    fig.savefig("maps.png")

Figures are `matplotlib.figure.Figure` objects drawn on the Agg canvas, not through pyplot: no
window opens, nothing global changes (a notebook keeps its own backend and shows a returned
figure as usual), and figures are freed with their last reference. Three modules, all re-exported
here: `maps` (the attention figures), `capture` (weights out of a model, rollout math) and `runs`
(learning curves and ablation bars from a run's or a sweep's files).

Shapes: L layers, B batch, N heads, T query length, S key length.
"""

from attn.viz.capture import attention_rollout, capture_attention, stack_layers
from attn.viz.maps import (
    MAX_LABELS,
    attention_grid,
    cross_attention_figure,
    mechanism_maps,
    patch_relevance,
    save_attention_png,
    token_labels,
    vit_rollout_figure,
)
from attn.viz.runs import ablation_bars, learning_curves, new_figure, read_metrics, read_results

__all__ = [
    "MAX_LABELS",
    "ablation_bars",
    "attention_grid",
    "attention_rollout",
    "capture_attention",
    "cross_attention_figure",
    "mechanism_maps",
    "learning_curves",
    "new_figure",
    "patch_relevance",
    "read_metrics",
    "read_results",
    "save_attention_png",
    "stack_layers",
    "token_labels",
    "vit_rollout_figure",
]
