"""Checkpoints and faults: bitwise resume after kill -9, a save killed midway, SIGTERM, NaN,
restore onto one device, a workdir holding another model, keep-N + best-by-metric."""

import json
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn import data, train
from attn.train import checkpoint
from attn.train.checkpoint import Checkpointer
from tests.train.conftest import losses, run_child, tiny_config

N = 6


@pytest.fixture(scope="module")
def reference(data_dir: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
  """N steps straight, in this process (8 devices): losses, parameter hash, workdir."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  result = train.train_and_evaluate(tiny_config(data_dir), workdir)
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  return {"workdir": workdir, "losses": losses(workdir), "sha": summary["params_sha256"],
          "result": result}


def _summary(workdir: str) -> dict:
  with open(os.path.join(workdir, "summary.json")) as f:
    return json.load(f)


def test_kill9_then_resume_is_bitwise_identical(reference, data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  proc = run_child(workdir, {"data_dir": data_dir}, mode="kill_after_checkpoint", at=3)
  assert proc.returncode == -9, proc.stderr[-3000:]
  assert Checkpointer(workdir, read_only=True).latest_step() == 3
  train.train_and_evaluate(tiny_config(data_dir), workdir)
  resumed = losses(workdir)
  assert sorted(resumed) == list(range(1, N + 1))
  assert resumed == reference["losses"]  # Exactly equal floats, before and after the kill.
  assert _summary(workdir)["params_sha256"] == reference["sha"]
  straight = checkpoint.load_params(reference["workdir"])
  restored = checkpoint.load_params(workdir)
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(restored), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_kill9_during_async_save_resumes_from_previous(reference, data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  overrides = {"data_dir": data_dir, "train.checkpoint_every": 2}
  proc = run_child(workdir, overrides, mode="kill_during_save", at=4)
  assert proc.returncode == -9, proc.stderr[-3000:]
  at_kill = json.loads(proc.stdout.split("AT_KILL", 1)[1].splitlines()[0])
  assert "4" not in at_kill and any(n.startswith("4.orbax-checkpoint-tmp") for n in at_kill)
  assert Checkpointer(workdir, read_only=True).latest_step() == 2  # The partial one is ignored.
  train.train_and_evaluate(tiny_config(data_dir, **{"train.checkpoint_every": 2}), workdir)
  assert not any("tmp" in n for n in os.listdir(os.path.join(workdir, "checkpoints")))
  assert losses(workdir) == reference["losses"]
  assert _summary(workdir)["params_sha256"] == reference["sha"]


def test_sigterm_saves_and_exits_cleanly(reference, data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  proc = run_child(workdir, {"data_dir": data_dir, "train.checkpoint_every": 0}, mode="sigterm",
                   at=2)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout.split("RESULT", 1)[1]) == {"preempted": True, "step": 2}
  assert Checkpointer(workdir, read_only=True).all_steps() == [2]
  assert not os.path.exists(os.path.join(workdir, "summary.json"))  # Not finished.
  train.train_and_evaluate(tiny_config(data_dir), workdir)
  assert _summary(workdir)["params_sha256"] == reference["sha"]


class _PoisonFrom(grain.DatasetIterator):
  """The data iterator, with NaN loss weights from the `start`-th batch on (an injected NaN
  that reaches the loss and the gradients through the same compiled step)."""

  def __init__(self, parent: grain.DatasetIterator, start: int):
    super().__init__(parent)
    self.start, self.count = start, 0

  def __next__(self) -> dict:
    batch = dict(next(self._parent))
    self.count += 1
    if self.count >= self.start:
      batch["weights"] = batch["weights"] * np.float32(np.nan)
    return batch

  def get_state(self) -> dict:
    return self._parent.get_state()

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state)


def test_nan_stops_with_step_and_never_saves(data_dir, tmp_path):
  def make_data(*args, **kwargs):
    train_iter, eval_iters, info = data.make_iterators(*args, **kwargs)
    return _PoisonFrom(train_iter, 5), eval_iters, info

  workdir = str(tmp_path / "run")
  config = tiny_config(data_dir, **{"train.checkpoint_every": 2, "train.log_every": 3})
  with pytest.raises(train.NonFiniteError, match="at step 5"):
    train.train_and_evaluate(config, workdir, make_data=make_data)
  assert Checkpointer(workdir, read_only=True).all_steps() == [2, 4]
  params = checkpoint.load_params(workdir)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_load_params_saved_on_8_devices_onto_1(reference, tmp_path):
  proc = run_child(reference["workdir"], {}, mode="load", devices=1)
  assert proc.returncode == 0, proc.stderr[-3000:]
  loaded = json.loads(proc.stdout.split("LOADED", 1)[1])
  assert loaded["devices"] == 1
  assert loaded["sha"] == reference["sha"]
  assert all("SingleDeviceSharding" in s for s in loaded["shardings"])


def test_finished_run_relaunched_does_nothing(reference, data_dir):
  workdir = reference["workdir"]
  before = {n: os.path.getmtime(os.path.join(workdir, n)) for n in os.listdir(workdir)}
  result = train.train_and_evaluate(tiny_config(data_dir), workdir)
  assert result == {k: v for k, v in reference["result"].items()}
  after = {n: os.path.getmtime(os.path.join(workdir, n)) for n in os.listdir(workdir)}
  assert after == before


def test_other_model_in_workdir_is_an_error_naming_the_parameter(reference, data_dir):
  workdir = reference["workdir"]
  listing = sorted(os.walk(workdir))
  config = tiny_config(data_dir, **{"model.mlp_dim": 96})
  # The stored config refuses it first; allowed (with steps left to continue, since the run is
  # finished), the checkpoint's shapes still cannot fit.
  with pytest.raises(train.ConfigError, match=r"model.mlp_dim: 64 -> 96"):
    train.train_and_evaluate(config, workdir)
  config.train.num_steps += 2
  with pytest.raises(train.ConfigError, match=r"parameter '.*mlp.*' has shape"):
    train.train_and_evaluate(config, workdir, allow_config_change=True)
  assert sorted(os.walk(workdir)) == listing  # Nothing written or removed.


def test_keep_latest_n_and_best_by_metric(tmp_path):
  ckpt = Checkpointer(str(tmp_path), keep=2, keep_best=1, best_metric="loss", best_mode="min")
  state = {"w": jnp.arange(4.0)}
  for step, loss in [(1, 3.0), (2, 1.0), (3, 2.0), (4, None), (5, 4.0)]:
    ckpt.save(step, {"w": state["w"] + step}, metrics=None if loss is None else {"loss": loss})
  ckpt.close()
  assert Checkpointer(str(tmp_path), read_only=True).all_steps() == [2, 4, 5]


def test_data_state_saved_by_two_processes_resumes_in_one(tmp_path):
  """The pipeline's state is the same on every process, so a checkpoint written by 2 processes
  moves a 1-process iterator to the same position; per-process states (the old sliced pipeline)
  are refused."""
  ckpt = Checkpointer(str(tmp_path))
  it = iter(grain.MapDataset.range(8).to_iter_dataset())
  assert [next(it) for _ in range(3)] == [0, 1, 2]
  ckpt.save(1, {"w": jnp.ones(2)}, it)
  next(it)
  ckpt.save(2, {"w": jnp.ones(2)}, it)
  ckpt.close()
  for step in (1, 2):
    data = tmp_path / "checkpoints" / str(step) / "data"
    (data / "process_0-of-1.json").rename(data / "process_0-of-2.json")
  one = tmp_path / "checkpoints" / "1" / "data"
  (one / "process_1-of-2.json").write_text((one / "process_0-of-2.json").read_text())
  two = tmp_path / "checkpoints" / "2" / "data"
  (two / "process_1-of-2.json").write_text((one / "process_0-of-2.json").read_text())
  ckpt = Checkpointer(str(tmp_path))
  abstract = {"w": jax.ShapeDtypeStruct((2,), jnp.float32)}
  fresh = iter(grain.MapDataset.range(8).to_iter_dataset())
  restored = ckpt.restore(1, abstract, fresh)
  np.testing.assert_array_equal(restored["w"], np.ones(2))
  assert [next(fresh) for _ in range(2)] == [3, 4]
  with pytest.raises(train.ConfigError, match="different data-iterator state per process"):
    ckpt.restore(2, abstract, fresh)
  ckpt.close()
