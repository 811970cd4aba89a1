"""Tests of the embedded TFDS builders (attn/data/builders/*): content checked independently."""

import os
import platform

import numpy as np
import pytest
from sklearn.datasets import load_digits

from attn.data import registry
from attn.data.builders.pystdlib import pystdlib_dataset_builder as pystdlib


def _all(source) -> list[dict]:
  return [source[i] for i in range(len(source))]


def test_pystdlib_is_the_stdlib_on_disk(data_dir):
  builder = registry.get_builder("pystdlib/tiny", data_dir)
  assert builder.info.metadata["python_version"] == platform.python_version()
  root = pystdlib.stdlib_root()
  seen = {}
  for split in ("train", "validation"):
    for record in _all(registry.open_source("pystdlib/tiny", split, data_dir)):
      path = record["path"].decode()
      assert "site-packages" not in path and path.endswith(".py")
      assert pystdlib.split_of(path) == split  # Split by the path's hash only.
      with open(os.path.join(root, path), "rb") as f:
        assert record["text"] == f.read()
      seen[path] = split
  assert len(seen) == 48 and sum(s == "validation" for s in seen.values()) >= 1
  assert all(os.path.getsize(os.path.join(root, p)) <= 8192 for p in seen)


def test_pystdlib_split_is_stable_across_configs():
  small = pystdlib.list_files(pystdlib.stdlib_root(), 400, None)
  full = pystdlib.list_files(pystdlib.stdlib_root(), None, None)
  assert small == full[:400] and len(full) > 1000
  fraction = np.mean([pystdlib.split_of(p) == "validation" for p in full])
  assert 0.02 < fraction < 0.09


def test_mqar_answers_are_the_bound_values(data_dir):
  builder = registry.get_builder("mqar/tiny", data_dir)
  assert builder.info.splits["train"].num_examples == 512
  for record in _all(registry.open_source("mqar/tiny", "test", data_dir)):
    inputs, targets = record["inputs"], record["targets"]
    bindings = dict(zip(inputs[0:8:2].tolist(), inputs[1:8:2].tolist(), strict=True))
    assert len(bindings) == 4 and min(bindings) >= 3 and max(bindings.values()) < 64
    answered = np.nonzero(targets)[0]
    assert len(answered) == 4 and answered.min() >= 8
    for t in answered:
      assert targets[t] == bindings[int(inputs[t])]  # The value bound to the queried key.
      assert inputs[t + 1] == targets[t] if t + 1 < len(inputs) else True


def test_mqar_l32_is_tiny_with_more_problems(data_dir):
  def problems(name: str, split: str) -> set[bytes]:
    return {r["inputs"].tobytes() + r["targets"].tobytes()
            for r in _all(registry.open_source(name, split, data_dir))}

  l32 = registry.get_builder("mqar/l32", data_dir)
  assert {s: l32.info.splits[s].num_examples for s in ("train", "test")} == {
    "train": 16_384, "test": 256}
  for split in ("train", "test"):  # Same seeds, so tiny's problems are among l32's.
    tiny, large = problems("mqar/tiny", split), problems("mqar/l32", split)
    assert len(tiny) > 0.9 * {"train": 512, "test": 64}[split] and tiny <= large
  # The rest are new problems: few repeat (a run of 600 x 64 rows cannot memorize them).
  assert len(problems("mqar/l32", "train")) > 16_000


def _evaluate(text: str) -> int:
  """An independent ListOps evaluator over the text form, with an explicit stack."""
  stack: list[list] = []
  result = None
  for token in text.split():
    if token.startswith("["):
      stack.append([token])
    elif token == "]":
      op, *args = stack.pop()
      value = {"[MIN": min(args), "[MAX": max(args), "[SM": sum(args) % 10,
               "[MED": sorted(args)[(len(args) - 1) // 2] if len(args) % 2 else
               (sorted(args)[len(args) // 2 - 1] + sorted(args)[len(args) // 2]) // 2}[op]
      if stack:
        stack[-1].append(value)
      else:
        result = value
    else:
      stack[-1].append(int(token))
  return result


def test_listops_labels_are_the_expression_values(data_dir):
  from attn.data.builders.listops.listops_dataset_builder import VOCAB

  records = _all(registry.open_source("listops/tiny", "train", data_dir))
  assert len(records) == 1000
  for record in records:
    text = record["text"].decode()
    assert record["label"] == _evaluate(text)
    assert [VOCAB[i - 3] for i in record["inputs"]] == text.split()
    assert 8 <= len(record["inputs"]) <= 64
  assert len({r["label"] for r in records}) == 10


@pytest.mark.parametrize("task", ["copy", "reverse", "sort"])
def test_algorithmic_targets(data_dir, task):
  fn = {"copy": lambda x: x, "reverse": lambda x: x[::-1], "sort": sorted}[task]
  records = _all(registry.open_source(f"algorithmic/{task}", "test", data_dir))
  assert len(records) == 500
  for record in records:
    assert list(record["targets"]) == list(fn(list(record["inputs"])))
    assert 4 <= len(record["inputs"]) <= 32 and min(record["inputs"]) >= 3


def test_cldr_has_real_translations(data_dir):
  records = _all(registry.open_source("cldr_translate/en_de", "train", data_dir))
  records += _all(registry.open_source("cldr_translate/en_de", "test", data_dir))
  table = {(r["category"].decode(), r["key"].decode()): (r["en"].decode(), r["target"].decode())
           for r in records}
  assert table[("territories", "DE")] == ("Germany", "Deutschland")
  assert table[("months", "1")] == ("January", "Januar")
  assert len(table) == len(records) > 1000
  assert all(en != de for en, de in table.values())


def test_digits_are_sklearn_digits(data_dir):
  bunch = load_digits()
  train = _all(registry.open_source("digits", "train", data_dir))
  test = _all(registry.open_source("digits", "test", data_dir))
  assert (len(train), len(test)) == (1497, 300)
  # TFDS stores examples in its own (key-hashed) order: compare as sets of (label, pixels).
  expected = np.round(bunch.images * 255 / 16).astype(np.uint8)

  def as_set(records):
    return sorted((int(r["label"]), r["image"].tobytes()) for r in records)

  def ref_set(idx):
    return sorted((int(bunch.target[i]), expected[i][..., None].tobytes()) for i in idx)

  assert as_set(test) == ref_set(range(0, 1797, 6))
  assert as_set(train) == ref_set([i for i in range(1797) if i % 6])


def test_preparing_twice_concurrently_is_safe(tmp_path):
  import concurrent.futures

  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    builders = list(pool.map(lambda _: registry.get_builder("mqar/tiny", str(tmp_path)), [0, 1]))
  assert all(b.is_prepared() for b in builders)
  assert len(registry.open_source("mqar/tiny", "train", str(tmp_path))) == 512
