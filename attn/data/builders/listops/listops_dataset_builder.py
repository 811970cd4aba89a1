"""listops: the Long Range Arena ListOps task (Nangia & Bowman 2018; Tay et al. 2021).

What it is: nested prefix expressions over the digits 0-9 with four operators, MIN, MAX, MED
(median, rounded down) and SM (sum modulo 10), e.g. `[MAX 4 3 [MIN 2 3 ] 1 0 [MED 1 5 8 9 2 ] ]`
= 5. The label is the value of the expression, so there are 10 classes. Models must track the
hierarchy across long sequences; LRA reports ~37% for a vanilla Transformer at length 2K.

Generation follows the published LRA definition: a node below the maximum depth is an operator
with 2..`max_args` children with probability 0.25 (else a digit); expressions whose token count
falls outside [min_len, max_len] are rejected and drawn again. Seeded, so deterministic.

Features: `inputs` (token ids, variable length), `text` (the expression) and `label` (0-9).
Ids: 0/1/2 pad/bos/eos (unused), digits 0-9 -> 3..12, `[MIN` 13, `[MAX` 14, `[MED` 15,
`[SM` 16, `]` 17; vocab 18 (in the metadata).

Configs (train/validation/test): `tiny` (depth 4, 5 args, length 8-64, mean ~18;
1,000/100/100), `small` (depth 6, 6 args, length 32-512, mean ~56; 5,000/500/500), `lra` (the
LRA setting: depth 10, 10 args, length 500-2,000, mean ~1,050; 96,000/2,000/2,000; about 6
minutes to generate on one core).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
VOCAB = tuple(str(d) for d in range(10)) + OPERATORS + ("]",)
TOKEN_IDS = {token: i + 3 for i, token in enumerate(VOCAB)}
_BRANCH_P = 0.25  # LRA: a node is a digit with probability 0.75 (VALUE_P = 0.25 branches).


class ListopsConfig(tfds.core.BuilderConfig):
  """Depth, arity, lengths and sizes of one ListOps variant."""

  def __init__(self, *, max_depth: int, max_args: int, min_len: int, max_len: int,
               sizes: tuple[int, int, int], **kwargs):
    super().__init__(**kwargs)
    self.max_depth, self.max_args = max_depth, max_args
    self.min_len, self.max_len, self.sizes = min_len, max_len, sizes


class _TooLong(Exception):
  """The tree being drawn already has more tokens than allowed."""


def _tree(rng: np.random.Generator, depth: int, max_depth: int, max_args: int, budget: list[int]):
  """A random expression tree: an int leaf or (operator, children)."""
  budget[0] -= 1
  if budget[0] < 0:
    raise _TooLong
  if depth < max_depth and rng.random() < _BRANCH_P:
    op = OPERATORS[rng.integers(len(OPERATORS))]
    n = int(rng.integers(2, max_args + 1))
    return op, [_tree(rng, depth + 1, max_depth, max_args, budget) for _ in range(n)]
  return int(rng.integers(10))


def evaluate(tree) -> int:
  """The value of an expression tree."""
  if isinstance(tree, int):
    return tree
  op, children = tree
  values = [evaluate(c) for c in children]
  if op == "[MIN":
    return min(values)
  if op == "[MAX":
    return max(values)
  if op == "[MED":
    return int(np.floor(np.median(values)))
  return sum(values) % 10


def tokens(tree) -> list[str]:
  """The prefix tokens of an expression tree."""
  if isinstance(tree, int):
    return [str(tree)]
  op, children = tree
  return [op] + [t for c in children for t in tokens(c)] + ["]"]


def make_example(rng: np.random.Generator, config: ListopsConfig) -> tuple[list[str], int]:
  """Draws expressions until one has an allowed length; returns (tokens, value)."""
  while True:
    try:
      # Abandons a tree as soon as it is too long: it would be rejected anyway, and the
      # rejection is what the LRA definition does, so the distribution is unchanged.
      tree = _tree(rng, 1, config.max_depth, config.max_args, [config.max_len])
    except _TooLong:
      continue
    toks = tokens(tree)
    if config.min_len <= len(toks) <= config.max_len and not isinstance(tree, int):
      return toks, evaluate(tree)


class Listops(tfds.core.GeneratorBasedBuilder):
  """LRA ListOps, generated from its published definition with a fixed seed."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [
    ListopsConfig(name="tiny", max_depth=4, max_args=5, min_len=8, max_len=64,
                  sizes=(1_000, 100, 100)),
    ListopsConfig(name="small", max_depth=6, max_args=6, min_len=32, max_len=512,
                  sizes=(5_000, 500, 500)),
    ListopsConfig(name="lra", max_depth=10, max_args=10, min_len=500, max_len=2_000,
                  sizes=(96_000, 2_000, 2_000)),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      description=__doc__,
      features=tfds.features.FeaturesDict({
        "inputs": tfds.features.Sequence(np.int32),
        "text": tfds.features.Text(),
        "label": tfds.features.ClassLabel(num_classes=10),
      }),
      metadata=tfds.core.MetadataDict(vocab_size=len(VOCAB) + 3, tokens=list(VOCAB)),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Generated: nothing to download.
    train, validation, test = self.builder_config.sizes
    return {"train": self._generate_examples(train, 0),
            "validation": self._generate_examples(validation, 1),
            "test": self._generate_examples(test, 2)}

  def _generate_examples(self, num: int, seed: int) -> Iterator[tuple[int, dict]]:
    rng = np.random.default_rng([seed, self.builder_config.max_len])
    for i in range(num):
      toks, value = make_example(rng, self.builder_config)
      yield i, {"inputs": np.asarray([TOKEN_IDS[t] for t in toks], np.int32),
                "text": " ".join(toks), "label": value}
