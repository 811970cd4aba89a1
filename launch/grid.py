"""Sweep points: grids, zips, seeds, filters and run names.

A sweep is a list of points; a point is a dict from a dotted config path to a value,
`{"model.norm": "rmsnorm", "optim.learning_rate": 1e-3}`, i.e. the `--config.model.norm=rmsnorm`
overrides of one run. Experiment files build theirs in `get_sweep()` from these helpers:

    from launch import grid
    def get_sweep(arg=None):
      return grid.product(
          grid.grid({"model.norm": ["layernorm", "rmsnorm"]}),
          grid.zipped({"model.norm_placement": ["pre", "post"], "optim.warmup_steps": [0, 100]}))

Keys starting with `arg.` are experiment arguments instead of config fields: `{"arg.size":
"small"}` runs `experiments/x.py:<arg>,size=small`, so a variant that changes several fields
keeps one readable name (`size=small`) and its logic stays in `get_config`. Lists concatenate
with `+`. Everything here is pure and imports nothing heavy.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

Point = dict[str, Any]

SEED_KEY = "seed"
ARG_PREFIX = "arg."
# Characters kept as-is in a run's directory name; anything else becomes '_' (plus a hash, so
# that two values differing only in such characters still get different directories).
_SAFE = re.compile(r"[^A-Za-z0-9._=,+-]")
_MAX_NAME = 120


def grid(axes: Mapping[str, Sequence[Any]]) -> list[Point]:
  """The cartesian product of the axes; the first axis varies slowest."""
  keys = list(axes)
  for key in keys:
    _check_axis(key, axes[key])
  return [dict(zip(keys, values, strict=True))
          for values in itertools.product(*(axes[k] for k in keys))]


def zipped(axes: Mapping[str, Sequence[Any]]) -> list[Point]:
  """Axes that move together: point i takes value i of every axis (all the same length)."""
  lengths = {key: len(values) for key, values in axes.items()}
  if len(set(lengths.values())) > 1:
    raise ValueError(f"zipped() needs axes of one length, got {lengths}.")
  for key, values in axes.items():
    _check_axis(key, values)
  keys = list(axes)
  rows = zip(*(axes[k] for k in keys), strict=True)
  return [dict(zip(keys, values, strict=True)) for values in rows]


def product(*sweeps: Sequence[Point]) -> list[Point]:
  """Every combination of one point from each sweep, merged (a key may appear in only one)."""
  out = []
  for parts in itertools.product(*sweeps):
    merged: Point = {}
    for part in parts:
      clash = set(merged) & set(part)
      if clash:
        raise ValueError(f"product() got the key(s) {sorted(clash)} from two sweeps.")
      merged.update(part)
    out.append(merged)
  return out


def with_seeds(points: Sequence[Point], seeds: Sequence[int]) -> list[Point]:
  """Each point once per seed (`config.seed`); a point that sets its own seed is kept as is."""
  out = []
  for point in points:
    if SEED_KEY in point:
      out.append(dict(point))
    else:
      out.extend({**point, SEED_KEY: seed} for seed in seeds)
  return out


def check_points(points: Sequence[Point], config: Mapping[str, Any] | None = None) -> None:
  """Fails early on what would only fail later, in every run: unknown keys, unpassable values.

  `config` is the experiment's ConfigDict (or nested dicts); every key that is not an `arg.`
  must name a field there.
  """
  for point in points:
    for key, value in point.items():
      if key.startswith(ARG_PREFIX):
        if not isinstance(value, (str, int, float, bool)) or re.search(r"[,=]", str(value)):
          raise ValueError(f"Sweep argument {key}={value!r} must be a plain value without ',' "
                           "or '=' (it goes into the experiment's arg string).")
        continue
      if value is None or isinstance(value, (list, dict)):
        # config_flags cannot parse these from a command line: say so before 100 runs fail.
        raise ValueError(f"Sweep value {key}={value!r} cannot be passed as --config.{key}=...; "
                         "use an explicit number, string, bool or tuple.")
      if config is not None and not _has_path(config, key):
        raise ValueError(f"Sweep key {key!r} is not a field of the experiment's config.")


def merge_arg(arg: str | None, point: Point) -> str | None:
  """The experiment arg string of a point: the base arg, then its `arg.` keys (later wins)."""
  extra = [f"{k[len(ARG_PREFIX):]}={format_value(v)}" for k, v in point.items()
           if k.startswith(ARG_PREFIX)]
  return ",".join(filter(None, [arg, *extra])) or None


def config_overrides(point: Point) -> Point:
  """The point's config fields (everything but its `arg.` keys)."""
  return {k: v for k, v in point.items() if not k.startswith(ARG_PREFIX)}


def short_keys(points: Sequence[Point]) -> dict[str, str]:
  """Dotted key -> the shortest unambiguous label: its last component unless two keys share it."""
  keys = sorted({key for point in points for key in point})
  labels = {}
  for key in keys:
    parts = key.split(".")
    for n in range(1, len(parts) + 1):
      label = ".".join(parts[-n:])
      rivals = [k for k in keys if k != key and k.split(".")[-n:] == parts[-n:]]
      if not rivals:
        break
    labels[key] = label
  return labels


def format_value(value: Any) -> str:
  """A value as a short readable string: 0.001 -> '0.001', 3e-05 -> '3e-05', True -> 'True'."""
  if isinstance(value, float):
    return f"{value:g}"
  if isinstance(value, tuple):
    return "x".join(format_value(v) for v in value)
  return str(value)


def run_name(point: Point, labels: Mapping[str, str] | None = None) -> str:
  """A readable, filesystem-safe directory name: 'norm=rmsnorm,lr=0.001,seed=0'.

  Keys keep the point's order except the seed, which goes last so that a variant's seeds sort
  together. Unsafe characters become '_' and a short hash of the exact point is appended.
  """
  labels = labels or {}
  keys = [k for k in point if k != SEED_KEY] + ([SEED_KEY] if SEED_KEY in point else [])
  if not keys:
    return "base"
  raw = ",".join(f"{labels.get(k, k)}={format_value(point[k])}" for k in keys)
  safe = _SAFE.sub("_", raw)
  if safe != raw or len(safe) > _MAX_NAME:
    digest = hashlib.sha256(repr(sorted(point.items())).encode()).hexdigest()[:8]
    safe = f"{safe[:_MAX_NAME]}-{digest}"
  return safe


def variant_of(point: Point) -> Point:
  """The point without its seed: runs that differ only by seed are one variant."""
  return {k: v for k, v in point.items() if k != SEED_KEY}


def name_runs(points: Sequence[Point]) -> list[tuple[str, Point]]:
  """(name, point) for every point; names are unique or this raises (a duplicated point)."""
  labels = short_keys(points)
  named = [(run_name(point, labels), point) for point in points]
  seen: dict[str, Point] = {}
  for name, point in named:
    if name in seen:
      raise ValueError(f"Two sweep points share the name {name!r}: {seen[name]} and {point}.")
    seen[name] = point
  return named


def select(named: Iterable[tuple[str, Point]], filters: Sequence[str]) -> list[tuple[str, Point]]:
  """The runs whose name matches every regex in `filters` (re.search; none = all)."""
  patterns = [re.compile(f) for f in filters]
  return [(name, point) for name, point in named if all(p.search(name) for p in patterns)]


def _check_axis(key: str, values: Sequence[Any]) -> None:
  if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
    raise ValueError(f"Sweep axis {key!r} needs a list of values, got {values!r}.")
  if not values:
    raise ValueError(f"Sweep axis {key!r} is empty.")


def _has_path(config: Mapping[str, Any], key: str) -> bool:
  node: Any = config
  for part in key.split("."):
    try:
      if part not in node:
        return False
      node = node[part]
    except TypeError:
      return False
  return True
