"""attn.storage on local paths, and the errors for a bucket URL this machine cannot open."""

import json

import ml_collections
import pytest

from attn import data, storage, train
from launch import sweep


def test_resolve_keeps_urls_and_makes_local_paths_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  # os.path.abspath("gs://b/run") is "<cwd>/gs:/b/run": Orbax then wrote to local disk.
  assert storage.resolve("gs://b/run") == "gs://b/run"
  assert storage.resolve("runs/x") == str(tmp_path / "runs" / "x")
  assert storage.join("gs://b/run", "checkpoints", "3") == "gs://b/run/checkpoints/3"
  assert storage.join("runs", "x") == "runs/x"


def test_local_files_round_trip(tmp_path):
  path = str(tmp_path / "a" / "b.jsonl")
  storage.write_text_atomic(path, '{"step": 1}\n')
  storage.append_text(path, '{"step": 2}\n')
  assert [json.loads(x)["step"] for x in storage.read_text(path).splitlines()] == [1, 2]
  assert storage.listdir(str(tmp_path / "a")) == ["b.jsonl"]  # No temporary file left over.
  storage.remove(path)
  storage.remove(path)  # Removing a missing file is not an error.
  assert not storage.exists(path)


@pytest.fixture
def no_gcsfs(monkeypatch):
  monkeypatch.setattr(storage, "_installed", lambda module: False)


def test_missing_gcsfs_names_the_extra(no_gcsfs):
  message = storage.url_support_error("gs://bucket/run", "--workdir")
  assert "--workdir='gs://bucket/run'" in message and "gcsfs" in message and ".[gcs]" in message
  assert storage.url_support_error("/tmp/run", "--workdir") is None
  assert "s3:// scheme is not supported" in storage.url_support_error("s3://b/x", "--workdir")


def test_trainer_refuses_a_bucket_workdir_without_gcsfs(no_gcsfs):
  config = train.default_config()
  with pytest.raises(train.ConfigError, match=r"--workdir='gs://b/run' needs the gcsfs"):
    train.train_and_evaluate(config, "gs://b/run")


def test_loader_refuses_a_bucket_data_dir_without_gcsfs(no_gcsfs):
  cfg = ml_collections.ConfigDict({"name": "lm1b", "data_dir": "gs://b/tensorflow_datasets"})
  with pytest.raises(data.DataError, match=r"config.data.data_dir=.* needs the gcsfs.*\.\[gcs\]"):
    data.make_iterators(cfg, global_batch_size=2, seed=0)


def test_sweep_refuses_a_bucket_workdir_without_gcsfs(no_gcsfs, capsys):
  with pytest.raises(SystemExit) as info:
    sweep.parse_args(["--workdir", "gs://b/sweep", "--report"])
  assert info.value.code == 2
  assert "--workdir='gs://b/sweep' needs the gcsfs package" in capsys.readouterr().err
