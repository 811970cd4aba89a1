"""mqar: multi-query associative recall, as defined in the Zoology paper (Arora et al., 2023).

What it is: each example is a sequence of `num_kv_pairs` key-value pairs (`k1 v1 k2 v2 ...`)
followed by a query region in which every key appears once more, immediately followed by its
value. A model reads left to right; at each query key it must predict the value that key was
bound to in the context. Keys are drawn without replacement from the lower half of the token
range and values from the upper half, so a key and a value are never confused. Positions of the
query region that hold no query are filled with random tokens (Zoology's `random_non_queries`).

Query placement: `power_law` (Zoology's default, exponent `power_a` = 0.01) puts most queries
soon after the context, which makes the gap between a key's binding and its query vary;
`uniform` spreads them evenly.

Features: `inputs` [seq_len] int32 and `targets` [seq_len] int32, already shifted for
next-token prediction; `targets` is 0 wherever there is no loss (everything but the value that
follows a query key). Ids 0/1/2 are pad/bos/eos and are never used, so the vocab is
`vocab_size` including them (recorded in the metadata, read by the `ids` tokenizer).

Configs (train/test examples): `tiny` (vocab 64, length 32, 4 pairs; 512/64), `l32` (tiny's
task with 16,384/256 problems, too many for a short run to memorize; its first 512 / 64 are
tiny's, as both draw from the same seeds), `l64` / `l128`
(vocab 256, length 64 / 128, 8 / 16 pairs; 8,192/256: a CPU-sized length grid), `default` (vocab
8192, length 256, 16 pairs; 20,000/1,000), `long` (vocab 8192, length 1024, 64 pairs;
20,000/1,000). Chance accuracy on the answers is 1 / number of values.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

_FIRST_ID = 3  # 0 pad, 1 bos, 2 eos are reserved.


class MqarConfig(tfds.core.BuilderConfig):
  """Sizes and query distribution of one MQAR variant."""

  def __init__(self, *, vocab_size: int, seq_len: int, num_kv_pairs: int, num_train: int,
               num_test: int, query_distribution: str = "power_law", power_a: float = 0.01,
               **kwargs):
    super().__init__(**kwargs)
    if seq_len < 4 * num_kv_pairs:
      raise ValueError(f"seq_len={seq_len} must be at least 4 * num_kv_pairs={num_kv_pairs}.")
    self.vocab_size, self.seq_len, self.num_kv_pairs = vocab_size, seq_len, num_kv_pairs
    self.num_train, self.num_test = num_train, num_test
    self.query_distribution, self.power_a = query_distribution, power_a


def make_example(rng: np.random.Generator, config: MqarConfig) -> tuple[np.ndarray, np.ndarray]:
  """One (inputs, targets) pair of length `config.seq_len`."""
  k, length = config.num_kv_pairs, config.seq_len
  half = _FIRST_ID + (config.vocab_size - _FIRST_ID) // 2
  keys = rng.choice(np.arange(_FIRST_ID, half), size=k, replace=False)
  values = rng.choice(np.arange(half, config.vocab_size), size=k, replace=False)
  # The sequence has length + 1 tokens, because inputs/targets are its two shifted views.
  query_len = length + 1 - 2 * k
  num_slots = query_len // 2  # A query occupies two positions: the key, then its value.
  if config.query_distribution == "power_law":
    x = np.arange(1, num_slots + 1, dtype=np.float64)
    p = config.power_a * x ** (config.power_a - 1)
    slots = rng.choice(num_slots, size=k, replace=False, p=p / p.sum())
  elif config.query_distribution == "uniform":
    slots = rng.choice(num_slots, size=k, replace=False)
  else:
    raise ValueError(f"Unknown query_distribution {config.query_distribution!r}.")
  order = rng.permutation(k)  # Which key is asked in which slot.
  seq = rng.integers(_FIRST_ID, config.vocab_size, size=length + 1)
  seq[0:2 * k:2], seq[1:2 * k:2] = keys, values
  answer = np.zeros(length + 1, np.int64)
  query_pos = 2 * k + 2 * slots
  seq[query_pos], seq[query_pos + 1] = keys[order], values[order]
  answer[query_pos + 1] = values[order]
  return seq[:-1].astype(np.int32), answer[1:].astype(np.int32)


class Mqar(tfds.core.GeneratorBasedBuilder):
  """Multi-query associative recall (Zoology), generated from a fixed seed."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [
    MqarConfig(name="tiny", vocab_size=64, seq_len=32, num_kv_pairs=4, num_train=512,
               num_test=64),
    # The reproductions' CPU-sized tasks (experiments/reproductions/mqar_recall.py).
    MqarConfig(name="l32", vocab_size=64, seq_len=32, num_kv_pairs=4, num_train=16_384,
               num_test=256),
    MqarConfig(name="l64", vocab_size=256, seq_len=64, num_kv_pairs=8, num_train=8_192,
               num_test=256),
    MqarConfig(name="l128", vocab_size=256, seq_len=128, num_kv_pairs=16, num_train=8_192,
               num_test=256),
    MqarConfig(name="default", vocab_size=8192, seq_len=256, num_kv_pairs=16, num_train=20_000,
               num_test=1_000),
    MqarConfig(name="long", vocab_size=8192, seq_len=1024, num_kv_pairs=64, num_train=20_000,
               num_test=1_000),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    length = config.seq_len
    return self.dataset_info_from_configs(
      description=__doc__,
      features=tfds.features.FeaturesDict({
        "inputs": tfds.features.Tensor(shape=(length,), dtype=np.int32),
        "targets": tfds.features.Tensor(shape=(length,), dtype=np.int32),
      }),
      metadata=tfds.core.MetadataDict(vocab_size=config.vocab_size, seq_len=length,
                                      num_kv_pairs=config.num_kv_pairs),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Generated: nothing to download.
    config = self.builder_config
    return {"train": self._generate_examples(config.num_train, seed=0),
            "test": self._generate_examples(config.num_test, seed=1)}

  def _generate_examples(self, num: int, seed: int) -> Iterator[tuple[int, dict]]:
    rng = np.random.default_rng([seed, self.builder_config.seq_len])
    for i in range(num):
      inputs, targets = make_example(rng, self.builder_config)
      yield i, {"inputs": inputs, "targets": targets}
