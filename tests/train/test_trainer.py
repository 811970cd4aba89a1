"""The trainer: config errors before compilation, and the same losses on any mesh layout and
with gradient accumulation."""

import os

import numpy as np
import pytest
from jax.sharding import PartitionSpec

from attn import train
from tests.train.conftest import losses, tiny_config


@pytest.mark.parametrize("overrides,match", [
  ({"train.batch_size": 12}, r"12 rows per micro-batch must be divisible by mesh data x fsdp"),
  ({"mesh.data": 4}, r"uses 4 devices but 8 are available"),
  ({"mesh.fsdp": 3}, r"do not divide the 8 available devices"),
  ({"mesh.data": 2, "mesh.tensor": 4}, r"model.num_heads \(2\) must be divisible by "
                                       r"config.mesh.tensor \(4\)"),
  ({"train.grad_accum_steps": 3}, r"batch_size \(8\) must be divisible by "
                                  r"config.train.grad_accum_steps"),
  ({"optim.warmup_steps": -1}, r"config.optim.warmup_steps must be >= 0"),
  ({"optim.name": "adam"}, r"config.optim.name='adam' is not one of"),
  ({"model.kind": "classifier"}, r"model.kind='classifier' cannot train on 'pystdlib/small'"),
  ({"model.vocab_size": 100}, r"vocab_size=100 is smaller than the tokenizer's vocabulary"),
  ({"model.max_len": 16}, r"max_len=16 is shorter than the data's sequences \(32\)"),
  ({"model.norm": "groupnorm"}, r"model.norm='groupnorm' is not one of"),
])
def test_bad_config_is_a_clear_error_before_anything_is_written(data_dir, tmp_path, overrides,
                                                               match):
  config = tiny_config(data_dir, **overrides)
  workdir = tmp_path / "run"
  with pytest.raises(train.ConfigError, match=match):
    train.train_and_evaluate(config, str(workdir))
  assert not workdir.exists() or not any(workdir.iterdir())


def test_unknown_field_is_named(data_dir):
  config = tiny_config(data_dir)
  config.train.num_step = 5
  with pytest.raises(train.ConfigError, match=r"Unknown field\(s\) config.train.\['num_step'\]"):
    train.validate(config)


def test_unknown_data_field_is_named_with_the_known_ones(data_dir):
  config = tiny_config(data_dir)
  config.data.seq_length = 64  # seq_len misspelled: silently ignored before
  with pytest.raises(train.ConfigError, match=r"Unknown field\(s\) config.data.\['seq_length'\]; "
                     r"known: \[.*'pack', .*'seq_len', .*\]"):
    train.validate(config)


@pytest.mark.slow  # ~100 s on 2 busy cores: three runs, three sets of compiled programs.
def test_mesh_layouts_and_grad_accumulation_give_the_same_losses(data_dir, tmp_path):
  """Data parallel over 8, data x fsdp x tensor = 2 x 2 x 2, and 2 accumulated micro-batches:
  one update rule, so the same losses up to float summation order."""
  base = {"model.dropout_rate": 0.0, "train.num_steps": 3, "train.eval_every": 0,
          "train.checkpoint_every": 0, "train.batch_size": 16,
          "model.vocab_size": 260}  # 259 bytes + 1 of padding: divisible by the tensor axis
  shardings = {}

  def record(step, state, ckpt):
    kernel = state.params["decoder"]
    shardings["spec"] = [x.sharding.spec for x in _leaves_named(kernel, "kernel")]

  runs = {
    "dp": base,
    "3d": {**base, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2},
    "accum": {**base, "train.grad_accum_steps": 2},
  }
  results = {}
  for name, overrides in runs.items():
    workdir = str(tmp_path / name)
    train.train_and_evaluate(tiny_config(data_dir, **overrides), workdir,
                             hooks=[record] if name == "3d" else [])
    results[name] = losses(workdir)
  assert sorted(results["dp"]) == [1, 2, 3]
  for name in ("3d", "accum"):
    np.testing.assert_allclose([results[name][s] for s in (1, 2, 3)],
                               [results["dp"][s] for s in (1, 2, 3)], rtol=2e-5)
  # Parameters really are split over fsdp and tensor in the 3-D layout.
  used = {axis for spec in shardings["spec"] for part in spec if part
          for axis in (part if isinstance(part, tuple) else (part,))}
  assert {"fsdp", "tensor"} <= used, shardings["spec"]
  assert all(isinstance(s, PartitionSpec) for s in shardings["spec"])
  assert os.path.exists(os.path.join(str(tmp_path / "dp"), "summary.json"))


def _leaves_named(tree, name):
  out = []
  for key, value in tree.items():
    if isinstance(value, dict):
      out.extend(_leaves_named(value, name))
    elif key == name:
      out.append(value)
  return out
