"""The configs of a sweep's runs, checked before any run starts: each run's config resolved as its
child process will train with it (experiment arg, point, `--set`), each `--set` checked against
every run, and each run's config compared with the one its directory trained with."""

from __future__ import annotations

import ast
import json
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

from launch import grid

if TYPE_CHECKING:
  from launch.sweep import Run

# Children log to files; a progress bar there is only carriage returns.
QUIET = ("train.progress_bar=False",)


def parse_set(config: Any, item: str) -> tuple[str, Any]:
  """'train.num_steps=100' -> ('train.num_steps', 100), typed as the field (config_flags'
  rules); ValueError naming the key if it is not a field or the value does not parse."""
  key, _, text = item.partition("=")
  *parents, leaf = key.split(".")
  node = config
  for part in parents:
    if part not in node or not hasattr(node[part], "get_type"):
      raise ValueError(f"--set {item!r}: {key!r} is not a field of the experiment's config.")
    node = node[part]
  if leaf not in node:
    raise ValueError(f"--set {item!r}: {key!r} is not a field of the experiment's config.")
  kind = node.get_type(leaf)
  try:
    if kind is bool:
      if text.lower() not in ("true", "false", "1", "0"):
        raise ValueError("expected true or false")
      value: Any = text.lower() in ("true", "1")
    elif kind in (int, float):
      value = kind(text)
    elif kind in (tuple, list):
      value = kind(ast.literal_eval(text))
    elif kind is str:
      value = text
    else:
      try:
        value = ast.literal_eval(text)
      except (ValueError, SyntaxError):
        value = text
  except (ValueError, SyntaxError, TypeError) as e:
    raise ValueError(f"--set {item!r}: {text!r} is not a valid {kind.__name__} for {key} "
                     f"({e}).") from None
  return key, value


def resolved_config(module: ModuleType, arg: str | None, run: Run,
                    extra: Sequence[str] = ()) -> Any:
  """The config the run's child process trains with (its arg, its point, then --set)."""
  config = module.get_config(grid.merge_arg(arg, run.point))
  overrides = dict(grid.config_overrides(run.point))
  overrides.update(parse_set(config, item) for item in (*QUIET, *extra))
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      node = node[part]
    try:
      node[leaf] = value
    except (TypeError, ValueError) as e:
      raise ValueError(f"{key}={value!r} cannot be set: {e}") from None
  return config.copy_and_resolve_references()


def config_changes(module: ModuleType, arg: str | None, workdir: str, runs: Sequence[Run],
                   extra: Sequence[str] = ()) -> dict[str, dict[str, tuple[Any, Any]]]:
  """Run name -> the changes of its config against the config its directory trained with
  (only runs that have one; a run without changes is left out)."""
  from attn.train import config_identity  # Deferred: it imports the trainer's config.

  out = {}
  for run in runs:
    new = resolved_config(module, arg, run, extra)
    stored = config_identity.stored(run.workdir(workdir))
    if stored is not None and config_identity.saved_steps(run.workdir(workdir)):
      changes = config_identity.diff(stored, config_identity.as_json(new))
      if changes:
        out[run.name] = changes
  return out


def _field(config: Any, key: str) -> Any:
  for part in key.split("."):
    config = config[part]
  return config


def _static_error(config: Any) -> str | None:
  """What the trainer would refuse in this config before it needs devices or data, or None."""
  from attn.train import config as config_lib  # Deferred: it imports the trainer's config.

  try:
    config_lib.validate(config)
    config_lib.model_config(config)
  except config_lib.ConfigError as e:
    return str(e)
  return None


def check_sets(module: ModuleType, arg: str | None, runs: Sequence[Run],
               extra: Sequence[str]) -> None:
  """ValueError unless every --set names a field that no two runs of the sweep set apart (the
  runs would keep their names and all train with the --set's value) and leaves a valid config
  valid (a point whose own config the trainer refuses fails as that run, --set or not)."""
  if not extra or not runs:
    return
  bases = {run.name: resolved_config(module, arg, run) for run in runs}
  for item in extra:
    key = item.partition("=")[0]
    parse_set(next(iter(bases.values())), item)  # Not a field / does not parse: named here.
    swept = {json.dumps(_field(c, key), default=str, sort_keys=True) for c in bases.values()}
    if len(swept) > 1:
      raise ValueError(
        f"--set {item!r}: the sweep varies {key} ({', '.join(sorted(swept))}), so every run would "
        "train with the same value under its own name. Choose points with --filter, or change "
        "the experiment's get_sweep().")
  for run in runs:
    if _static_error(bases[run.name]) is None:
      error = _static_error(resolved_config(module, arg, run, extra))
      if error is not None:
        raise ValueError(f"--set {' '.join(extra)}: {error} (run {run.name})")


CHANGE_REMEDY = ("Use another --workdir for the new config, or --allow_config_change to continue "
                 "these runs with it from their newest checkpoints (recorded in each run's "
                 "config.json).")


def check_configs(module: ModuleType, arg: str | None, workdir: str, runs: Sequence[Run],
                  extra: Sequence[str] = (), *, allow_config_change: bool = False,
                  remedy: str = CHANGE_REMEDY) -> tuple[list[str], str | None]:
  """What a launch may do with runs that trained before: checked before any run starts.

  Returns the runs that are not done although finished (their config moved on: a raised
  num_steps, an allowed change; a change of operational fields only, e.g. eval_every, leaves a
  run done) and the refusal to print, or None: a finished run with a trajectory change (no step
  is left to continue with it, allowed or not), or an unfinished one without
  `allow_config_change` (that refusal ends with `remedy`). ValueError for a --set that is not a
  field, does not parse, overrides a field the sweep varies, or makes a valid config invalid
  (`check_sets`).
  """
  from attn.train import config_identity  # Deferred: it imports the trainer's config.

  check_sets(module, arg, runs, extra)
  changes = config_changes(module, arg, workdir, runs, extra)
  moved = [name for name, c in changes.items()
           if config_identity.split(c)[0] or "train.num_steps" in c]
  refused = {name: c for name, c in changes.items() if config_identity.split(c)[0]}
  finished = []
  for run in (run for run in runs if run.name in refused):
    run_dir = run.workdir(workdir)
    num_steps = resolved_config(module, arg, run, extra).train.num_steps
    step = config_identity.finished_step(run_dir, num_steps)
    if step is not None:
      finished.append(str(config_identity.finished_error(
        run_dir, step, config_identity.split(refused.pop(run.name))[0])))
  if finished:
    return moved, "\n".join([*finished, f"{len(finished)} finished run(s) with another config; "
                              "nothing was started."])
  if refused and not allow_config_change:
    lines = [f"{len(refused)} run(s) already trained with another config; nothing was started:"]
    for name, c in refused.items():
      lines.append(f"  {name}: " + ", ".join(f"{k} {json.dumps(a)} -> {json.dumps(b)}"
                                            for k, (a, b) in config_identity.split(c)[0].items()))
    return moved, "\n".join([*lines, remedy])
  return moved, None
