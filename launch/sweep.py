"""Run an experiment's sweep: one process per point, N at a time, resumable, with a report.

    python -m launch.sweep --config experiments/norm_ablation.py[:arg] --workdir runs/norm \
        [--parallel 2] [--seeds 3] [--filter 'norm=rmsnorm'] [--set train.num_steps=100] \
        [--dry_run] [--report] [--metric loss]

Each point of the experiment's `get_sweep(arg)` (see launch.grid) becomes one run of
`python -m experiments.main --config <file>:<arg> --workdir <workdir>/<run name> --config.k=v...`
in its own process. The child gets an argv list, never a shell string, so a value with spaces,
quotes or `;` arrives as written.

Relaunching the same command is always safe: runs with a summary.json are skipped, interrupted
ones resume from their checkpoint (the trainer's contract) and failed ones are tried again. A run
that fails leaves `error.json` (exit status and the end of its log) and the sweep goes on; one
whose workdir lock another launch holds (a sweep relaunched while the first still runs it) is
not started, and nothing is written into its folder. At the
end, and with `--report` alone, launch.report writes results.csv, results.md and PNG plots into
the workdir. Each run's console output is in `<run>/log.txt`. The workdir may be a bucket
(`--workdir gs://bucket/sweeps/x`): the children write there directly, and each log is kept in a
local folder while its run goes and copied to the bucket when it ends.

With `--parallel N` on GPUs the runs do not fight over one device: with several GPUs each run
gets its own (CUDA_VISIBLE_DEVICES, round robin over the visible ones), and runs that share a
GPU each preallocate only their share of its memory (XLA_PYTHON_CLIENT_MEM_FRACTION, 0.9 / runs
per GPU, instead of JAX's 0.75 each). Values you set yourself are kept. A TPU chip cannot be
shared between processes: on a TPU VM each run gets its own chips (the visible chips split in
equal power-of-two blocks, a slice of its own through libtpu's TPU_VISIBLE_CHIPS,
TPU_CHIPS_PER_PROCESS_BOUNDS, TPU_PROCESS_BOUNDS and its own TPU_PROCESS_PORT), so N can be
at most the number of chips.

Ctrl-C or SIGTERM (a preempted VM) forwards SIGTERM to the running children, which save a
checkpoint and exit; the next launch resumes them.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import inspect
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from attn import storage
from launch import devices, grid, report
from launch.run_configs import QUIET, check_configs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLAN_FILE = "sweep.json"
ERROR_FILE = "error.json"
# The sweep's pid, in its children's environment: experiments.main stops when it dies.
LAUNCHER_PID_ENV = "ATTN_LAUNCHER_PID"
LOG_FILE = "log.txt"


@dataclasses.dataclass(frozen=True)
class Run:
  """One point of the sweep: its directory name, overrides, and variant (name without seed)."""

  name: str
  point: dict[str, Any]
  variant: str

  def workdir(self, root: str) -> str:
    return storage.join(root, self.name)


def split_spec(spec: str) -> tuple[str, str | None]:
  """'experiments/lm.py:size=small' -> ('experiments/lm.py', 'size=small')."""
  path, sep, arg = spec.partition(".py:")
  if sep:
    return path + ".py", arg
  return spec, None


def load_experiment(spec: str) -> tuple[ModuleType, str | None]:
  """Imports an experiment file by path; returns (module, arg)."""
  path, arg = split_spec(spec)
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"No experiment file {path}.")
  if not (os.path.isfile(path) and path.endswith(".py")):
    raise ValueError(f"{path} is not an experiment file: a .py file with get_config(), e.g. "
                     "experiments/norm_ablation.py.")
  if REPO not in sys.path:  # Experiment files import `experiments.common`.
    sys.path.insert(0, REPO)
  name = "_sweep_" + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module, arg


def get_points(module: ModuleType, arg: str | None) -> list[grid.Point]:
  """The experiment's sweep points; `get_sweep(arg)` if it takes the arg, else `get_sweep()`."""
  if not hasattr(module, "get_sweep"):
    raise ValueError(f"{module.__file__} has no get_sweep(); it is not a sweep. Train it alone "
                     "with `python -m experiments.main --config FILE --workdir DIR`, or sweep an "
                     "experiment that defines get_sweep() (its points, see launch/grid.py).")
  takes_arg = bool(inspect.signature(module.get_sweep).parameters)
  points = module.get_sweep(arg) if takes_arg else module.get_sweep()
  return [dict(p) for p in points]


def plan(spec: str, *, seeds: int | None = None, filters: Sequence[str] = ()) -> list[Run]:
  """Every run of the sweep (after seeds and filters), checked against the experiment's config."""
  module, arg = load_experiment(spec)
  points = get_points(module, arg)
  if seeds:
    points = grid.with_seeds(points, range(seeds))
  by_arg: dict[str | None, list[grid.Point]] = {}
  for point in points:
    by_arg.setdefault(grid.merge_arg(arg, point), []).append(point)
  for merged, group in by_arg.items():  # get_config also rejects unknown experiment args.
    grid.check_points(group, module.get_config(merged))
  named = grid.select(grid.name_runs(points), filters)
  variants = grid.short_keys(points)
  return [Run(name, point, grid.run_name(grid.variant_of(point), variants))
          for name, point in named]


def cli_value(value: Any) -> str:
  """A Python value as config_flags parses it back (it parses by the field's type)."""
  if isinstance(value, float):
    return repr(value)
  return str(value)


def child_argv(spec: str, run_dir: str, point: grid.Point, extra: Sequence[str] = ()) -> list[str]:
  """The argv of one run: experiments.main with the config path made absolute."""
  path, arg = split_spec(spec)
  arg = grid.merge_arg(arg, point)
  config = os.path.abspath(path) + (f":{arg}" if arg is not None else "")
  argv = [sys.executable, "-m", "experiments.main", "--config", config, "--workdir", run_dir]
  argv += [f"--config.{s}" for s in QUIET]
  argv += [f"--config.{key}={cli_value(value)}"
           for key, value in grid.config_overrides(point).items()]
  argv += [f"--config.{s}" for s in extra]  # --set: after the point, so it wins.
  return argv


def status(run_dir: str) -> str:
  """done (a readable summary.json) | failed (error.json) | interrupted (a checkpoint) | pending;
  a damaged summary.json is not done (the relaunched run recomputes it)."""
  if report.read_summary(storage.join(run_dir, "summary.json"))[0] is not None:
    return "done"
  if storage.exists(storage.join(run_dir, ERROR_FILE)):
    return "failed"
  if storage.isdir(storage.join(run_dir, "checkpoints")):
    return "interrupted"
  return "pending"


def write_plan(workdir: str, spec: str, runs: Sequence[Run], metric: str | None) -> None:
  """sweep.json: what `--report` reads (the variants and seeds of every run)."""
  storage.makedirs(workdir)
  path = storage.join(workdir, PLAN_FILE)
  known: dict[str, Any] = {}
  if storage.exists(path):  # A filtered launch adds its runs to the earlier plan's.
    known = {r["name"]: r for r in json.loads(storage.read_text(path))["runs"]}
  for run in runs:
    known[run.name] = {"name": run.name, "variant": run.variant, "seed": run.point.get("seed"),
                       "overrides": run.point}
  storage.write_text_atomic(path, json.dumps(
    {"config": spec, "metric": metric, "runs": list(known.values())}, indent=2, default=str))


def log_path(run_dir: str) -> str:
  """Where a child's console output goes: `<run>/log.txt`, or for a run in a bucket a local
  file (a child's stdout must be a local file), copied to `<run>/log.txt` when it ends."""
  if not storage.is_url(run_dir):
    return os.path.join(run_dir, LOG_FILE)
  local = os.path.join(tempfile.gettempdir(), "attn-sweep-logs",
                       run_dir.split("://", 1)[1].replace("/", "__"))
  os.makedirs(local, exist_ok=True)
  return os.path.join(local, LOG_FILE)


class _Stop(Exception):
  """SIGTERM or Ctrl-C: stop the children gracefully."""


def _raise_stop(signum: int, frame: Any) -> None:
  del signum, frame
  raise _Stop


def _last_lines(path: str, n: int = 25) -> list[str]:
  with open(path, errors="replace") as f:
    return [line.rstrip("\n") for line in f.readlines()[-n:]]


def _finish(run_dir: str, argv: list[str], returncode: int, seconds: float) -> str:
  """Records a child's outcome; returns its status and a one-line message."""
  log = log_path(run_dir)
  if storage.is_url(run_dir):
    with open(log, "rb") as f:
      storage.write_bytes_atomic(storage.join(run_dir, LOG_FILE), f.read())
  if returncode == 0:  # An error.json of a launch refused meanwhile (in use) is stale now.
    storage.remove(storage.join(run_dir, ERROR_FILE))
  if returncode == 0 and storage.exists(storage.join(run_dir, "summary.json")):
    return "done"
  if returncode == 0:  # The trainer stopped early (SIGTERM) and saved: resumable, not failed.
    return "interrupted"
  tail = _last_lines(log)
  message = next((line for line in reversed(tail) if line.strip()), "(no output)")
  storage.write_text_atomic(storage.join(run_dir, ERROR_FILE), json.dumps(
    {"returncode": returncode, "error": message, "seconds": seconds, "argv": argv,
     "log_tail": tail}, indent=2))
  return "failed"


def execute(spec: str, workdir: str, runs: Sequence[Run], *, parallel: int = 1,
            extra: Sequence[str] = (), timeout: float | None = None,
            echo: Any = print, changed: Sequence[str] = (),
            allow_config_change: bool = False) -> dict[str, str]:
  """Runs what is not done yet, `parallel` at a time; returns run name -> final status.

  `changed` names runs whose config differs from the one their directory trained with: they
  are never skipped as done (the child continues or refuses them).
  """
  from attn.train import workdir_lock  # Deferred: the package imports the trainer.

  outcome: dict[str, str] = {}
  todo = []
  for run in runs:
    if status(run.workdir(workdir)) == "done" and run.name not in changed:
      outcome[run.name] = "skipped"
    else:
      todo.append(run)
  if outcome:
    echo(f"{len(outcome)} finished run(s) skipped; {len(todo)} to run.")
  active: dict[str, tuple[subprocess.Popen, float, list[str], Any, int]] = {}
  # The children stop (SIGTERM: save, exit) when this process dies, however it dies.
  env = {**os.environ, "PYTHONUNBUFFERED": "1", LAUNCHER_PID_ENV: str(os.getpid())}
  gpus, chips = devices.accelerators(parallel)
  previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
  total, started = len(todo), 0
  try:
    while todo or active:
      while todo and len(active) < parallel:
        run = todo.pop(0)
        run_dir = run.workdir(workdir)
        holder = workdir_lock.holder(run_dir)
        if holder is not None:  # Another launch trains it: write nothing into its folder.
          outcome[run.name] = "busy"
          echo(f"{'busy':>11} {run.name}: in use by {workdir_lock.describe(holder)}")
          continue
        storage.makedirs(run_dir)
        storage.remove(storage.join(run_dir, ERROR_FILE))  # A retry; the old error is in the log.
        argv = child_argv(spec, run_dir, run.point, extra)
        if allow_config_change:
          argv.append("--allow_config_change")
        slot = min(set(range(parallel)) - {a[4] for a in active.values()})
        share = devices.child_env(slot, parallel, gpus, chips=chips)
        log = open(log_path(run_dir), "a")  # noqa: SIM115 (closed when it ends)
        log.write(f"=== {datetime.datetime.now().isoformat(timespec='seconds')} "
                  f"{json.dumps(share) + ' ' if share else ''}{json.dumps(argv)}\n")
        log.flush()
        # A new session: Ctrl-C reaches only this runner, which then stops the children with
        # SIGTERM (the trainer's graceful stop) instead of interrupting them mid-step.
        proc = subprocess.Popen(argv, cwd=REPO, env={**env, **share}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        started += 1
        active[run.name] = (proc, time.monotonic(), argv, log, slot)
        where = " ".join(f"{k}={v}" for k, v in share.items())
        echo(f"[{started}/{total}] start {run.name}" + (f" ({where})" if where else ""))
      time.sleep(0.2)
      for name in list(active):
        proc, start, argv, log, _ = active[name]
        elapsed = time.monotonic() - start
        if proc.poll() is None and timeout is not None and elapsed > timeout:
          proc.kill()
          log.write(f"\nKilled by launch.sweep after {timeout:.0f}s (--timeout).\n")
          proc.wait()
        if proc.poll() is None:
          continue
        log.close()
        del active[name]
        run_dir = storage.join(workdir, name)
        outcome[name] = _finish(run_dir, argv, proc.returncode, elapsed)
        echo(f"{outcome[name]:>11} {name} ({elapsed:.0f}s){_detail(run_dir, outcome[name])}")
  except _Stop:
    echo(f"Stopping {len(active)} run(s) (SIGTERM); relaunch the same command to resume.")
    for proc, *_ in active.values():
      proc.send_signal(signal.SIGTERM)
    for name, (proc, _, _, log, _) in active.items():
      try:
        proc.wait(timeout=120)
      except subprocess.TimeoutExpired:
        proc.kill()
      log.close()
      outcome[name] = "interrupted"
    raise KeyboardInterrupt from None
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
  return outcome


def _detail(run_dir: str, state: str) -> str:
  if state == "failed":
    return ": " + json.loads(storage.read_text(storage.join(run_dir, ERROR_FILE)))["error"]
  if state == "done":
    summary, damage = report.read_summary(storage.join(run_dir, "summary.json"))
    if summary is None:
      return f": {damage}" if damage else ""
    metrics = summary["metrics"]
    return ": " + ", ".join(f"{k} {v:.4g}" for k, v in list(metrics.items())[:3]
                            if isinstance(v, (int, float)))
  return ""


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m launch.sweep",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--config", help="experiment file with get_sweep(), e.g. "
                      "experiments/norm_ablation.py[:arg]; not needed with --report")
  parser.add_argument("--workdir", required=True, help="one subdirectory per run goes here")
  parser.add_argument("--parallel", type=int, default=1, help="runs at a time")
  parser.add_argument("--seeds", type=int, default=None,
                      help="run each point with config.seed = 0..N-1 (default: the config's seed)")
  parser.add_argument("--filter", action="append", default=[],
                      help="regex on the run name; repeat to require several")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="an override for every run (not part of the run names)")
  parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
  parser.add_argument("--report", action="store_true", help="only (re)write the report")
  parser.add_argument("--metric", default=None,
                      help="eval metric that ranks the variants (default: the experiment's "
                      "SWEEP_METRIC, else loss)")
  parser.add_argument("--timeout", type=float, default=None, help="seconds before a run is killed")
  parser.add_argument("--allow_config_change", action="store_true",
                      help="continue runs whose directory trained with another config (each "
                      "records the change in its config.json)")
  args = parser.parse_args(argv)
  if not args.report and not args.config:
    parser.error("--config is required (except with --report).")
  if args.parallel < 1:
    parser.error("--parallel must be >= 1.")
  for item in args.set:
    if "=" not in item:
      parser.error(f"--set takes KEY=VALUE, got {item!r}.")
  unreachable = storage.url_support_error(args.workdir, "--workdir")
  if unreachable:  # Before any run starts (a gs:// workdir without gcsfs).
    parser.error(unreachable)
  for pattern in args.filter:
    try:
      re.compile(pattern)
    except re.error as e:
      parser.error(f"--filter {pattern!r} is not a valid regular expression: {e}.")
  return args


def main(argv: Sequence[str] | None = None) -> int:
  """The command line; returns the exit status (1 if any run failed)."""
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args.report and not args.config:
    print(report.write_report(args.workdir, metric=args.metric))
    return 0
  try:  # A missing file, a file with no sweep, a point that is no config field: one line.
    module, arg = load_experiment(args.config)
    runs = plan(args.config, seeds=args.seeds, filters=args.filter)
  except (FileNotFoundError, ValueError) as e:
    print(f"Config error: {e}", file=sys.stderr)
    return 2
  metric = args.metric or getattr(module, "SWEEP_METRIC", None)
  if not runs:
    print("No run matches the filters.")
    return 1
  # Every run's config is built before any starts: a bad --set fails here, not in N children.
  try:
    moved, refusal = check_configs(module, arg, args.workdir, runs, args.set,
                                   allow_config_change=args.allow_config_change)
    devices.accelerators(args.parallel)  # Too many runs for the TPU chips: refused now.
  except ValueError as e:
    print(f"Config error: {e}", file=sys.stderr)
    return 2
  if refusal and not args.dry_run:
    print(refusal, file=sys.stderr)
    return 2
  if args.dry_run:
    if refusal:
      print(f"This launch would be refused:\n{refusal}", file=sys.stderr)
    for run in runs:
      state = status(run.workdir(args.workdir))
      if state == "done" and run.name in moved:
        state = "done with another config"
      argv_ = child_argv(args.config, run.workdir(args.workdir), run.point, args.set)
      print(f"# {run.name} [{state}]\n{shlex.join(argv_)}")
    return 0
  write_plan(args.workdir, args.config, runs, metric)
  outcome: dict[str, str] = {}
  if not args.report:
    try:
      outcome = execute(args.config, args.workdir, runs, parallel=args.parallel,
                        extra=args.set, timeout=args.timeout, changed=moved,
                        allow_config_change=args.allow_config_change)
    except KeyboardInterrupt:
      print(report.write_report(args.workdir, metric=metric))
      return 130
  print(report.write_report(args.workdir, metric=metric))
  failed = sorted(name for name, state in outcome.items() if state == "failed")
  if failed:
    print(f"{len(failed)} run(s) failed (see <run>/error.json and log.txt): {', '.join(failed)}")
  busy = sorted(name for name, state in outcome.items() if state == "busy")
  if busy:
    print(f"{len(busy)} run(s) in use by another launch, not started (relaunch when it ends): "
          f"{', '.join(busy)}")
  return 1 if failed or busy else 0


if __name__ == "__main__":
  sys.exit(main())
