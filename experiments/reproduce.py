"""Reproductions: published attention results rerun in this codebase, each against a band stated
before the run.

    python -m experiments.reproduce [--only NAME] [--seeds N] [--workdir runs/reproduce] \
        [--parallel 1] [--report] [--merge OTHER/results.json]    # or: make reproduce

Each claim is an experiment file in experiments/reproductions/ (its docstring: `Claim:`,
`Paper:`, `Band:`, `Budget:`, `Command:`, `Hardware:`) with `get_config(arg)`, `get_sweep(arg)`,
`check(cells) -> (status, detail)`, SWEEP_METRIC, PAPER and BAND (short forms for the table),
optionally ORDER, TABLE (the metrics results.md shows, default: the first four), `plot(cells) ->
Figure` and `measure(run_dir) -> {metric: value}` (numbers
measured on a finished run, e.g. from its checkpoint's attention maps or its metrics.jsonl;
cached in the run's `measures.json` and reported beside its eval metrics). The runner runs
every claim's sweep through launch.sweep (one `experiments.main` process per point, so the
normal trainer), under `<workdir>/<claim>/`, then writes into the workdir:

- `results.json`: per claim its paper, band, status (pass / fail / incomplete), detail, every
  variant's mean / std / n per metric and the wall time; plus the git commit and package versions
  (attn.provenance).
- `results.md`: the same as a table (mean ± std over seeds).
- `<claim>.png`: one plot per claim (the claim's `plot(cells, path)`, else bars of its metric).

Each claim's directory also gets launch.report's results.csv / results.md. A rerun skips the
points that finished (summary.json present); a killed run resumes from its checkpoints (the
trainer's contract). `--report` only rewrites the reports from what is on disk. A claim with
no runs in the workdir keeps its entry of the results.json already there or of a file named by
`--merge` (the latest of them), with the date and commit of the report that measured it
(`measured`), so claims run in different sessions or on different machines report together;
results.md's "measured" column shows that date and the commits the claim's runs trained at
(`run_commits`, from each run's summary.json). A merged entry is then part of the workdir's
results.json, so later reports keep it without `--merge` until the claim runs there.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import Any

from attn import provenance, storage
from launch import grid, report, run_configs, sweep

CLAIMS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reproductions")
PASS, FAIL, INCOMPLETE, NOT_RUN = "pass", "fail", "incomplete", "not run"
TIMES_FILE = "wall_time.json"


@dataclasses.dataclass
class Cell:
  """One variant of a claim's sweep: its point (experiment args without `arg.` and seed) and
  mean / std / n of every metric over the seeds that finished."""

  point: dict[str, Any]
  runs: int
  done: int
  stats: dict[str, tuple[float, float | None, int]]
  failed: int = 0  # runs that exited with an error: diverged, or crashed / timed out / refused
  diverged: int = 0  # the failed runs whose training diverged (a result: the setting fails)
  dirs: list[str] = dataclasses.field(default_factory=list)  # the finished runs' directories

  def mean(self, metric: str) -> float:
    """The metric's mean over seeds; NaN when no seed finished."""
    return self.stats.get(metric, (math.nan, None, 0))[0]

  @property
  def all_diverged(self) -> bool:
    """Every run of the variant diverged: a claim may count it as worse than any number."""
    return self.runs > 0 and self.diverged == self.runs

  @property
  def unfinished(self) -> int:
    """Runs with no result: pending, interrupted, or failed without diverging."""
    return self.runs - self.done - self.diverged


class Cells(list):
  """A claim's cells, looked up by their args: `cells.mean("accuracy", attention="mha")`."""

  def find(self, **where: Any) -> Cell | None:
    match = [c for c in self if all(c.point.get(k) == v for k, v in where.items())]
    return match[0] if len(match) == 1 else None

  def mean(self, metric: str, **where: Any) -> float:
    cell = self.find(**where)
    return math.nan if cell is None else cell.mean(metric)

  def text(self, metric: str, *, inf: bool = False, **where: Any) -> str:
    """"mean ± std (n)" of the metric over seeds, for a check's detail ("-" when missing;
    "diverged" with inf=True when every run of the variant diverged)."""
    cell = self.find(**where)
    if cell is not None and inf and cell.all_diverged:
      return "diverged"
    mean, std, n = (math.nan, None, 0) if cell is None else cell.stats.get(metric,
                                                                            (math.nan, None, 0))
    if not n:
      return "-"
    return (f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}") + f" (n={n})"

  def compare(self, metric: str, labels: Mapping[str, str], *, key: str = "attention",
              prefix: str = "") -> tuple[dict[str, float] | None, str]:
    """What a claim's check compares: the metric's mean for each `key` value named in `labels`
    (None when one is missing: the claim is incomplete) and the detail line
    ("<prefix><label> mean ± std (n), ...")."""
    means = {value: self.mean(metric, **{key: value}) for value in labels}
    detail = prefix + ", ".join(f"{label} {self.text(metric, **{key: value})}"
                                for value, label in labels.items())
    return (None if any(math.isnan(m) for m in means.values()) else means), detail


def claim_files(claims_dir: str = CLAIMS_DIR) -> dict[str, str]:
  """name -> path of every claim file, in the order of their `ORDER` (then name)."""
  paths = [p for p in glob.glob(os.path.join(claims_dir, "*.py"))
           if not os.path.basename(p).startswith("_")]
  modules = {os.path.splitext(os.path.basename(p))[0]: p for p in paths}
  order = {name: getattr(sweep.load_experiment(path)[0], "ORDER", 99)
           for name, path in modules.items()}
  return {name: modules[name] for name in sorted(modules, key=lambda n: (order[n], n))}


def cells_of(results: Sequence[report.RunResult], metrics: Sequence[str],
             claim_dir: str = "") -> Cells:
  """Groups runs by variant: each variant's point and its stats (launch.report.aggregate)."""
  points: dict[str, dict[str, Any]] = {}
  failed: dict[str, int] = {}
  diverged: dict[str, int] = {}
  dirs: dict[str, list[str]] = {}
  for r in results:
    points.setdefault(r.variant, {k.removeprefix(grid.ARG_PREFIX): v
                                  for k, v in r.overrides.items() if k != grid.SEED_KEY})
    failed[r.variant] = failed.get(r.variant, 0) + (r.status == "failed")
    diverged[r.variant] = diverged.get(r.variant, 0) + (r.status == "failed" and r.diverged)
    dirs.setdefault(r.variant, [])
    if r.status == "done":
      dirs[r.variant].append(storage.join(claim_dir, r.name))
  return Cells(Cell(points[v.variant], v.runs, v.done, v.stats, failed[v.variant],
                    diverged[v.variant], dirs[v.variant])
               for v in report.aggregate(results, metrics))


MEASURES_FILE = "measures.json"


def add_measures(module: ModuleType, claim_dir: str,
                 results: Sequence[report.RunResult]) -> None:
  """Adds the claim's `measure(run_dir)` numbers to each finished run's metrics: computed once,
  then read from the run's measures.json (recomputed when the run's summary.json changed, e.g.
  after the run was redone)."""
  if not hasattr(module, "measure"):
    return
  for r in results:
    if r.status != "done":
      continue
    run_dir = storage.join(claim_dir, r.name)
    path = storage.join(run_dir, MEASURES_FILE)
    summary = hashlib.sha256(storage.read_text(storage.join(run_dir, "summary.json")).encode())
    cached = json.loads(storage.read_text(path)) if storage.exists(path) else {}
    if cached.get("summary_sha256") != summary.hexdigest():
      cached = {"summary_sha256": summary.hexdigest(),
                "measures": {k: float(v) for k, v in module.measure(run_dir).items()}}
      storage.write_text_atomic(path, json.dumps(cached, indent=2))
    r.metrics.update(cached["measures"])


def verdict(check: Callable[[Cells], tuple[str, str]], cells: Cells) -> tuple[str, str]:
  """The claim's check, incomplete while a planned run has no result (pending, interrupted, or
  failed without diverging: a crash, a timeout, a bad override), whatever the finished seeds
  say; a check that finds a number missing (NaN) says incomplete too."""
  status, detail = check(cells)
  if status not in (PASS, FAIL, INCOMPLETE):
    raise ValueError(f"check() returned status {status!r}; expected pass, fail or incomplete.")
  unfinished = sum(c.unfinished for c in cells)
  if unfinished:
    crashed = sum(c.failed - c.diverged for c in cells)
    status = INCOMPLETE
    detail += (f" [{unfinished} run(s) without a result"
               + (f", {crashed} of them failed (see their error.json)" if crashed else "") + "]")
  return status, detail


def nan_to_none(value: Any) -> Any:
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def docstring_field(doc: str | None, field: str) -> str:
  """The text of `Field:` in a claim's docstring, up to the next `Word:` line, on one line."""
  lines, inside = [], False
  for line in (doc or "").splitlines():
    head = line.split(":", 1)[0]
    if line[:1].isalpha() and head.isalpha() and ":" in line:
      inside = head == field
      line = line.split(":", 1)[1]
    if inside:
      lines.append(line.strip())
  return " ".join(filter(None, lines))


# What every claim's entry in results.json holds (a --merge file's entries are checked for them).
ENTRY_KEYS = frozenset({"paper", "claim", "band", "metric", "status", "detail", "cells", "wall_s",
                        "plot"})


def summarize(name: str, module: ModuleType, claim_dir: str) -> dict[str, Any]:
  """One claim's entry in results.json, from its run directories; writes its plot."""
  entry: dict[str, Any] = {
      "paper": getattr(module, "PAPER", ""), "claim": docstring_field(module.__doc__, "Claim"),
      "band": getattr(module, "BAND", ""), "metric": module.SWEEP_METRIC, "status": NOT_RUN,
      "detail": "", "cells": [], "wall_s": None, "plot": None,
      "table": list(getattr(module, "TABLE", []))}
  if not storage.exists(storage.join(claim_dir, report.PLAN_FILE)):
    return entry
  report.write_report(claim_dir, metric=module.SWEEP_METRIC)
  results = report.collect(claim_dir)
  add_measures(module, claim_dir, results)
  metrics = report.metric_names(results, module.SWEEP_METRIC)
  cells = cells_of(results, metrics, claim_dir)
  entry["status"], entry["detail"] = verdict(module.check, cells)
  entry["run_commits"] = sorted({r.commit for r in results if r.status == "done" and r.commit})
  entry["cells"] = [{"point": c.point, "runs": c.runs, "done": c.done, "failed": c.failed,
                     "diverged": c.diverged,
                     "stats": {k: [nan_to_none(m), s, n] for k, (m, s, n) in c.stats.items()}}
                    for c in cells]
  times = storage.join(claim_dir, TIMES_FILE)
  if storage.exists(times):
    entry["wall_s"] = json.loads(storage.read_text(times))["wall_s"]
  path = storage.join(os.path.dirname(claim_dir.rstrip("/")), f"{name}.png")
  if _plot(module, cells, claim_dir, path):
    entry["plot"] = f"{name}.png"
  return entry


def _plot(module: ModuleType, cells: Cells, claim_dir: str, path: str) -> bool:
  if not any(c.done for c in cells):
    return False
  if hasattr(module, "plot"):
    fig = module.plot(cells)
  else:
    from attn import viz

    fig = viz.ablation_bars(storage.join(claim_dir, "results.csv"), module.SWEEP_METRIC,
                                 by="variant", title=getattr(module, "TITLE", None))
  storage.save_figure(fig, path, dpi=110)
  return True


def _stat(stats: Sequence[Any] | None) -> str:
  if not stats or stats[0] is None:
    return "-"
  return report.format_stat(*stats)


def markdown(summary: dict[str, Any]) -> str:
  """results.md: one table of the claims, then each claim's variants."""
  prov = summary["provenance"]
  lines = ["# Reproductions", "",
           f"Commit `{prov['commit']}`{' (uncommitted changes)' if prov['dirty'] else ''}; "
           + ", ".join(f"{k} {v}" for k, v in prov["versions"].items() if v) + ".", "",
           "| claim | paper | band | result | detail | wall time | measured |",
           "|---|---|---|---|---|---|---|"]
  for name, c in summary["claims"].items():
    wall = "-" if c["wall_s"] is None else f"{c['wall_s'] / 60:.1f} min"
    when = "-"
    if measured := c.get("measured"):
      commits = c.get("run_commits") or [measured["commit"] or "?"]
      when = f"{measured['written'][:10]}, " + " ".join(f"`{x[:7]}`" for x in commits)
    lines.append(f"| {name} | {c['paper']} | {c['band']} | **{c['status']}** | {c['detail']} | "
                 f"{wall} | {when} |")
  for name, c in summary["claims"].items():
    if not c["cells"]:
      continue
    metrics = list(dict.fromkeys(k for cell in c["cells"] for k in cell["stats"]))
    metrics.sort(key=lambda m: m != c["metric"])
    metrics = [m for m in c.get("table") or metrics[:4] if m in metrics]
    lines += ["", f"## {name}", "", c["claim"], "",
              "| variant | runs | " + " | ".join(metrics) + " |",
              "|---|---|" + "---|" * len(metrics)]
    for cell in c["cells"]:
      label = ", ".join(f"{k}={v}" for k, v in cell["point"].items())
      lines.append(f"| {label} | {cell['done']}/{cell['runs']} | "
                   + " | ".join(_stat(cell["stats"].get(m)) for m in metrics) + " |")
    if c["plot"]:
      lines += ["", f"![{name}]({c['plot']})"]
  return "\n".join(lines) + "\n"


def earlier_entries(paths: Sequence[str]) -> dict[str, tuple[dict[str, Any], str]]:
  """The measured claims of earlier results.json files (those that exist), each stamped with
  the commit and date it was written at (a stamp it already carries is kept), with the file it
  came from; where several files measured a claim, the latest."""
  entries: dict[str, tuple[dict[str, Any], str]] = {}
  for path in paths:
    if not storage.exists(path):
      continue
    earlier = json.loads(storage.read_text(path))
    stamp = {"commit": earlier["provenance"]["commit"], "written": earlier["written"]}
    for name, entry in earlier["claims"].items():
      entry = {**entry, "measured": entry.get("measured", stamp)}
      latest = entries[name][0]["measured"]["written"] if name in entries else ""
      if entry["status"] != NOT_RUN and entry["measured"]["written"] > latest:
        entries[name] = entry, path
  return entries


def _copy_plot(entry: dict[str, Any], source: str, workdir: str) -> None:
  """A merged claim's plot, beside the results.md that links it (if its file has it)."""
  plot = entry.get("plot")
  if not plot:
    return
  have = storage.join(workdir, plot)
  found = storage.join(os.path.dirname(source), plot)
  if not storage.exists(have) and storage.exists(found):
    storage.write_bytes_atomic(have, storage.read_bytes(found))


def write_results(workdir: str, claims: dict[str, str],
                  merge: Sequence[str] = ()) -> dict[str, Any]:
  """results.json, results.md and the plots, from what is on disk. A claim with no runs in
  `workdir` keeps its entry of the results.json there or of a `merge` file (another session's
  or machine's), with its `measured` commit and date."""
  summary = {"written": datetime.datetime.now().isoformat(timespec="seconds"),
             "provenance": provenance.provenance(), "claims": {}}
  earlier = earlier_entries([storage.join(workdir, "results.json"), *merge])
  stamp = {"commit": summary["provenance"]["commit"], "written": summary["written"]}
  for name, path in claims.items():
    module, _ = sweep.load_experiment(path)
    entry = summarize(name, module, storage.join(workdir, name))
    if entry["status"] == NOT_RUN and name in earlier:
      entry, source = earlier[name]
      _copy_plot(entry, source, workdir)
    elif entry["status"] != NOT_RUN:
      entry["measured"] = stamp
    summary["claims"][name] = entry
  storage.write_text_atomic(storage.join(workdir, "results.json"),
                            json.dumps(summary, indent=2, default=str))
  storage.write_text_atomic(storage.join(workdir, "results.md"), markdown(summary))
  return summary


CHANGE_REMEDY = ("A reproduction trains each run with one config: use another --workdir for "
                 "runs with this --set (experiments.reproduce has no --allow_config_change).")


def check_claim(name: str, path: str, workdir: str, *, seeds: int | None,
                extra: Sequence[str] = ()) -> list[str]:
  """The claim's runs that must run again although finished (their config moved on); raises
  ValueError for a --set that is no field of the claim's config, or when runs already trained
  with another config (launch.sweep's check, made before anything starts)."""
  module, arg = sweep.load_experiment(path)
  runs = sweep.plan(path, seeds=seeds)
  try:
    moved, refusal = run_configs.check_configs(module, arg, storage.join(workdir, name), runs,
                                               extra, remedy=CHANGE_REMEDY)
  except ValueError as e:
    raise ValueError(f"[{name}] {e}") from None
  if refusal:
    raise ValueError(f"[{name}] {refusal}")
  return moved


def run_claim(name: str, path: str, workdir: str, *, seeds: int | None, parallel: int,
              extra: Sequence[str] = (), timeout: float | None = None,
              changed: Sequence[str] = ()) -> dict[str, str]:
  """Runs one claim's sweep (what is not done yet, and the `changed` runs: see check_claim);
  adds its wall time to wall_time.json."""
  module, _ = sweep.load_experiment(path)
  claim_dir = storage.join(workdir, name)
  runs = sweep.plan(path, seeds=seeds)
  sweep.write_plan(claim_dir, path, runs, module.SWEEP_METRIC)
  start, outcome = time.monotonic(), {}

  def echo(line: str) -> None:
    print(f"[{name}] {line}", flush=True)

  try:
    outcome = sweep.execute(path, claim_dir, runs, parallel=parallel, extra=extra,
                            timeout=timeout, echo=echo, changed=changed)
  finally:  # Also when stopped: the time spent so far counts.
    times = storage.join(claim_dir, TIMES_FILE)
    spent = json.loads(storage.read_text(times))["wall_s"] if storage.exists(times) else 0.0
    if not outcome or any(state != "skipped" for state in outcome.values()):
      spent += time.monotonic() - start
    storage.write_text_atomic(times, json.dumps({"wall_s": round(spent, 1)}))
  return outcome


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m experiments.reproduce",
      description=" ".join(__doc__.split("\n\n")[0].split()),
      epilog="Exit status: 0 when every chosen claim has its verdict (pass or fail: a claim "
             "outside its band is a result); 1 when a run failed without diverging (a crash, a "
             "timeout), a claim is incomplete, or (--report) a claim was never run; 2 for bad "
             "arguments (also a --set that is no config field, or runs that trained with "
             "another config); 130 when stopped (relaunch the same command to resume).")
  parser.add_argument("--workdir", default="runs/reproduce",
                      help="one folder per claim, results.json / results.md / <claim>.png "
                           "(default: %(default)s; a gs:// URL works too)")
  parser.add_argument("--only", action="append", default=[], metavar="NAME",
                      help="run only this claim; repeat for several")
  parser.add_argument("--seeds", type=int, default=None,
                      help="seeds 0..N-1 per point (default: each claim's config seed)")
  parser.add_argument("--parallel", type=int, default=1, help="runs at a time")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="a config override for every run")
  parser.add_argument("--timeout", type=float, default=None, help="seconds before a run is killed")
  parser.add_argument("--report", action="store_true", help="only rewrite the results")
  parser.add_argument("--merge", action="append", default=[], metavar="RESULTS_JSON",
                      help="another run's results.json: its claims with no runs here are "
                           "reported from it (repeat for several)")
  parser.add_argument("--claims_dir", default=CLAIMS_DIR, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  for flag, value in (("--seeds", args.seeds), ("--parallel", args.parallel),
                      ("--timeout", args.timeout)):
    if value is not None and value <= 0:
      parser.error(f"{flag} must be > 0, got {value:g}")
  for path in args.merge:
    _check_merge_file(parser, path)
  return args


def _check_merge_file(parser: argparse.ArgumentParser, path: str) -> None:
  """A --merge file must be an experiments.reproduce results.json: refused before anything runs."""
  if not storage.exists(path):
    parser.error(f"--merge {path}: no such file (another run's <workdir>/results.json)")
  try:
    merged = json.loads(storage.read_text(path))
  except (OSError, UnicodeDecodeError) as e:
    parser.error(f"--merge {path}: cannot be read ({e})")
  except ValueError as e:
    parser.error(f"--merge {path}: not JSON ({e})")
  ok = (isinstance(merged, dict) and isinstance(merged.get("claims"), dict)
        and isinstance(merged.get("provenance"), dict) and "commit" in merged["provenance"]
        and "written" in merged)
  if not ok:
    parser.error(f"--merge {path}: not a results.json of experiments.reproduce (it needs "
                 "'written', 'provenance.commit' and 'claims')")
  for name, entry in merged["claims"].items():
    missing = ENTRY_KEYS - set(entry) if isinstance(entry, dict) else ENTRY_KEYS
    if missing:
      parser.error(f"--merge {path}: claims.{name} is not a claim's entry (missing "
                   f"{', '.join(sorted(missing))})")


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the claims; returns 1 if a run failed without diverging or a chosen claim is
  incomplete or (on --report) not run, else 0 (pass or fail: the verdict is in results.md);
  2 for bad arguments."""
  args = parse_args(sys.argv[1:] if argv is None else argv)
  claims = claim_files(args.claims_dir)
  unknown = sorted(set(args.only) - set(claims))
  if unknown:
    print(f"Unknown claim(s) {unknown}; known: {list(claims)}.")
    return 2
  chosen = {n: p for n, p in claims.items() if not args.only or n in args.only}
  failed_runs = []
  if not args.report:
    # Every claim's configs are checked before any run starts: a bad --set, or runs that
    # trained with another config (a finished one would otherwise count as done), refused here.
    try:
      changed = {name: check_claim(name, path, args.workdir, seeds=args.seeds, extra=args.set)
                 for name, path in chosen.items()}
    except ValueError as e:
      print(f"Config error: {e}", file=sys.stderr)
      return 2
    for name, path in chosen.items():
      try:
        outcome = run_claim(name, path, args.workdir, seeds=args.seeds, parallel=args.parallel,
                            extra=args.set, timeout=args.timeout, changed=changed[name])
      except KeyboardInterrupt:
        write_results(args.workdir, claims, args.merge)
        return 130
      failed_runs += [f"{name}/{run}" for run, state in outcome.items() if state == "failed"]
  summary = write_results(args.workdir, claims, args.merge)
  print(storage.read_text(storage.join(args.workdir, "results.md")))
  print(f"Wrote {storage.join(args.workdir, 'results.md')}, results.json and the plots beside it.")
  if failed_runs:
    print(f"{len(failed_runs)} run(s) exited with an error (a diverged run is a result; the "
          f"others are in 'incomplete' below; see <run>/error.json): {', '.join(failed_runs)}")
  incomplete = [n for n in chosen if summary["claims"][n]["status"] == INCOMPLETE]
  if incomplete:
    print(f"Incomplete (a run has no result yet): {', '.join(incomplete)}; relaunch the same "
          "command to finish them.")
  never = [n for n in chosen if summary["claims"][n]["status"] == NOT_RUN]  # only on --report
  if never:
    print(f"Not run (no runs in {args.workdir} and none merged): {', '.join(never)}; run them "
          f"with {' '.join(f'--only {n}' for n in never)} without --report, or --merge the "
          "results.json that has them.")
  return 1 if incomplete or never else 0


if __name__ == "__main__":
  sys.exit(main())
