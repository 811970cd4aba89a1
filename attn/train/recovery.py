"""Checkpoints that fail to load or to verify: moved aside, never deleted, never used.

    step = recovery.latest_usable(ckpt, abstract_state)     # before compiling: metadata reads
    step, state = recovery.restore_newest(ckpt, abstract_state, train_iter)   # or (None, None)

A step whose files do not read back as written (truncated, flipped bits, garbage metadata, an
empty manifest, a missing item, arrays or a data state that differ from their recorded
checksums) is renamed to `checkpoints/corrupt-<step>` with a one-paragraph message naming the
file and the error, and the next newer-to-older step is tried. A step that holds another model
or optimizer is not damage: that is a ConfigError, and nothing is moved.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from attn import storage
from attn.errors import ConfigError
from attn.train import checksums
from attn.train.checkpoint import CHECKSUMS, Checkpointer, _is_array_metadata


class CorruptCheckpointError(RuntimeError):
  """A checkpoint step that cannot be read back as it was written."""


@contextlib.contextmanager
def _blame(path: str) -> Iterator[None]:
  """Turns any error inside into CorruptCheckpointError('<path>: <error>') (ConfigError passes)."""
  try:
    yield
  except (ConfigError, CorruptCheckpointError):
    raise
  except Exception as e:  # Whatever a damaged file makes Orbax, TensorStore or Grain raise.
    raise CorruptCheckpointError(f"{path}: {type(e).__name__}: {e}") from e


def check_optimizer_state(where: str, abstract: Any, saved: Any) -> None:
  """ConfigError if the optimizer state's arrays differ from the checkpoint's (another optim)."""
  def shapes(tree: Any) -> list[tuple[int, ...]]:
    return sorted(tuple(x.shape) for x in jax.tree.leaves(tree, is_leaf=_is_array_metadata))

  have, want = shapes(saved), shapes(abstract)
  if have != want:
    raise ConfigError(
      f"{where} holds the state of another optimizer ({len(have)} arrays; this config's has "
      f"{len(want)}{'' if len(have) != len(want) else ' of other shapes'}): config.optim differs "
      "from the run that wrote it, and its moments cannot be carried over. Use another "
      "workdir, or the optim settings that wrote this checkpoint.")


def _first_bad_json(step_dir: str) -> str | None:
  """The first of the step's JSON metadata files that does not parse (to name it)."""
  for name in ("_CHECKPOINT_METADATA", "state/_METADATA", "state/_sharding"):
    path = storage.join(step_dir, name)
    try:
      json.loads(storage.read_text(path))
    except FileNotFoundError:
      continue
    except (OSError, ValueError):
      return path
  return None


def _agree_failed(error: BaseException | None) -> bool:
  """True on every process if any process failed (they must take the same fallback)."""
  if jax.process_count() == 1:
    return error is not None
  from jax.experimental import multihost_utils

  flags = multihost_utils.process_allgather(np.int32(error is not None))
  return bool(np.any(flags))


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def _recorded_sums(ckpt: Checkpointer, step_dir: str) -> dict[str, Any] | None:
  """The step's recorded checksums; None for a checkpoint written before they existed."""
  meta_path = storage.join(step_dir, "_CHECKPOINT_METADATA")
  with _blame(meta_path):
    handlers = json.loads(storage.read_text(meta_path)).get("item_handlers", {})
  if CHECKSUMS not in handlers:
    return None
  path = storage.join(step_dir, CHECKSUMS)
  with _blame(path):
    if not storage.isdir(path):
      raise FileNotFoundError("the item is missing")
    sums = ckpt.manager.restore(int(storage.Path(step_dir).name), args=ocp.args.Composite(
      **{CHECKSUMS: ocp.args.JsonRestore()}))[CHECKSUMS]
    if not isinstance(sums, dict) or not isinstance(sums.get("arrays"), dict):
      raise ValueError(f"not a checksum record: {str(sums)[:80]}")
  return sums


def _verified_restore(ckpt: Checkpointer, step: int, abstract_state: Any, data_iter: Any) -> Any:
  """`restore` plus the checksum checks; CorruptCheckpointError names the file."""
  step_dir = storage.join(ckpt.directory, str(step))
  sums = _recorded_sums(ckpt, step_dir)
  if data_iter is not None:
    ckpt.check_data_processes(step)
  if sums is not None and data_iter is not None:
    path = ckpt.data_state_file(step)  # Process 0's: the same on every process.
    name = storage.Path(path).name
    with _blame(path):
      actual = checksums.data_state(json.loads(storage.read_text(path)))
      if sums.get("data", {}).get(name) != actual:
        raise ValueError("the data iterator state does not match its recorded SHA-256")
  with _blame(storage.join(step_dir, "state")):
    state = ckpt.manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state)))["state"]
    if sums is not None:
      bad = checksums.compare(sums["arrays"], checksums.arrays(state))
      if bad:
        raise ValueError(f"{len(bad)} array(s) differ from their recorded checksums: "
                         f"{', '.join(bad[:4])}{', ...' if len(bad) > 4 else ''}")
  if data_iter is not None:
    with _blame(storage.join(step_dir, "data")):
      ckpt.restore_data(step, data_iter)
  return state


def quarantine(ckpt: Checkpointer, step: int, error: BaseException) -> str:
  """Moves step `step` to corrupt-<step> (process 0); returns the message it printed."""
  source = storage.join(ckpt.directory, str(step))
  target = storage.join(ckpt.directory, f"corrupt-{step}")
  n = 1
  while storage.exists(target):
    n += 1
    target = storage.join(ckpt.directory, f"corrupt-{step}.{n}")
  text = " ".join(str(error).split())
  if len(text) > 600:
    text = text[:600] + " [...]"
  message = (f"Checkpoint step {step} in {ckpt.directory} cannot be used: {text}. It was moved "
             f"to {target} (nothing was deleted; inspect or remove it yourself), and the run "
             "resumes from the newest good step before it (or from scratch if there is none).")
  if jax.process_index() == 0:
    storage.Path(source).rename(target)
    print(message, file=sys.stderr, flush=True)
  _sync(f"quarantine-{step}")
  ckpt.manager.reload()
  return message


def latest_usable(ckpt: Checkpointer, abstract_state: Any) -> int | None:
  """The newest step whose metadata reads and fits `abstract_state` (ConfigError if it holds
  another model or optimizer state); unreadable steps are moved aside."""
  while (step := ckpt.latest_step()) is not None:
    step_dir = storage.join(ckpt.directory, str(step))
    try:
      error = None
      with _blame(_first_bad_json(step_dir) or storage.join(step_dir, "state")):
        saved = ckpt.manager.item_metadata(step)["state"].tree
    except CorruptCheckpointError as e:
      error = e
    if _agree_failed(error):
      quarantine(ckpt, step, error or CorruptCheckpointError("unreadable on another process"))
      continue
    ckpt.check_compatible(step, abstract_state.params, saved["params"])
    check_optimizer_state(f"{ckpt.directory}/{step}", abstract_state.opt_state,
                          saved.get("opt_state"))
    return step
  return None


def restore_newest(ckpt: Checkpointer, abstract_state: Any,
                   data_iter: Any = None) -> tuple[int | None, Any]:
  """(step, state) of the newest step that loads and verifies, moving bad ones aside;
  (None, None) if none does (`data_iter` is then back at its starting position)."""
  start = data_iter.get_state() if data_iter is not None else None
  while (step := ckpt.latest_step()) is not None:
    state, error = None, None
    try:
      state = _verified_restore(ckpt, step, abstract_state, data_iter)
    except CorruptCheckpointError as e:
      error = e
    if not _agree_failed(error):
      return step, state
    quarantine(ckpt, step, error or CorruptCheckpointError("failed on another process"))
  if data_iter is not None:
    data_iter.set_state(start)
  return None, None
