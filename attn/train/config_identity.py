"""A run's config identity: the workdir keeps the resolved config of its first launch, and a
relaunch with another config is refused or recorded, never silently mixed into one run.

    identity = config_identity.check(workdir, config, allow_change=False)   # ConfigChangeError
    ...restore the newest good checkpoint...
    identity.commit(step)                # writes config.json (first launch, or a recorded change)

Fields are of two kinds. Trajectory fields (model, data, optimizer, seed, the schedule) change
what the run computes: a change is refused with a diff and the two ways out (another workdir,
or `--allow_config_change`, recorded with the step it took effect). Operational fields (eval,
log and checkpoint intervals, the progress bar, sampling, the mesh) are allowed and recorded.
A finished run (summary.json at or past `train.num_steps`) has no step left to continue, so a
trajectory change there is refused even with `--allow_config_change` (`finished_error`): the
way on is to raise num_steps too, or another workdir.

`train.num_steps` only says where to stop, but `optim.decay_steps` defaults to it, so the stored
config resolves decay_steps: raising num_steps with decay_steps unset stretches the schedule (a
trajectory change, refused with the learning rates before and after); with
`optim.decay_steps=<old num_steps>` the schedule stays and the run continues at its final
learning rate (an operational continuation).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from typing import Any

from attn import storage
from attn.errors import ConfigError

CONFIG_FILE = "config.json"
# Fields that do not change the numbers a run computes (prefixes end with '.').
OPERATIONAL = (
  "mesh.", "data.data_dir", "data.read_threads", "train.num_steps", "train.eval_every",
  "train.eval_steps", "train.checkpoint_every", "train.log_every", "train.keep_checkpoints",
  "train.keep_best", "train.best_metric", "train.best_mode", "train.async_checkpoints",
  "train.progress_bar", "train.sample_tokens", "train.sample_prompt", "train.sample_temperature",
  "train.bleu_batches", "train.heartbeat_timeout_s",
)


class ConfigChangeError(ConfigError):
  """A relaunch changes trajectory fields of the run in its workdir."""


def as_json(config: Any) -> dict[str, Any]:
  """The config as plain JSON values (tuples become lists), as config.json stores it."""
  return json.loads(json.dumps(config.to_dict() if hasattr(config, "to_dict") else config,
                               default=str))


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  """Dotted keys -> values; optim.decay_steps resolved to num_steps where unset."""
  flat: dict[str, Any] = {}
  for key, value in config.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  if not prefix and flat.get("optim.decay_steps") is None and "train.num_steps" in flat:
    flat["optim.decay_steps"] = flat["train.num_steps"]
  return flat


def is_operational(key: str) -> bool:
  return any(key == f or (f.endswith(".") and key.startswith(f)) for f in OPERATIONAL)


def diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
  """key -> (old, new) for every dotted field that differs.

  Schema changes between code versions are not config changes: a field the stored config
  lacks counts only if the new value is not its default, and a field that no longer exists
  does not count.
  """
  from attn.train.config import default_config

  a, b = flatten(old), flatten(new)
  defaults = flatten(as_json(default_config()))
  out = {}
  for k in sorted(b):
    if k not in a:
      if k in defaults and b[k] != defaults[k]:
        out[k] = (None, b[k])
    elif a[k] != b[k]:
      out[k] = (a[k], b[k])
  return out


def split(changes: dict[str, tuple[Any, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
  """(trajectory changes, operational changes)."""
  trajectory = {k: v for k, v in changes.items() if not is_operational(k)}
  return trajectory, {k: v for k, v in changes.items() if is_operational(k)}


def _read_json(path: str) -> dict[str, Any] | None:
  try:
    value = json.loads(storage.read_text(path))
    return value if isinstance(value, dict) else None
  except (OSError, ValueError):
    return None


def stored(workdir: str) -> dict[str, Any] | None:
  """The config the workdir's run trains with: config.json, else an older summary.json's."""
  record = _read_json(storage.join(workdir, CONFIG_FILE))
  if record is not None and isinstance(record.get("config"), dict):
    return record["config"]
  summary = _read_json(storage.join(workdir, "summary.json"))
  if summary is not None and isinstance(summary.get("config"), dict):
    return summary["config"]
  return None


def history(workdir: str) -> list[dict[str, Any]]:
  """The recorded config changes (step, time, kind, fields)."""
  record = _read_json(storage.join(workdir, CONFIG_FILE)) or {}
  return list(record.get("history", []))


def saved_steps(workdir: str) -> list[int]:
  """The step directories under workdir/checkpoints (complete or not), by listing only."""
  try:
    names = storage.listdir(storage.join(workdir, "checkpoints"))
  except FileNotFoundError:
    return []
  return sorted(int(n) for n in names if n.isdigit())


def _lr(optim: dict[str, Any], num_steps: int, step: int) -> float:
  import ml_collections

  from attn.train.optimizer import make_schedule

  return float(make_schedule(ml_collections.ConfigDict(optim), num_steps)(step))


def _schedule_note(old: dict[str, Any], new: dict[str, Any], step: int) -> str:
  """What a stretched schedule does to the learning rate, when num_steps moved decay_steps."""
  if new["optim"].get("decay_steps") is not None or (
      old["train"]["num_steps"] == new["train"]["num_steps"]):
    return ""
  before = _lr(old["optim"], old["train"]["num_steps"], step)
  after = _lr(new["optim"], new["train"]["num_steps"], step)
  return (f"\noptim.decay_steps is unset, so train.num_steps also sets the schedule's length: "
          f"with --allow_config_change the learning rate at step {step} jumps from {before:.4g} "
          f"to {after:.4g} (the {new['optim']['schedule']} schedule is stretched to "
          f"{new['train']['num_steps']} steps). To keep the old schedule and continue at its final "
          f"learning rate instead, also pass --config.optim.decay_steps="
          f"{old['train']['num_steps']}.")


def _lines(changes: dict[str, tuple[Any, Any]]) -> str:
  return "\n".join(f"  {k}: {json.dumps(a)} -> {json.dumps(b)}" for k, (a, b) in changes.items())


@dataclasses.dataclass
class Identity:
  """The outcome of `check`: what to write once the run knows the step it resumes from."""

  workdir: str
  config: dict[str, Any]
  first: bool  # Nothing was trained under a stored config yet: (re)write it.
  changes: dict[str, tuple[Any, Any]]
  kind: str  # "" (unchanged) | "operational" | "allowed"

  def describe(self, step: int) -> str:
    """One line naming the recorded change and the step it takes effect; "" without one."""
    if self.first or not self.changes:
      return ""
    how = " (--allow_config_change)" if self.kind == "allowed" else ""
    return (f"config change from step {step} on, {self.kind}{how}: "
            + ", ".join(f"{k} {json.dumps(a)} -> {json.dumps(b)}"
                        for k, (a, b) in self.changes.items()))

  def refuse_if_finished(self, step: int) -> None:
    """A finished run has no step left to apply an allowed trajectory change to."""
    if self.kind == "allowed":
      raise finished_error(self.workdir, step, split(self.changes)[0])

  def commit(self, step: int) -> None:
    """Writes config.json (process 0): the first launch's config, or the change at `step`."""
    import jax

    if jax.process_index() != 0 or not (self.first or self.changes):
      return
    path = storage.join(self.workdir, CONFIG_FILE)
    record = {} if self.first else (_read_json(path) or {})
    now = datetime.datetime.now().isoformat(timespec="seconds")
    record.setdefault("first_launch", now)
    record.setdefault("history", [])
    if self.changes and not self.first:
      record["history"].append({"step": step, "time": now, "kind": self.kind,
                                "changes": {k: list(v) for k, v in self.changes.items()}})
    record["config"] = self.config
    storage.write_text_atomic(path, json.dumps(record, indent=2))


def finished_step(workdir: str, num_steps: int) -> int | None:
  """The step the workdir's run finished at (its summary.json) if it reaches `num_steps`."""
  summary = _read_json(storage.join(workdir, "summary.json")) or {}
  step = summary.get("step")
  return step if isinstance(step, int) and step >= num_steps else None


def finished_error(workdir: str, step: int,
                   trajectory: dict[str, tuple[Any, Any]]) -> ConfigChangeError:
  """A trajectory change on a finished run: nothing is left to continue, so not applied."""
  return ConfigChangeError(
    f"{workdir}: the run finished at step {step} with another config, so there is no step "
    f"left to continue with the change of\n{_lines(trajectory)}\n"
    "The change was not applied (--allow_config_change continues a run from its newest "
    "checkpoint). To go on training this run with the new values, also raise "
    f"train.num_steps above {step}; to train the new config from the start, use another "
    "--workdir.")


def check(workdir: str, config: Any, *, allow_change: bool = False) -> Identity:
  """Compares `config` with the workdir's; raises ConfigChangeError on a trajectory change."""
  current = as_json(config)
  steps = saved_steps(workdir)
  old = stored(workdir) if steps else None
  if old is None:  # A new run (or nothing trained yet): this config becomes the run's.
    return Identity(workdir, current, first=True, changes={}, kind="")
  changes = diff(old, current)
  trajectory, _ = split(changes)
  finished = finished_step(workdir, current["train"]["num_steps"]) if trajectory else None
  if finished is not None:
    raise finished_error(workdir, finished, trajectory)
  if trajectory and not allow_change:
    raise ConfigChangeError(
      f"{storage.join(workdir, CONFIG_FILE)} holds the config this run trained with up to step "
      f"{steps[-1]}; this launch changes field(s) that change its training trajectory:\n"
      f"{_lines(trajectory)}\n"
      "Either use another --workdir for the new config, or continue this run with the new "
      "values from its newest checkpoint with --allow_config_change (recorded in config.json "
      "with the step it took effect)." + _schedule_note(old, current, steps[-1]))
  kind = "allowed" if trajectory else ("operational" if changes else "")
  return Identity(workdir, current, first=False, changes=changes, kind=kind)
