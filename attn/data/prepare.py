"""Prepare a dataset in a data_dir (local or gs://) so that runs can read it: the one data step.

    python -m attn.data.prepare NAME --data_dir DIR

- Embedded datasets (pystdlib, mqar, ...): generated into DIR as ArrayRecord (for a bucket, on
  local disk first, then copied). Runs do this on first use; do it once beforehand for a bucket
  that several hosts read.
- A TFRecord preparation already in DIR (what `tfds build` writes by default, and what the public
  TFDS bucket gs://tfds-data/datasets holds): converted to ArrayRecord beside it, without
  TensorFlow. A TFRecord file is a sequence of (uint64 length, uint32 masked CRC32C of the length,
  the bytes, uint32 masked CRC32C of the bytes); the bytes are the serialized examples, which an
  ArrayRecord preparation stores unchanged. The shards keep their names with `array_record` for
  `tfrecord`, and dataset_info.json names array_record as the file format and tfrecord as the
  alternative (`tfds convert_format`, which needs TensorFlow, lists array_record as the
  alternative instead; but a registered TFDS builder ignores the alternatives it reads from
  dataset_info.json, tfds 4.9.10, so data sources would still refuse it).
- Nothing in DIR: prints the commands that prepare it on a machine with TensorFlow and network.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import tempfile
from collections.abc import Iterator, Sequence

from attn import storage
from attn.data import registry

TFRECORD, ARRAY_RECORD = "tfrecord", "array_record"


def _crc32c_table() -> list[int]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), the checksum TFRecord uses; google_crc32c's C code when installed."""
  try:
    import google_crc32c  # Comes with gcsfs (the gcs extra).

    return google_crc32c.value(data)
  except ImportError:
    crc = 0xFFFFFFFF
    for byte in data:
      crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
  """TFRecord's masked CRC: rotate right by 15 bits and add a constant."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_tfrecord(path: str) -> Iterator[bytes]:
  """The records of one TFRecord file (local or gs://), checksums verified."""
  with storage.open_file(path, "rb") as f:
    while True:
      header = f.read(12)
      if not header:
        return
      if len(header) < 12:
        raise ValueError(f"{path}: truncated record header at the end of the file.")
      (length,), (length_crc,) = struct.unpack("<Q", header[:8]), struct.unpack("<I", header[8:])
      if masked_crc(header[:8]) != length_crc:
        raise ValueError(f"{path}: corrupt record length (CRC mismatch); not a TFRecord file?")
      data, footer = f.read(length), f.read(4)
      if len(data) < length or len(footer) < 4:
        raise ValueError(f"{path}: truncated record at the end of the file.")
      if masked_crc(data) != struct.unpack("<I", footer)[0]:
        raise ValueError(f"{path}: corrupt record data (CRC mismatch).")
      yield data


def write_tfrecord(path: str, records: Sequence[bytes]) -> None:
  """Writes a TFRecord file (for tests and for readers that want one)."""
  chunks = []
  for data in records:
    length = struct.pack("<Q", len(data))
    chunks += [length, struct.pack("<I", masked_crc(length)), data,
               struct.pack("<I", masked_crc(data))]
  storage.write_bytes_atomic(path, b"".join(chunks))


def _write_array_record(path: str, records: Iterator[bytes]) -> int:
  """Writes the records to an ArrayRecord file (written locally, then copied to a bucket)."""
  from array_record.python import array_record_module

  local = path
  if storage.is_url(path):
    local = os.path.join(tempfile.mkdtemp(prefix="attn-prepare-"), os.path.basename(path))
  # group_size:1 is what TFDS writes and what random access (Grain) needs to be fast.
  writer = array_record_module.ArrayRecordWriter(local, "group_size:1")
  count = 0
  for record in records:
    writer.write(record)
    count += 1
  writer.close()
  if local != path:
    with open(local, "rb") as f:
      storage.write_bytes_atomic(path, f.read())
    os.remove(local)
  return count


def convert_to_array_record(version_dir: str, echo=print) -> int:
  """Converts every TFRecord shard in a prepared dataset's folder; returns the records written."""
  shards = [n for n in storage.listdir(version_dir) if f".{TFRECORD}-" in n]
  if not shards:
    raise registry.DataError(f"No TFRecord shards (*.{TFRECORD}-*) in {version_dir}.")
  total = 0
  for name in shards:
    target = name.replace(f".{TFRECORD}-", f".{ARRAY_RECORD}-", 1)
    count = _write_array_record(storage.join(version_dir, target),
                                read_tfrecord(storage.join(version_dir, name)))
    echo(f"  {name} -> {target}: {count} records")
    total += count
  info_path = storage.join(version_dir, "dataset_info.json")
  info = json.loads(storage.read_text(info_path))
  others = [f for f in info.get("alternativeFileFormats", []) if f != ARRAY_RECORD]
  info["alternativeFileFormats"] = sorted({*others, info.get("fileFormat") or TFRECORD})
  info["fileFormat"] = ARRAY_RECORD
  # Written last: until then the preparation still reads as TFRecord-only.
  storage.write_text_atomic(info_path, json.dumps(info, indent=2))
  return total


def _formats(builder) -> set[str]:
  return {f.value for f in builder.info.available_file_formats()}


def tensorflow_commands(full: str, data_dir: str) -> str:
  """How to prepare a remote dataset on a machine with TensorFlow and network."""
  return (
    f"{full!r} is not prepared in {data_dir}. Prepare it once, on any machine with network:\n"
    "  pip install -e '.[tensorflow]'   # tfds build imports TensorFlow\n"
    f"  tfds build {full} --data_dir={data_dir} --file_format={ARRAY_RECORD}\n"
    "(Or copy an existing TFRecord preparation into place, e.g. from the public TFDS bucket\n"
    f"gs://tfds-data/datasets/{full.split('/')[0]}/..., and run this command again to convert it.)"
  )


def prepare(name: str, data_dir: str, echo=print, field: str = "--data_dir") -> str:
  """Makes `name` readable from `data_dir`; returns what was done (raises DataError if it
  cannot be done here). `field` names data_dir in error messages."""
  base, spec, full = registry.parse_name(name)
  builder = registry.get_builder(name, data_dir, field=field)  # Generates embedded datasets.
  if spec.embedded:
    return f"{full} is prepared in {builder.data_dir} ({ARRAY_RECORD})."
  if not builder.is_prepared():
    raise registry.DataError(tensorflow_commands(full, data_dir))
  if ARRAY_RECORD in _formats(builder):
    return f"{full} is already prepared in {builder.data_dir} ({ARRAY_RECORD})."
  if TFRECORD not in _formats(builder):
    raise registry.DataError(f"{builder.data_dir} holds {full} in {_formats(builder)}, which "
                             f"cannot be converted here; {tensorflow_commands(full, data_dir)}")
  echo(f"Converting {full} in {builder.data_dir} from {TFRECORD} to {ARRAY_RECORD}:")
  total = convert_to_array_record(os.fspath(builder.data_dir), echo=echo)
  return f"{full}: {total} records converted to {ARRAY_RECORD} in {builder.data_dir}."


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m attn.data.prepare",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("name", help=f"dataset[/config]: {', '.join(sorted(registry.DATASETS))}")
  parser.add_argument("--data_dir", default=None,
                      help=f"local folder or gs:// URL (default: ${registry.DATA_DIR_ENV} or "
                      "~/.cache/attn/tensorflow_datasets)")
  args = parser.parse_args(argv)
  try:
    print(prepare(args.name, args.data_dir or registry.default_data_dir()))
  except registry.DataError as e:
    print(f"Data error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
