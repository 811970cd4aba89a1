"""pystdlib: a language-modelling corpus made of the running Python's standard library sources.

What it is: every `.py` file of the standard library of the interpreter that prepares it
(`sysconfig.get_paths()["stdlib"]`), one example per file, `text` = the file's source and
`path` = its path relative to the stdlib root. Third-party code (`site-packages`) and bytecode
caches are excluded; files that are not valid UTF-8 are skipped.

Why: real, varied text that exists on every machine that runs the project, so byte-level LM
runs, tests and benchmarks need no download.

Splits: a file goes to `validation` when the first byte of sha256("split:" + relative path) is < 13
(about 5%), else to `train`. The split of a file therefore never changes with the config or the
file's contents, only with its path.

Configs (sizes measured on CPython 3.11; other versions differ a little):
- `tiny`: the first 48 files in hash order no larger than 8 KB (~150 KB): for unit tests.
- `small`: the first 400 files in hash order (~7 MB): the default, quick CPU runs.
- `full`: all files (~1,800 files, ~31 MB of text, ~31 M byte tokens).

The Python version and the stdlib root are recorded in the dataset metadata
(`builder.info.metadata`), because the corpus is only reproducible on the same Python version.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sysconfig
from collections.abc import Iterator

import tensorflow_datasets as tfds

_VALIDATION_BELOW = 13  # First hash byte < 13 of 256: ~5% of files.


class PystdlibConfig(tfds.core.BuilderConfig):
  """Selects which stdlib files go in: at most `max_files`, each at most `max_bytes`."""

  def __init__(self, *, max_files: int | None = None, max_bytes: int | None = None, **kwargs):
    super().__init__(**kwargs)
    self.max_files = max_files
    self.max_bytes = max_bytes


def stdlib_root() -> str:
  """The directory of the running interpreter's standard library."""
  return sysconfig.get_paths()["stdlib"]


def _path_hash(relpath: str) -> bytes:
  return hashlib.sha256(relpath.encode("utf-8")).digest()


def list_files(root: str, max_files: int | None, max_bytes: int | None) -> list[str]:
  """Relative paths of the selected `.py` files, in hash order (a stable, mixed order)."""
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    # In-place, so os.walk does not descend: third-party packages are not the stdlib.
    dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
    for filename in filenames:
      if not filename.endswith(".py"):
        continue
      full = os.path.join(dirpath, filename)
      if max_bytes is not None and os.path.getsize(full) > max_bytes:
        continue
      found.append(os.path.relpath(full, root).replace(os.sep, "/"))
  found.sort(key=lambda p: (_path_hash(p), p))
  return found[:max_files] if max_files is not None else found


def split_of(relpath: str) -> str:
  """`validation` for ~5% of paths chosen by hash, else `train`."""
  # A salted hash: the order of files (unsalted) must not decide their split.
  return "validation" if _path_hash("split:" + relpath)[0] < _VALIDATION_BELOW else "train"


class Pystdlib(tfds.core.GeneratorBasedBuilder):
  """The running Python's standard library sources, one example per file."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [
    PystdlibConfig(name="tiny", description="48 small files, for tests.", max_files=48,
                   max_bytes=8192),
    PystdlibConfig(name="small", description="400 files.", max_files=400),
    PystdlibConfig(name="full", description="The whole standard library."),
  ]

  def _files(self) -> list[str]:
    config = self.builder_config
    return list_files(stdlib_root(), config.max_files, config.max_bytes)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      description=__doc__,
      features=tfds.features.FeaturesDict({"text": tfds.features.Text(),
                                           "path": tfds.features.Text()}),
      metadata=tfds.core.MetadataDict(
        python_version=platform.python_version(),
        python_implementation=platform.python_implementation(),
        stdlib_root=stdlib_root(),
      ),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Nothing to download: the data is the interpreter's own files.
    files = self._files()
    by_split: dict[str, list[str]] = {"train": [], "validation": []}
    for relpath in files:
      by_split[split_of(relpath)].append(relpath)
    return {name: self._generate_examples(paths) for name, paths in by_split.items()}

  def _generate_examples(self, paths: list[str]) -> Iterator[tuple[str, dict[str, str]]]:
    root = stdlib_root()
    for relpath in paths:
      with open(os.path.join(root, relpath), "rb") as f:
        raw = f.read()
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError:
        continue  # A few test fixtures use legacy encodings on purpose; they are not text to learn.
      yield relpath, {"text": text, "path": relpath}
