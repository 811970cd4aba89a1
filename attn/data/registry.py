"""Which datasets exist, where their files live, and how a split is opened.

Every dataset the pipeline can read is one `DatasetSpec` in `DATASETS`, looked up by the name
before the slash (`"pystdlib/small"` -> `DATASETS["pystdlib"]`). Embedded datasets are TFDS
builders in `attn/data/builders/` that generate their data from what is already on the machine;
they are prepared on first use. Remote datasets (lm1b, wmt, ...) are only ever read from a
`data_dir` where they were prepared before: nothing here downloads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import importlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

import tensorflow_datasets as tfds
from absl import logging

from attn import storage

DATA_DIR_ENV = "ATTN_DATA_DIR"


class DataError(ValueError):
  """A dataset, split or data option that cannot be used as configured."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """How to read one dataset: its task kind, feature names, default splits and tokenizer.

  `fields` maps the pipeline's roles to the dataset's feature names: `text` (lm), `inputs` and
  `targets` (seq2seq), `inputs` and `label` (classify), `image` and `label` (vision). Feature
  names may be paths into nested dicts written with dots (wmt: `translation.de`).
  """

  task: str  # "lm" | "seq2seq" | "classify" | "vision"
  fields: Mapping[str, str]
  train_split: str = "train"
  eval_split: str = "test"
  tokenizer: str = "byte"  # "byte" | "sentencepiece" | "ids" (pre-tokenized) | "none" (vision)
  embedded: bool = False
  default_config: str | None = None  # builder config used when the name has none
  num_classes: int | None = None
  # Legacy TFDS builders register only when their module is imported, and without TensorFlow
  # TFDS does not import them by itself.
  module: str | None = None


DATASETS: dict[str, DatasetSpec] = {
  # Embedded: generated or built from data already on the machine.
  "pystdlib": DatasetSpec(
    "lm", {"text": "text"}, eval_split="validation", embedded=True, default_config="small"
  ),
  "mqar": DatasetSpec(
    "lm", {"inputs": "inputs", "targets": "targets"}, tokenizer="ids", embedded=True,
    default_config="default",
  ),
  "listops": DatasetSpec(
    "classify", {"inputs": "inputs", "label": "label"}, eval_split="validation", tokenizer="ids",
    embedded=True, default_config="small", num_classes=10,
  ),
  "algorithmic": DatasetSpec(
    "seq2seq", {"inputs": "inputs", "targets": "targets"}, tokenizer="ids", embedded=True,
    default_config="reverse",
  ),
  "cldr_translate": DatasetSpec(
    "seq2seq", {"inputs": "en", "targets": "target"}, embedded=True, default_config="en_de"
  ),
  "digits": DatasetSpec(
    "vision", {"image": "image", "label": "label"}, tokenizer="none", embedded=True,
    num_classes=10,
  ),
  # Remote: read from a data_dir (a bucket on a TPU VM) where they were prepared.
  "lm1b": DatasetSpec("lm", {"text": "text"}),
  "tiny_shakespeare": DatasetSpec("lm", {"text": "text"}),
  "wmt14_translate": DatasetSpec(
    "seq2seq", {"inputs": "en", "targets": "de"}, eval_split="validation", default_config="de-en",
    module="tensorflow_datasets.translate.wmt14",
  ),
  "wmt17_translate": DatasetSpec(
    "seq2seq", {"inputs": "en", "targets": "de"}, eval_split="validation", default_config="de-en",
    module="tensorflow_datasets.translate.wmt17",
  ),
  "imdb_reviews": DatasetSpec("classify", {"inputs": "text", "label": "label"}, num_classes=2),
  "glue": DatasetSpec(
    "classify", {"inputs": "sentence", "label": "label"}, eval_split="validation",
    default_config="sst2", num_classes=2, module="tensorflow_datasets.text.glue",
  ),
  "cifar10": DatasetSpec(
    "vision", {"image": "image", "label": "label"}, tokenizer="none", num_classes=10
  ),
  "imagenet2012": DatasetSpec(
    "vision", {"image": "image", "label": "label"}, eval_split="validation", tokenizer="none",
    num_classes=1000,
  ),
}


def parse_name(name: str) -> tuple[str, DatasetSpec, str]:
  """Splits `"base/config"` and returns (base, spec, full TFDS name with a config if any)."""
  base, _, config = name.partition("/")
  if base not in DATASETS:
    raise DataError(f"Unknown dataset {name!r}. Known datasets: {', '.join(sorted(DATASETS))}.")
  spec = DATASETS[base]
  config = config or spec.default_config
  return base, spec, f"{base}/{config}" if config else base


def default_local_cache() -> str:
  """~/.cache/attn/tensorflow_datasets: embedded datasets are prepared here by default."""
  return os.path.join(os.path.expanduser("~"), ".cache", "attn", "tensorflow_datasets")


def default_data_dir() -> str:
  """$ATTN_DATA_DIR if set, else ~/.cache/attn/tensorflow_datasets."""
  return os.environ.get(DATA_DIR_ENV) or default_local_cache()


def _import_builder(base: str) -> None:
  # Importing the module registers the builder class with TFDS under its snake-case name.
  importlib.import_module(f"attn.data.builders.{base}.{base}_dataset_builder")


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
  """An exclusive advisory lock, so that parallel test workers prepare a dataset only once."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def file_lock(data_dir: str, key: str) -> contextlib.AbstractContextManager[None]:
  """The lock for preparing `key` (a dataset or tokenizer) inside `data_dir`."""
  name = key.replace("/", "__") + ".lock"
  if not storage.is_url(data_dir):
    return _file_lock(os.path.join(data_dir, ".locks", name))
  # A bucket has no advisory locks (fcntl on a URL cannot work), so the lock for a gs://
  # data_dir is a local file named after the URL: it stops the processes of one machine (test
  # workers, `launch.sweep --parallel`) from preparing the same data twice, the race that happens
  # in practice. A cross-machine lock would need a lease object with generation preconditions;
  # instead, data in a bucket is prepared once beforehand (`python -m attn.data.prepare NAME
  # --data_dir gs://...`), so several hosts of a multi-host run only read it.
  digest = hashlib.sha1(data_dir.encode()).hexdigest()[:12]
  return _file_lock(os.path.join(default_local_cache(), ".locks", digest, name))


def _check_config(base: str, full: str) -> None:
  """An unknown builder config is a DataError listing the known ones (TFDS's own error is a
  traceback ending in a list of merely similar names)."""
  config = full.partition("/")[2]
  try:
    names = [c.name for c in tfds.builder_cls(base).BUILDER_CONFIGS]
  except Exception:  # Not registered here: tfds.builder gives its own message.
    return
  if config and config not in names:
    known = f"its configs are {', '.join(names)}" if names else "it has no configs"
    raise DataError(f"Dataset {base!r} has no config {config!r}: {known}.")


def get_builder(name: str, data_dir: str | None = None,
                field: str = "config.data.data_dir") -> tfds.core.DatasetBuilder:
  """The TFDS builder for `name`; embedded ones are prepared here on first use. `field` names
  where data_dir came from (the config field, or a flag) in error messages."""
  base, spec, full = parse_name(name)
  data_dir = data_dir or default_data_dir()
  # Before TFDS touches the path: a gs:// data_dir without gcsfs is a DataError naming the
  # extra, not fsspec's ImportError from deep inside TFDS.
  message = storage.url_support_error(data_dir, field)
  if message:
    raise DataError(message)
  if not spec.embedded:
    if spec.module:
      importlib.import_module(spec.module)
    _check_config(base, full)
    return tfds.builder(full, data_dir=data_dir)
  _import_builder(base)
  _check_config(base, full)
  builder = tfds.builder(full, data_dir=data_dir, file_format="array_record")
  if not builder.is_prepared():
    # TFDS writes into a temporary folder and renames it when done; the lock stops a second
    # process from generating the same data at the same time.
    with file_lock(data_dir, full):
      builder = tfds.builder(full, data_dir=data_dir, file_format="array_record")
      if not builder.is_prepared():
        logging.info("Preparing embedded dataset %s in %s", full, data_dir)
        if storage.is_url(data_dir):
          _prepare_and_upload(full, data_dir)
        else:
          _prepare(tfds.builder(full, data_dir=data_dir, file_format="array_record"))
        builder = tfds.builder(full, data_dir=data_dir, file_format="array_record")
  return builder


def _prepare(builder: tfds.core.DatasetBuilder) -> None:
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))


def _prepare_and_upload(full: str, data_dir: str) -> None:
  """Generates an embedded dataset on local disk, then copies it into the bucket: ArrayRecord's
  writer opens only local files (it fails on a gs:// path)."""
  digest = hashlib.sha1(data_dir.encode()).hexdigest()[:12]
  local = os.path.join(default_local_cache(), ".staging", digest)
  builder = tfds.builder(full, data_dir=local, file_format="array_record")
  if not builder.is_prepared():
    _prepare(builder)
  files = []
  for root, _, names in os.walk(os.path.join(local, full.split("/")[0])):
    files += [os.path.relpath(os.path.join(root, n), local) for n in names]
  # dataset_info.json last: TFDS counts a dataset as prepared once it exists.
  for rel in sorted(files, key=lambda f: os.path.basename(f) == "dataset_info.json"):
    with open(os.path.join(local, rel), "rb") as f:
      storage.write_bytes_atomic(storage.join(data_dir, *rel.split(os.sep)), f.read())


def prepare_command(full: str, data_dir: str) -> str:
  return f"python -m attn.data.prepare {full} --data_dir {data_dir}"


def _not_prepared_message(full: str, data_dir: str, split: str) -> str:
  return (
    f"Dataset {full!r} (split {split!r}) is not prepared in data_dir={data_dir!r}, and attn never "
    "downloads at run time. Point config.data.data_dir at a folder or bucket where it was "
    "prepared with file_format=array_record, e.g. on a TPU VM: "
    "--config.data.data_dir=gs://YOUR_BUCKET/tensorflow_datasets (or export "
    f"{DATA_DIR_ENV}=gs://YOUR_BUCKET/tensorflow_datasets). `{prepare_command(full, data_dir)}` "
    "prints how to prepare it (`tfds build ... --file_format=array_record` on a machine with "
    "TensorFlow and network), or converts a TFRecord preparation copied there."
  )


def _random_access(builder: tfds.core.DatasetBuilder) -> bool:
  """Whether a prepared dataset has a format that data sources read (ArrayRecord)."""
  formats = builder.info.available_file_formats()
  return bool(formats & tfds.core.file_adapters.FileFormat.with_random_access())


def _check_split(builder: tfds.core.DatasetBuilder, full: str, split: str, data_dir: str) -> None:
  """Clear errors for an unknown or empty split, before TFDS gives a cryptic one."""
  known = ", ".join(sorted(builder.info.splits))
  try:
    num = builder.info.splits[split].num_examples
  except (KeyError, ValueError, AssertionError) as e:
    raise DataError(f"Split {split!r} is not in {full!r}: its splits are {known}.") from e
  if num == 0:
    raise DataError(f"Split {split!r} of {full!r} in {data_dir!r} is empty: nothing to read.")


def open_source(name: str, split: str, data_dir: str | None = None) -> Any:
  """A random-access TFDS data source for one split (array_record, no TensorFlow)."""
  _, spec, full = parse_name(name)
  data_dir = data_dir or default_data_dir()
  builder = get_builder(name, data_dir)
  if builder.is_prepared():
    _check_split(builder, full, split, data_dir)
    if not _random_access(builder):
      # TFDS's own message here says "delete the data"; converting it keeps it.
      formats = ", ".join(sorted(f.value for f in builder.info.available_file_formats()))
      raise DataError(
        f"{full!r} in {builder.data_dir} is prepared as {formats}, which runs cannot read "
        "(random access needs array_record). Convert it in place, without TensorFlow: "
        f"`{prepare_command(full, data_dir)}`."
      )
  try:
    source = builder.as_data_source(split=split)
  except Exception as e:  # TFDS raises several types here (NotImplementedError, ValueError, ...).
    if not spec.embedded and not builder.is_prepared():
      raise DataError(_not_prepared_message(full, data_dir, split)) from e
    raise DataError(f"Cannot open split {split!r} of {full!r} in {data_dir!r}: {e}") from e
  if len(source) == 0:
    raise DataError(f"Split {split!r} of {full!r} in {data_dir!r} is empty: nothing to read.")
  return source


def get_feature(example: Mapping[str, Any], path: str) -> Any:
  """Reads a feature by name; dots walk into nested feature dicts."""
  for key in path.split("."):
    example = example[key]
  return example
