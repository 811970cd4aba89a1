"""Tests of attn/data/pipeline.py: determinism, exact resume, packing, sharding, eval padding."""

import json

import numpy as np
import pytest

from attn import data
from attn.data import registry


def _iterators(cfg, batch: int = 4, seed: int = 0, index: int = 0, count: int = 1):
  return data.make_iterators(cfg, global_batch_size=batch, seed=seed, process_index=index,
                             process_count=count)


def _take(it, n: int) -> list[dict[str, np.ndarray]]:
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a: list[dict], b: list[dict]) -> None:
  assert len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def _documents(data_dir: str, name: str, split: str) -> list[bytes]:
  """The raw texts of a split, read straight from TFDS (not through the pipeline)."""
  source = registry.open_source(name, split, data_dir)
  return [source[i]["text"] for i in range(len(source))]


@pytest.mark.parametrize("pack", [True, False])
def test_same_seed_same_batches_and_other_seed_differs(make_cfg, pack):
  cfg = make_cfg("pystdlib/tiny", seq_len=64, pack=pack)
  first = _take(_iterators(cfg, seed=3)[0], 5)
  _assert_batches_equal(first, _take(_iterators(cfg, seed=3)[0], 5))
  other = _take(_iterators(cfg, seed=4)[0], 5)
  same = [np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(first, other, strict=True)]
  assert not all(same)


@pytest.mark.parametrize("name,overrides", [
  ("pystdlib/tiny", {"seq_len": 64}),
  ("algorithmic/reverse", {"seq_len": 40}),
  ("digits", {}),
])
def test_restored_iterator_continues_with_exactly_the_next_batch(make_cfg, name, overrides):
  cfg = make_cfg(name, **overrides)
  it = _iterators(cfg)[0]
  _take(it, 7)  # Mid-epoch and, with packing, mid packed group.
  state = json.loads(json.dumps(it.get_state()))  # What a checkpoint stores must be JSON.
  expected = _take(it, 6)
  restored = _iterators(cfg)[0]
  restored.set_state(state)
  _assert_batches_equal(expected, _take(restored, 6))


def test_lm_packing_keeps_segments_apart_and_loses_no_token(make_cfg, data_dir):
  seq_len = 48
  cfg = make_cfg("pystdlib/tiny", seq_len=seq_len, pack=True)
  _, eval_iters, info = _iterators(cfg, batch=3)
  # The expected next-token windows, computed independently from the raw bytes.
  expected = []
  for text in _documents(data_dir, "pystdlib/tiny", "validation"):
    doc = [1] + [b + 3 for b in text] + [2]
    inputs, targets = doc[:-1], doc[1:]
    for start in range(0, len(inputs), seq_len):
      expected.append((tuple(inputs[start:start + seq_len]), tuple(targets[start:start + seq_len])))
  got = []
  for batch in eval_iters():
    for row in range(batch["inputs"].shape[0]):
      seg = batch["segment_ids"][row]
      # Segment ids are 1, 2, ... in order, padding only at the end.
      used = seg[seg > 0]
      assert np.all(np.diff(used) >= 0) and np.all(seg[len(used):] == 0)
      np.testing.assert_array_equal(batch["weights"][row], (seg > 0).astype(np.float32))
      for s in np.unique(used):
        mask = seg == s
        np.testing.assert_array_equal(batch["positions"][row][mask], np.arange(mask.sum()))
        got.append((tuple(batch["inputs"][row][mask]), tuple(batch["targets"][row][mask])))
      assert np.all(batch["inputs"][row][seg == 0] == 0)
  assert sorted(got) == sorted(expected)
  total_pairs = sum(len(text) + 1 for text in _documents(data_dir, "pystdlib/tiny", "validation"))
  assert sum(len(t) for _, t in got) == total_pairs
  assert info.vocab_size == 259 and info.task == "lm"


def test_lm_padding_mode_gives_one_window_per_row(make_cfg):
  cfg = make_cfg("pystdlib/tiny", seq_len=32, pack=False)
  batch = next(_iterators(cfg, batch=8)[0])
  assert set(np.unique(batch["segment_ids"])) <= {0, 1}
  lengths = batch["segment_ids"].sum(axis=1)
  for row, n in enumerate(lengths):
    np.testing.assert_array_equal(batch["positions"][row][:n], np.arange(n))
    np.testing.assert_array_equal(batch["inputs"][row][1:n], batch["targets"][row][:n - 1])


def test_seq2seq_packing_aligns_decoder_inputs_with_targets(make_cfg):
  cfg = make_cfg("algorithmic/reverse", seq_len=40)
  batch = next(_iterators(cfg)[0])
  for row in range(batch["inputs"].shape[0]):
    for s in np.unique(batch["inputs_segment_ids"][row]):
      if s == 0:
        continue
      src = batch["inputs"][row][batch["inputs_segment_ids"][row] == s]
      mask = batch["targets_segment_ids"][row] == s
      tgt, dec = batch["targets"][row][mask], batch["decoder_inputs"][row][mask]
      assert src[-1] == 2 and tgt[-1] == 2 and dec[0] == 1
      np.testing.assert_array_equal(tgt[:-1], src[:-1][::-1])  # The task: reverse.
      np.testing.assert_array_equal(dec[1:], tgt[:-1])  # Teacher forcing: shifted by one.


@pytest.mark.parametrize("name,overrides", [
  ("pystdlib/tiny", {"seq_len": 32, "pack": True}),
  ("algorithmic/reverse", {"seq_len": 40}),
  ("digits", {}),
])
def test_global_batches_do_not_depend_on_the_process_count(make_cfg, name, overrides):
  """Concatenating every process's rows gives the single-process batches, for P = 1, 2, 4;
  the iterator state is the same on every process, and one saved with P = 2 resumes with
  P = 1 and P = 4 at exactly the next global batch."""
  cfg = make_cfg(name, **overrides)
  single = _iterators(cfg, batch=8)[0]
  expected = _take(single, 5)
  expected_eval = list(_iterators(cfg, batch=8)[1]())
  for count in (2, 4):
    its = [_iterators(cfg, batch=8, index=i, count=count)[0] for i in range(count)]
    got = [[next(it) for it in its] for _ in range(5)]
    assert all(len(part["weights"]) == 8 // count for step in got for part in step)
    _assert_batches_equal(expected, [{k: np.concatenate([p[k] for p in step]) for k in step[0]}
                                     for step in got])
    states = [json.loads(json.dumps(it.get_state())) for it in its]
    assert all(state == states[0] for state in states)
    evals = [list(_iterators(cfg, batch=8, index=i, count=count)[1]()) for i in range(count)]
    assert len({len(e) for e in evals}) == 1  # Every process runs the same eval steps.
    _assert_batches_equal(expected_eval, [{k: np.concatenate([e[j][k] for e in evals])
                                           for k in evals[0][j]} for j in range(len(evals[0]))])
  assert states[0] == json.loads(json.dumps(single.get_state()))  # After 5 batches, any P.
  following = _take(single, 3)
  for count in (1, 4):
    parts = []
    for index in range(count):
      it = _iterators(cfg, batch=8, index=index, count=count)[0]
      it.set_state(states[0])
      parts.append(_take(it, 3))
    _assert_batches_equal(following, [{k: np.concatenate([p[j][k] for p in parts])
                                       for k in parts[0][j]} for j in range(3)])


@pytest.mark.parametrize("count", [2, 3])
def test_process_shards_are_disjoint_and_cover_the_split(make_cfg, data_dir, count):
  cfg = make_cfg("mqar/tiny", seq_len=32, pack=False)
  rows = []
  for index in range(count):
    _, eval_iters, info = _iterators(cfg, batch=4 * count, index=index, count=count)
    assert info.batch_size == 4
    for batch in eval_iters():
      real = batch["segment_ids"].sum(axis=1) > 0
      rows += [tuple(r) for r in batch["inputs"][real]]
  source = registry.open_source("mqar/tiny", "test", data_dir)
  expected = sorted(tuple(source[i]["inputs"]) for i in range(len(source)))
  assert sorted(rows) == expected  # Disjoint (no duplicates) and complete.


def test_train_shards_differ_between_processes(make_cfg):
  cfg = make_cfg("digits")
  a = next(_iterators(cfg, batch=8, index=0, count=2)[0])
  b = next(_iterators(cfg, batch=8, index=1, count=2)[0])
  assert a["image"].shape == (4, 8, 8, 1)
  assert not np.array_equal(a["image"], b["image"])


def test_eval_pads_last_batch_and_fills_requested_steps(make_cfg):
  cfg = make_cfg("digits")
  _, eval_iters, info = _iterators(cfg, batch=64)
  batches = list(eval_iters())
  assert len(batches) == 5 and info.eval_examples == 300  # 4 full batches + 44 real rows.
  assert [b["weights"].sum() for b in batches] == [64, 64, 64, 64, 44]
  assert all(b["image"].shape == (64, 8, 8, 1) for b in batches)
  padded = list(eval_iters(num_batches=7))
  assert len(padded) == 7 and padded[5]["weights"].sum() == 0 and padded[6]["label"].sum() == 0
  assert len(list(eval_iters(num_batches=2))) == 2
  cfg.eval_drop_remainder = True
  assert len(list(_iterators(cfg, batch=64)[1]())) == 4


def test_vision_images_are_scaled_and_labels_match_source(make_cfg, data_dir):
  cfg = make_cfg("digits")
  batch = next(_iterators(cfg, batch=300)[1]())
  source = registry.open_source("digits", "test", data_dir)
  np.testing.assert_allclose(batch["image"][5], source[5]["image"] / 127.5 - 1.0, atol=1e-6)
  assert batch["label"][5] == source[5]["label"]
  assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0


def test_classify_truncates_long_inputs_and_counts(make_cfg, data_dir):
  from attn.data import transforms

  cfg = make_cfg("listops/tiny", seq_len=16)
  before = transforms.TRUNCATED.count
  batch = next(_iterators(cfg, batch=100)[1]())
  source = registry.open_source("listops/tiny", "validation", data_dir)
  lengths = np.array([len(source[i]["inputs"]) for i in range(100)])
  np.testing.assert_array_equal(batch["segment_ids"].sum(axis=1), np.minimum(lengths, 16))
  assert transforms.TRUNCATED.count - before == int((lengths > 16).sum()) > 0
  np.testing.assert_array_equal(batch["label"], [source[i]["label"] for i in range(100)])


def test_overflow_error_policy_raises(make_cfg):
  cfg = make_cfg("listops/tiny", seq_len=16, overflow="error")
  with pytest.raises(data.DataError, match="more than the maximum 16"):
    list(_iterators(cfg, batch=100)[1]())


def test_worker_processes_give_the_same_batches(make_cfg):
  cfg = make_cfg("algorithmic/copy", seq_len=40)
  expected = _take(_iterators(cfg)[0], 3)
  cfg.num_workers = 1
  it = _iterators(cfg)[0]
  try:
    _assert_batches_equal(expected, _take(it, 3))
  finally:
    it.close()


def test_mqar_weights_mark_only_answers(make_cfg, data_dir):
  cfg = make_cfg("mqar/tiny", seq_len=32, pack=False)
  _, eval_iters, info = _iterators(cfg, batch=8)
  batch = next(eval_iters())
  assert info.vocab_size == 64
  assert batch["weights"].sum(axis=1).tolist() == [4.0] * 8  # 4 queries per example.
  source = registry.open_source("mqar/tiny", "test", data_dir)
  np.testing.assert_array_equal(batch["targets"][0], source[0]["targets"])
