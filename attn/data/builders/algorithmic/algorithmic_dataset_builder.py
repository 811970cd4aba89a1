"""algorithmic: copy, reverse and sort as sequence-to-sequence tasks.

What it is: the input is a random sequence of `num_symbols` symbols with a length drawn
uniformly from [min_len, max_len]; the target is the same sequence (`copy`), reversed
(`reverse`), or sorted ascending (`sort`). Exact-match accuracy of greedy decoding is the
metric; a working encoder-decoder reaches ~100% on all three at these sizes, so a variant that
does not is broken. `reverse` needs attention that reaches across the whole input, `sort` needs
counting; `copy` is the easy control.

Features: `inputs`, `targets` (int32 ids, variable length). Ids 0/1/2 are pad/bos/eos; symbols
are 3 .. 3 + num_symbols - 1; the vocab (`vocab_size` in the metadata) is num_symbols + 3.

Configs `copy`, `reverse`, `sort`: 16 symbols, lengths 4-32, 10,000 train / 500 test examples,
each split from its own seed. Add `_long` (lengths 64-256) for long-context variants.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

_FIRST_ID = 3
TASKS = {
  "copy": lambda x: x,
  "reverse": lambda x: x[::-1],
  "sort": np.sort,
}


class AlgorithmicConfig(tfds.core.BuilderConfig):
  """One task and its sizes."""

  def __init__(self, *, task: str, num_symbols: int = 16, min_len: int = 4, max_len: int = 32,
               num_train: int = 10_000, num_test: int = 500, **kwargs):
    super().__init__(**kwargs)
    self.task, self.num_symbols, self.min_len, self.max_len = task, num_symbols, min_len, max_len
    self.num_train, self.num_test = num_train, num_test


def _configs() -> list[AlgorithmicConfig]:
  configs = []
  for task in TASKS:
    configs.append(AlgorithmicConfig(name=task, task=task, description=f"{task}, lengths 4-32."))
    configs.append(AlgorithmicConfig(name=f"{task}_long", task=task, min_len=64, max_len=256,
                                     description=f"{task}, lengths 64-256."))
  return configs


class Algorithmic(tfds.core.GeneratorBasedBuilder):
  """Copy / reverse / sort of random symbol sequences."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = _configs()

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    return self.dataset_info_from_configs(
      description=__doc__,
      features=tfds.features.FeaturesDict({
        "inputs": tfds.features.Sequence(np.int32),
        "targets": tfds.features.Sequence(np.int32),
      }),
      metadata=tfds.core.MetadataDict(vocab_size=config.num_symbols + _FIRST_ID,
                                      task=config.task),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Generated: nothing to download.
    config = self.builder_config
    return {"train": self._generate_examples(config.num_train, 0),
            "test": self._generate_examples(config.num_test, 1)}

  def _generate_examples(self, num: int, seed: int) -> Iterator[tuple[int, dict]]:
    config = self.builder_config
    rng = np.random.default_rng([seed, config.max_len])
    fn = TASKS[config.task]
    for i in range(num):
      length = int(rng.integers(config.min_len, config.max_len + 1))
      x = rng.integers(_FIRST_ID, _FIRST_ID + config.num_symbols, size=length).astype(np.int32)
      yield i, {"inputs": x, "targets": np.ascontiguousarray(fn(x)).astype(np.int32)}
