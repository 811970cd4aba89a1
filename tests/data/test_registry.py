"""Tests of attn/data/registry.py and the bad-input errors of the pipeline."""

import os
import subprocess
import sys

import pytest

from attn import data
from attn.data import registry


def test_unknown_dataset_lists_the_known_ones(make_cfg):
  with pytest.raises(data.DataError, match="Unknown dataset 'nope'.*mqar.*pystdlib"):
    data.make_iterators(make_cfg("nope"), global_batch_size=2, seed=0, process_index=0,
                        process_count=1)


def test_remote_dataset_not_prepared_says_how_to_point_at_a_bucket(tmp_path):
  with pytest.raises(data.DataError, match="not prepared.*gs://YOUR_BUCKET") as info:
    registry.open_source("lm1b", "train", str(tmp_path))
  assert "never downloads" in str(info.value)
  written = [f for _, _, files in os.walk(tmp_path) for f in files]
  assert not any("lm1b" in f for f in written)  # Nothing was downloaded or generated.


def test_empty_split_is_a_clear_error(make_cfg):
  cfg = make_cfg("mqar/tiny", train_split="train[:0]")
  with pytest.raises(data.DataError, match="empty"):
    data.make_iterators(cfg, global_batch_size=2, seed=0, process_index=0, process_count=1)


def test_unknown_split_is_a_clear_error(make_cfg):
  cfg = make_cfg("mqar/tiny", eval_split="nonexistent")
  with pytest.raises(data.DataError, match="nonexistent"):
    data.make_iterators(cfg, global_batch_size=2, seed=0, process_index=0, process_count=1)


def test_batch_must_divide_by_processes(make_cfg):
  with pytest.raises(data.DataError, match="not divisible"):
    data.make_iterators(make_cfg("mqar/tiny"), global_batch_size=5, seed=0, process_index=0,
                        process_count=2)


def test_default_data_dir_follows_env(monkeypatch, tmp_path):
  monkeypatch.setenv(registry.DATA_DIR_ENV, str(tmp_path))
  assert registry.default_data_dir() == str(tmp_path)
  monkeypatch.delenv(registry.DATA_DIR_ENV)
  assert registry.default_data_dir().endswith(os.path.join(".cache", "attn",
                                                           "tensorflow_datasets"))


def test_importing_and_using_attn_data_never_imports_tensorflow(tmp_path):
  code = (
    "import sys, attn, attn.data\n"
    "from attn.data import registry\n"
    f"registry.open_source('digits', 'test', {str(tmp_path)!r})\n"
    "assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'\n"
    "print('ok')\n"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().endswith("ok")
