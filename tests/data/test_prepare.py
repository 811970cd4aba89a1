"""attn.data.prepare: a TFRecord preparation (what `tfds build` writes by default and the public
TFDS bucket holds) becomes readable ArrayRecord without TensorFlow, locally and in a bucket."""

import dataclasses
import json
import os
import sys

import pytest
from array_record.python import array_record_module

from attn import data, storage
from attn.data import prepare, registry

NAME = "pystdlib/tiny"


def _records(path: str) -> list[bytes]:
  reader = array_record_module.ArrayRecordReader(path)
  try:
    return list(reader.read_all())
  finally:
    reader.close()


@pytest.fixture
def tfrecord_dir(tmp_path, monkeypatch) -> tuple[str, dict[str, list[bytes]]]:
  """pystdlib/tiny rewritten as a TFRecord preparation of a remote dataset; the records."""
  data_dir = str(tmp_path / "tfds")
  version_dir = os.fspath(data.get_builder(NAME, data_dir).data_dir)
  records = {}
  for name in sorted(os.listdir(version_dir)):
    if ".array_record-" in name:
      path = os.path.join(version_dir, name)
      records[name.replace(".array_record-", ".tfrecord-")] = _records(path)
      prepare.write_tfrecord(path.replace(".array_record-", ".tfrecord-"), records[
        name.replace(".array_record-", ".tfrecord-")])
      os.remove(path)
  info_path = os.path.join(version_dir, "dataset_info.json")
  with open(info_path) as f:
    info = json.load(f)
  info["fileFormat"] = "tfrecord"
  with open(info_path, "w") as f:
    json.dump(info, f)
  # Treated as a remote dataset: never generated, only read from the data_dir.
  spec = registry.DATASETS["pystdlib"]
  monkeypatch.setitem(registry.DATASETS, "pystdlib", dataclasses.replace(spec, embedded=False))
  assert len(records) == 2 and all(records.values())
  return data_dir, records


def test_crc32c_matches_the_standard_check_value(monkeypatch):
  # The CRC-32C check value (RFC 3720, B.4): crc32c(b"123456789") = 0xE3069283.
  assert prepare.crc32c(b"123456789") == 0xE3069283
  monkeypatch.setitem(sys.modules, "google_crc32c", None)  # The pure-Python fallback.
  assert prepare.crc32c(b"123456789") == 0xE3069283
  assert prepare.crc32c(b"") == 0


def test_loader_points_a_tfrecord_preparation_to_the_prepare_command(tfrecord_dir):
  data_dir, _ = tfrecord_dir
  with pytest.raises(data.DataError, match=r"prepared as tfrecord.*`python -m attn\.data\."
                     rf"prepare {NAME} --data_dir {data_dir}`"):
    registry.open_source(NAME, "train", data_dir)


def test_prepare_converts_tfrecord_to_array_record_record_for_record(tfrecord_dir, capsys):
  data_dir, records = tfrecord_dir
  assert prepare.main([NAME, "--data_dir", data_dir]) == 0
  out = capsys.readouterr().out
  assert "records converted to array_record" in out
  version_dir = os.fspath(registry.get_builder(NAME, data_dir).data_dir)
  for name, expected in records.items():
    assert _records(os.path.join(version_dir, name.replace(".tfrecord-", ".array_record-"))) \
      == expected  # The serialized examples, byte for byte.
  source = registry.open_source(NAME, "train", data_dir)
  train_records = next(v for k, v in records.items() if "-train." in k)
  assert len(source) == len(train_records) and source[0]["text"]
  # Running it again finds the ArrayRecord preparation and does nothing.
  assert prepare.main([NAME, "--data_dir", data_dir]) == 0
  assert "already prepared" in capsys.readouterr().out


def test_a_corrupt_tfrecord_names_the_file(tmp_path):
  path = str(tmp_path / "x.tfrecord-00000-of-00001")
  prepare.write_tfrecord(path, [b"hello", b"world"])
  assert list(prepare.read_tfrecord(path)) == [b"hello", b"world"]
  raw = bytearray(open(path, "rb").read())
  raw[14] ^= 1  # A bit of the first record's data.
  open(path, "wb").write(bytes(raw))
  with pytest.raises(ValueError, match=r"x\.tfrecord-00000-of-00001: corrupt record data"):
    list(prepare.read_tfrecord(path))


def test_nothing_prepared_prints_the_tensorflow_commands(tmp_path, capsys):
  assert prepare.main(["lm1b", "--data_dir", str(tmp_path)]) == 1
  err = capsys.readouterr().err
  assert "pip install -e '.[tensorflow]'" in err
  assert f"tfds build lm1b --data_dir={tmp_path} --file_format=array_record" in err


def test_an_unknown_config_is_one_line_naming_the_known_ones(tmp_path, capsys):
  assert prepare.main(["pystdlib/nosuch", "--data_dir", str(tmp_path)]) == 1
  assert capsys.readouterr().err == (
    "Data error: Dataset 'pystdlib' has no config 'nosuch': its configs are tiny, small, full.\n")
  assert prepare.main(["lm1b/nosuch", "--data_dir", str(tmp_path)]) == 1
  assert "Dataset 'lm1b' has no config 'nosuch': it has no configs." in capsys.readouterr().err
  assert os.listdir(tmp_path) == []  # Refused before anything was generated.


def test_a_bucket_without_gcsfs_names_the_flag(monkeypatch, capsys):
  monkeypatch.setattr(storage, "_installed", lambda module: False)
  assert prepare.main([NAME, "--data_dir", "gs://b/tfds"]) == 1
  err = capsys.readouterr().err
  assert err.startswith("Data error: --data_dir='gs://b/tfds' needs the gcsfs package")
  assert "config.data" not in err


def test_prepare_converts_in_a_bucket(tfrecord_dir, gcs):
  local, records = tfrecord_dir
  url = gcs.url("tfds")
  gcs.filesystem().put(local + "/", url.removeprefix("gs://") + "/", recursive=True)
  assert prepare.main([NAME, "--data_dir", url]) == 0
  source = registry.open_source(NAME, "validation", url)
  valid = next(v for k, v in records.items() if "-validation." in k)
  assert len(source) == len(valid)
  assert storage.exists(storage.join(os.fspath(registry.get_builder(NAME, url).data_dir),
                                     "dataset_info.json"))


def test_an_embedded_dataset_is_generated_into_a_bucket(gcs, capsys):
  url = gcs.url("tfds")
  assert prepare.main([NAME, "--data_dir", url]) == 0
  assert f"{NAME} is prepared in {url}/pystdlib/tiny/1.0.0" in capsys.readouterr().out
  source = registry.open_source(NAME, "validation", url)
  assert len(source) > 0 and source[0]["text"]
