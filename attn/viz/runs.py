"""Figures of finished runs: learning curves from metrics.jsonl, ablation bars from results.csv.

Only the standard library, NumPy and matplotlib: these read files that a run or a sweep wrote,
so a notebook can plot a TPU sweep's results without running any JAX computation.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from attn import storage

METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.csv"
# Columns a sweep row may carry besides its metrics; used to pick a default grouping.
_GROUP_COLUMNS = ("variant", "name")


def new_figure(width: float, height: float) -> Figure:
  """A Figure on an Agg canvas, not registered with pyplot (figsize in inches)."""
  fig = Figure(figsize=(width, height), layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def read_metrics(path: str) -> list[dict[str, Any]]:
  """The records of a run's metrics.jsonl (`path` is the file or the run's workdir).

  A step logged twice for a split (a resumed run that re-did steps) keeps its last record.
  """
  if storage.isdir(path):
    path = storage.join(path, METRICS_FILE)
  records: dict[tuple[str, int], dict[str, Any]] = {}
  for line in storage.read_text(path).splitlines():
    line = line.strip()
    if line:
      record = json.loads(line)
      records[(record.get("split", "train"), int(record["step"]))] = record
  return sorted(records.values(), key=lambda r: (r.get("split", "train"), r["step"]))


def _runs(runs: str | Sequence[str] | Mapping[str, str]) -> dict[str, str]:
  if isinstance(runs, str):
    runs = [runs]
  if not isinstance(runs, Mapping):
    runs = {os.path.basename(os.path.normpath(p)) or p: p for p in runs}
  return dict(runs)


def learning_curves(runs: str | Sequence[str] | Mapping[str, str],
                    metrics: Sequence[str] = ("loss",), *,
                    splits: Sequence[str] = ("train", "eval"), log_y: bool = False,
                    title: str | None = None) -> Figure:
  """One panel per metric, one color per run: train solid, eval dashed with markers.

  Args:
    runs: a workdir (or metrics.jsonl), a list of them, or {label: workdir}.
    metrics: metric names as logged ("loss", "accuracy", "learning_rate", ...).
    splits: which splits to draw.
    log_y: logarithmic y axis.
    title: figure title.

  Returns:
    A Figure with one axes per metric, step on x.
  """
  runs = _runs(runs)
  fig = new_figure(4.2 * len(metrics), 3.2)
  axes = fig.subplots(1, len(metrics), squeeze=False)[0]
  styles = {"train": dict(linestyle="-"), "eval": dict(linestyle="--", marker="o", markersize=3)}
  for color, (label, path) in enumerate(runs.items()):
    records = read_metrics(path)
    for ax, metric in zip(axes, metrics, strict=True):
      for split in splits:
        points = [(r["step"], r[metric]) for r in records
                  if r.get("split", "train") == split and _finite(r.get(metric))]
        if points:
          steps, values = zip(*points, strict=True)
          ax.plot(steps, values, color=f"C{color}", label=f"{label} {split}",
                  **styles.get(split, {}))
  for ax, metric in zip(axes, metrics, strict=True):
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    if log_y:
      ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if ax.lines:
      ax.legend(fontsize=7)
  if title:
    fig.suptitle(title)
  return fig


def _finite(value: Any) -> bool:
  return isinstance(value, (int, float)) and math.isfinite(value)


def _parse(value: str) -> Any:
  """CSV cell -> float where it is a number, else the string (empty = None)."""
  if value == "":
    return None
  try:
    return float(value)
  except ValueError:
    return value


def read_results(path: str) -> list[dict[str, Any]]:
  """The rows of a sweep's results.csv (`path` is the file or the sweep's workdir)."""
  if storage.isdir(path):
    path = storage.join(path, RESULTS_FILE)
  rows = csv.DictReader(io.StringIO(storage.read_text(path), newline=""))
  return [{k: _parse(v) for k, v in row.items()} for row in rows]


def _group_label(row: Mapping[str, Any], by: Sequence[str]) -> str:
  if len(by) == 1:
    return str(row.get(by[0]))
  return ", ".join(f"{k}={row.get(k)}" for k in by)


def ablation_bars(results: str | Sequence[Mapping[str, Any]], metric: str, *,
                  by: str | Sequence[str] | None = None, sort: bool = False,
                  lower_is_better: bool | None = None, title: str | None = None) -> Figure:
  """A bar per variant: the mean of `metric` over its runs (seeds), with a std error bar.

  Args:
    results: a results.csv, a sweep workdir holding one, or rows as dicts.
    metric: the column to plot (e.g. "loss", "accuracy").
    by: the column(s) naming a variant; default "variant" (the sweep's name without the seed),
      else "name".
    sort: order the bars best first (needs lower_is_better, else by value ascending).
    lower_is_better: marks the best bar (None: guessed, True for names containing "loss",
      "perplexity" or "bits").
    title: figure title.

  Returns:
    A Figure with one axes. Runs without a finite value (failed, unfinished) are left out and
    counted in the x label.
  """
  rows = read_results(results) if isinstance(results, str) else [dict(r) for r in results]
  if not rows:
    raise ValueError("ablation_bars got no result rows.")
  if by is None:
    by = next((c for c in _GROUP_COLUMNS if c in rows[0]), None)
    if by is None:
      raise ValueError(f"no 'variant' or 'name' column to group by; pass by= one of "
                       f"{sorted(rows[0])}.")
  by = [by] if isinstance(by, str) else list(by)
  if not any(metric in row for row in rows):
    raise ValueError(f"no column {metric!r}; columns: {sorted(rows[0])}.")
  groups: dict[str, list[float]] = {}
  missing = 0
  for row in rows:
    values = groups.setdefault(_group_label(row, by), [])
    if _finite(row.get(metric)):
      values.append(float(row[metric]))
    else:
      missing += 1
  groups = {k: v for k, v in groups.items() if v}
  if lower_is_better is None:
    lower_is_better = any(word in metric for word in ("loss", "perplexity", "bits"))
  names = list(groups)
  means = np.array([np.mean(groups[n]) for n in names])
  stds = np.array([np.std(groups[n]) if len(groups[n]) > 1 else 0.0 for n in names])
  if sort:
    order = np.argsort(means if lower_is_better else -means)
    names, means, stds = [names[i] for i in order], means[order], stds[order]
  fig = new_figure(max(3.5, 0.9 * len(names) + 1.5), 3.6)
  ax = fig.subplots()
  best = int(np.argmin(means) if lower_is_better else np.argmax(means)) if names else -1
  colors = ["C1" if i == best else "C0" for i in range(len(names))]
  bars = ax.bar(range(len(names)), means, yerr=stds, color=colors, capsize=3)
  ax.bar_label(bars, labels=[f"{m:.3g}" for m in means], fontsize=7, padding=2)
  ax.set_xticks(range(len(names)), names, rotation=30 if len(names) > 3 else 0, ha="right"
                if len(names) > 3 else "center", fontsize=8)
  runs = sum(len(v) for v in groups.values())
  ax.set_xlabel(f"{', '.join(by)} ({runs} runs" + (f", {missing} without {metric})" if missing
                                                   else ")"))
  ax.set_ylabel(metric + (" (lower is better)" if lower_is_better else " (higher is better)"))
  ax.grid(axis="y", alpha=0.3)
  if title:
    fig.suptitle(title)
  return fig
