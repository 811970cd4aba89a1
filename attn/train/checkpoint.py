"""Checkpoints: the train state and the data iterator's position, saved together by Orbax.

    ckpt = Checkpointer(workdir, keep=2, keep_best=1, best_metric="loss", best_mode="min")
    step = ckpt.latest_step()             # None in a fresh workdir
    state = ckpt.restore(step, abstract_state, train_iter)   # also moves train_iter
    ckpt.save(step, state, train_iter, metrics=eval_metrics)  # async; ckpt.wait() to block
    params = load_params(workdir)         # any checkpoint onto one device (e.g. in Colab)

Layout: `workdir/checkpoints/<step>/{state,data,checksums}`; `data` holds one Grain state file
per process, all the same (every process runs the same global data pipeline, see
`attn.data.pipeline`), so a step written by P processes resumes with any number of processes:
the restore reads process 0's file, whatever the process count now. `checksums` holds a
fingerprint of every array and the SHA-256 of every data state. A save is complete only once
Orbax has renamed its temporary folder: a run killed midway leaves a
`*.orbax-checkpoint-tmp*` folder, which is ignored and removed at the next start.
`workdir` may be a bucket URL (`gs://...`): Orbax writes the arrays through TensorStore's gcs
driver and the rest through etils.epath; a bucket has no rename, so there a step counts as
complete once its `commit_success.txt` marker exists.

A step that fails to load or to verify is moved aside to `checkpoints/corrupt-<step>` (never
deleted) with a message naming the file and the error, and the newest good step is used
(`attn.train.recovery`).
"""

from __future__ import annotations

import json
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from attn import storage
from attn.train import checksums
from attn.train.checksums import path_name as _name
from attn.train.config import ConfigError

CHECKSUMS = "checksums"


def _directory(workdir: str) -> str:
  return storage.join(storage.resolve(workdir), "checkpoints")


class Checkpointer:
  """Our one entry to Orbax: keep the latest N plus the best N by an eval metric."""

  def __init__(self, workdir: str, *, keep: int = 2, keep_best: int = 0,
               best_metric: str = "loss", best_mode: str = "min", async_save: bool = True,
               read_only: bool = False):
    policy: Any = policies.LatestN(keep)
    if keep_best:
      # Checkpoints saved without eval metrics are left to LatestN, not kept forever.
      best = policies.BestN(get_metric_fn=lambda m: m[best_metric], reverse=best_mode == "min",
                            n=keep_best, keep_checkpoints_without_metrics=False)
      policy = policies.AnyPreservationPolicy([policy, best])
    options = ocp.CheckpointManagerOptions(
      preservation_policy=policy, enable_async_checkpointing=async_save,
      cleanup_tmp_directories=not read_only, create=not read_only, read_only=read_only,
    )
    self.directory = _directory(workdir)
    # Which handler reads and writes each item, so that item_metadata() and restore() work
    # before anything was saved in this process.
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for item, handler, save, restore in [
        ("state", ocp.StandardCheckpointHandler(), ocp.args.StandardSave, ocp.args.StandardRestore),
        ("data", grain.checkpoint.CheckpointHandler(), grain.checkpoint.CheckpointSave,
         grain.checkpoint.CheckpointRestore),
        (CHECKSUMS, ocp.JsonCheckpointHandler(), ocp.args.JsonSave, ocp.args.JsonRestore)]:
      registry.add(item, save, handler)
      registry.add(item, restore, handler)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         handler_registry=registry)

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step."""
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def saved_params(self, step: int) -> Any:
    """The saved parameters' metadata tree (shapes and dtypes), read without loading them."""
    return self.manager.item_metadata(step)["state"].tree["params"]

  def check_compatible(self, step: int, abstract_params: Any, saved: Any = None) -> None:
    """Raises ConfigError naming the first parameter that differs from the checkpoint."""
    saved = self.saved_params(step) if saved is None else saved
    saved = {_name(p): m for p, m in jax.tree_util.tree_flatten_with_path(
      saved, is_leaf=_is_array_metadata)[0]}
    wanted = {_name(p): a for p, a in jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
    for name in sorted(set(saved) | set(wanted)):
      if name not in saved or name not in wanted:
        where = "the model" if name not in saved else "the checkpoint"
        raise ConfigError(
          f"{self.directory}/{step} holds a different model: parameter {name!r} exists only in "
          f"{where}. Use another workdir, or the config that wrote this checkpoint."
        )
      if tuple(saved[name].shape) != tuple(wanted[name].shape):
        raise ConfigError(
          f"{self.directory}/{step} holds a different model: parameter {name!r} has shape "
          f"{tuple(saved[name].shape)} there but {tuple(wanted[name].shape)} in this config. "
          f"Use another workdir, or the config that wrote this checkpoint."
        )

  def save(self, step: int, state: Any, data_iter: Any = None, *,
           metrics: dict[str, float] | None = None) -> None:
    """Starts an async save (the arrays are copied off the devices before it returns)."""
    items = {"state": ocp.args.StandardSave(state)}
    sums = {"arrays": checksums.arrays(state), "data": {}}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
      sums["data"] = checksums.gather_data_sums(checksums.data_state(data_iter.get_state()))
    items[CHECKSUMS] = ocp.args.JsonSave(sums)
    self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

  def restore(self, step: int, abstract_state: Any, data_iter: Any = None) -> Any:
    """The state at `step` laid out as `abstract_state` says; moves `data_iter` to that step."""
    state = self.manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state)))["state"]
    if data_iter is not None:
      self.restore_data(step, data_iter)
    return state

  def data_state_file(self, step: int) -> str:
    """The data state file a restore reads: process 0's, whichever number of processes wrote
    the step (ConfigError if the states differ: the old per-process sliced pipeline)."""
    data_dir = storage.join(self.directory, str(step), "data")
    names = storage.listdir(data_dir) if storage.isdir(data_dir) else []
    counts = sorted(int(n[len("process_0-of-"):-len(".json")]) for n in names
                    if n.startswith("process_0-of-") and n.endswith(".json"))
    if not counts:  # Missing: reading this path fails, and recovery names it.
      return storage.join(data_dir, f"process_0-of-{jax.process_count()}.json")
    count = counts[-1]
    first, last = (storage.join(data_dir, f"process_{i}-of-{count}.json") for i in (0, count - 1))
    if count > 1 and json.loads(storage.read_text(first)) != json.loads(storage.read_text(last)):
      raise ConfigError(
        f"{data_dir} holds a different data-iterator state per process (written when each "
        "process read its own slice of the records); this version cannot carry that position "
        "over. Start a new workdir, or resume with the version that wrote it."
      )
    return first

  def check_data_processes(self, step: int) -> None:
    """ConfigError if the step's data state cannot be restored (with any process count)."""
    self.data_state_file(step)

  def restore_data(self, step: int, data_iter: Any) -> None:
    """Moves `data_iter` to where it was at `step`, whatever the process count now."""
    data_iter.set_state(json.loads(storage.read_text(self.data_state_file(step))))
    data_iter.start_prefetch()  # As Grain's own restore does.

  def wait(self) -> None:
    """Blocks until every started save is complete on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _is_array_metadata(x: Any) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype")


def load_params(workdir: str, step: int | None = None, *,
                sharding: jax.sharding.Sharding | None = None) -> Any:
  """The parameters of a checkpoint in `workdir` (latest by default), on one device.

  The layout at save time does not matter: a run saved on 8 devices (or a TPU pod) opens on a
  single CPU. Pass `sharding` to put them elsewhere.
  """
  ckpt = Checkpointer(workdir, read_only=True)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No complete checkpoint in {ckpt.directory}.")
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    metadata = ckpt.manager.item_metadata(step)["state"].tree
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                          metadata, is_leaf=_is_array_metadata)
    restored = ckpt.manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    return restored["params"]
  finally:
    ckpt.close()
