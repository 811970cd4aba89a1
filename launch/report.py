"""A sweep's results: results.csv (one row per run), results.md (mean +- std over seeds per
variant, best marked) and PNG plots, from the run directories of a sweep's workdir.

    python -m launch.report --workdir runs/norm [--metric accuracy]

Reads `sweep.json` (written by launch.sweep: every run's name, variant, seed and overrides) and
each run's summary.json, error.json and metrics.jsonl. std is the sample standard deviation
(n - 1 in the denominator) over the seeds that finished; with one seed it is left out.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import statistics
from collections.abc import Sequence
from typing import Any

from attn import storage

PLAN_FILE = "sweep.json"
# Metrics where larger is better; every other metric (loss, perplexity, bits_*) is minimized.
HIGHER_IS_BETTER = ("accuracy", "bleu", "chrf", "tokens_per_second", "mfu")
# summary.json numbers reported beside the eval metrics.
EXTRA_COLUMNS = ("train_loss", "tokens_per_second")


# experiments.main's exit status when training diverged (a non-finite loss or gradient norm):
# a result (the setting does not train), where any other failure is an error (a bad config, a
# crash, a timeout) that leaves the run without one.
DIVERGED_EXIT_STATUS = 3


@dataclasses.dataclass
class RunResult:
  """One run as the report sees it."""

  name: str
  variant: str
  seed: Any
  status: str  # done | failed | interrupted | pending
  overrides: dict[str, Any]
  step: int | None = None
  metrics: dict[str, float] = dataclasses.field(default_factory=dict)
  error: str | None = None
  diverged: bool = False  # failed because training diverged (DIVERGED_EXIT_STATUS)
  commit: str | None = None  # the git commit the run trained at (its summary's provenance)


@dataclasses.dataclass
class VariantStats:
  """Mean, std and count of every metric over one variant's finished seeds."""

  variant: str
  runs: int
  done: int
  stats: dict[str, tuple[float, float | None, int]]  # metric -> (mean, std, n)


def direction(metric: str) -> str:
  """'max' for accuracy-like metrics, 'min' for losses."""
  return "max" if metric in HIGHER_IS_BETTER else "min"


def mean_std(values: Sequence[float]) -> tuple[float, float | None, int]:
  """(mean, sample std or None for a single value, n) of the finite values."""
  finite = [float(v) for v in values if v is not None and math.isfinite(v)]
  if not finite:
    return math.nan, None, 0
  std = statistics.stdev(finite) if len(finite) > 1 else None
  return statistics.fmean(finite), std, len(finite)


def read_summary(path: str) -> tuple[dict[str, Any] | None, str | None]:
  """(summary, None), (None, None) if there is none, or (None, what is wrong with it)."""
  try:
    summary = json.loads(storage.read_text(path))
  except FileNotFoundError:
    return None, None
  except (OSError, ValueError) as e:
    return None, f"{path} is damaged ({type(e).__name__}: {e}); relaunch the run to recompute it"
  if not isinstance(summary, dict) or not isinstance(summary.get("metrics"), dict):
    return None, f"{path} is damaged (no 'metrics' object); relaunch the run to recompute it"
  return summary, None


def collect(workdir: str) -> list[RunResult]:
  """Every run listed in sweep.json with its status and final numbers."""
  planned = json.loads(storage.read_text(storage.join(workdir, PLAN_FILE)))["runs"]
  results = []
  for entry in planned:
    run_dir = storage.join(workdir, entry["name"])
    result = RunResult(entry["name"], entry["variant"], entry.get("seed"), "pending",
                       entry.get("overrides", {}))
    summary_path = storage.join(run_dir, "summary.json")
    error_path = storage.join(run_dir, "error.json")
    summary, damage = read_summary(summary_path)
    if damage is not None:  # Reported as a failed run; relaunching the sweep recomputes it.
      result.status, result.error = "failed", damage
    elif summary is not None:
      result.status, result.step = "done", summary.get("step")
      result.commit = summary.get("provenance", {}).get("commit")
      result.metrics = {k: v for k, v in summary.get("metrics", {}).items()
                        if isinstance(v, (int, float))}
      for key in EXTRA_COLUMNS:
        if isinstance(summary.get(key), (int, float)):
          result.metrics[key] = summary[key]
    elif storage.exists(error_path):
      error = json.loads(storage.read_text(error_path))
      result.status, result.error = "failed", error.get("error")
      result.diverged = error.get("returncode") == DIVERGED_EXIT_STATUS
    elif storage.isdir(storage.join(run_dir, "checkpoints")):
      result.status = "interrupted"
    results.append(result)
  return results


def metric_names(results: Sequence[RunResult], primary: str | None) -> list[str]:
  """Eval metrics in first-seen order, the primary one first and the extra columns last."""
  names: list[str] = []
  for result in results:
    for key in result.metrics:
      if key not in names and key not in EXTRA_COLUMNS:
        names.append(key)
  if primary in names:
    names.remove(primary)
    names.insert(0, primary)
  return names + [k for k in EXTRA_COLUMNS if any(k in r.metrics for r in results)]


def aggregate(results: Sequence[RunResult], metrics: Sequence[str]) -> list[VariantStats]:
  """One VariantStats per variant, in the order the variants first appear."""
  order: list[str] = []
  groups: dict[str, list[RunResult]] = {}
  for result in results:
    if result.variant not in groups:
      order.append(result.variant)
    groups.setdefault(result.variant, []).append(result)
  out = []
  for variant in order:
    done = [r for r in groups[variant] if r.status == "done"]
    stats = {m: mean_std([r.metrics[m] for r in done if m in r.metrics]) for m in metrics}
    out.append(VariantStats(variant, len(groups[variant]), len(done), stats))
  return out


def best_variant(variants: Sequence[VariantStats], metric: str) -> str | None:
  """The variant with the best mean of `metric` (None if no variant has it)."""
  scored = [(v.stats[metric][0], v.variant) for v in variants
            if metric in v.stats and v.stats[metric][2]]
  if not scored:
    return None
  pick = max if direction(metric) == "max" else min
  return pick(scored, key=lambda item: item[0])[1]


def format_stat(mean: float, std: float | None, n: int) -> str:
  if not n:
    return "-"
  return f"{mean:.4g}" if std is None else f"{mean:.4g} ± {std:.2g}"


def write_csv(results: Sequence[RunResult], metrics: Sequence[str], path: str) -> None:
  """One row per run: name, variant, seed, status, step, the metrics, error, then overrides."""
  keys = sorted({k for r in results for k in r.overrides if k != "seed"})
  text = io.StringIO(newline="")
  writer = csv.writer(text)
  writer.writerow(["name", "variant", "seed", "status", "step", *metrics, "error", *keys])
  for r in results:
    writer.writerow([r.name, r.variant, r.seed, r.status, r.step,
                     *(r.metrics.get(m, "") for m in metrics), r.error or "",
                     *(r.overrides.get(k, "") for k in keys)])
  storage.write_text_atomic(path, text.getvalue())


def markdown(variants: Sequence[VariantStats], results: Sequence[RunResult],
             metrics: Sequence[str], primary: str, title: str) -> str:
  """The results table: variants sorted best first by `primary`, the best cell of each column
  in bold, the best variant marked."""
  best_by_column = {m: best_variant(variants, m) for m in metrics}
  sign = -1.0 if direction(primary) == "max" else 1.0

  def rank(v: VariantStats) -> tuple[int, float]:
    mean, _, n = v.stats.get(primary, (math.nan, None, 0))
    return (0, sign * mean) if n else (1, 0.0)

  lines = [f"# {title}", "",
           f"Variants ranked by eval `{primary}` ({'higher' if sign < 0 else 'lower'} is better); "
           "mean ± sample std over the seeds that finished; bold = best in its column.", "",
           "| variant | runs | " + " | ".join(metrics) + " |",
           "|---|---|" + "---|" * len(metrics)]
  for v in sorted(variants, key=rank):
    cells = []
    for m in metrics:
      text = format_stat(*v.stats[m])
      cells.append(f"**{text}**" if best_by_column[m] == v.variant and v.stats[m][2] else text)
    name = f"`{v.variant}`" + (" (best)" if best_by_column.get(primary) == v.variant else "")
    lines.append(f"| {name} | {v.done}/{v.runs} | " + " | ".join(cells) + " |")
  counts = {s: sum(r.status == s for r in results) for s in ("done", "failed", "interrupted",
                                                             "pending")}
  lines += ["", "Runs: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + "."]
  failed = [r for r in results if r.status == "failed"]
  if failed:
    lines += ["", "Failed runs:"] + [f"- `{r.name}`: {r.error}" for r in failed]
  return "\n".join(lines) + "\n"


def plot_final(results: Sequence[RunResult], metric: str, path: str) -> bool:
  """attn.viz.ablation_bars of the runs: a bar per variant, mean and std over its seeds,
  best first. False if no run has the metric."""
  rows = [{"variant": r.variant, metric: r.metrics.get(metric)} for r in results]
  if not any(isinstance(r[metric], (int, float)) and math.isfinite(r[metric]) for r in rows):
    return False
  from attn import viz  # Deferred: matplotlib only when plotting.

  fig = viz.ablation_bars(rows, metric, by="variant", sort=True,
                          lower_is_better=direction(metric) == "min")
  storage.save_figure(fig, path, dpi=120)
  return True


def plot_curves(workdir: str, results: Sequence[RunResult], metric: str, path: str) -> bool:
  """attn.viz.learning_curves of every run that logged metrics: loss and `metric`, train
  solid, eval dashed. False if no run logged anything."""
  from attn import viz

  runs = {r.name: storage.join(workdir, r.name) for r in results
          if storage.exists(storage.join(workdir, r.name, viz.runs.METRICS_FILE))}
  if not runs:
    return False
  fig = viz.learning_curves(runs, list(dict.fromkeys(["loss", metric])))
  storage.save_figure(fig, path, dpi=120)
  return True


def write_report(workdir: str, metric: str | None = None) -> str:
  """Writes results.csv, results.md, final_<metric>.png and curves_<metric>.png; returns the
  markdown table."""
  plan = json.loads(storage.read_text(storage.join(workdir, PLAN_FILE)))
  primary = metric or plan.get("metric") or "loss"
  results = collect(workdir)
  metrics = metric_names(results, primary)
  if primary not in metrics:
    metrics.insert(0, primary)
  variants = aggregate(results, metrics)
  write_csv(results, metrics, storage.join(workdir, "results.csv"))
  text = markdown(variants, results, metrics, primary, f"Sweep results: {plan.get('config')}")
  written = ["results.csv", "results.md"]
  if plot_final(results, primary, storage.join(workdir, f"final_{primary}.png")):
    written.append(f"final_{primary}.png")
  if plot_curves(workdir, results, primary, storage.join(workdir, f"curves_{primary}.png")):
    written.append(f"curves_{primary}.png")
  text += "\nFiles: " + ", ".join(written) + ".\n"
  storage.write_text_atomic(storage.join(workdir, "results.md"), text)
  return text


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m launch.report",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True, help="a sweep's workdir (with sweep.json)")
  parser.add_argument("--metric", default=None, help="eval metric that ranks the variants")
  args = parser.parse_args(argv)
  print(write_report(args.workdir, args.metric))


if __name__ == "__main__":
  main()
