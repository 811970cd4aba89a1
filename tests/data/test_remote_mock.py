"""The remote datasets' configs run through the same pipeline, with TFDS mocked (no data)."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from attn import data


@pytest.mark.parametrize("name,task,keys", [
  ("lm1b", "lm", {"inputs", "targets", "segment_ids", "positions", "weights"}),
  ("tiny_shakespeare", "lm", {"inputs", "targets", "segment_ids", "positions", "weights"}),
  ("wmt14_translate/de-en", "seq2seq", {"inputs", "inputs_segment_ids", "inputs_positions",
                                        "decoder_inputs", "targets", "targets_segment_ids",
                                        "targets_positions", "weights"}),
  ("imdb_reviews", "classify", {"inputs", "segment_ids", "positions", "label", "weights"}),
  ("glue/sst2", "classify", {"inputs", "segment_ids", "positions", "label", "weights"}),
  ("cifar10", "vision", {"image", "label", "weights"}),
])
def test_remote_config_runs_through_the_pipeline(tmp_path, name, task, keys):
  cfg = data.default_config()
  cfg.name, cfg.data_dir, cfg.seq_len = name, str(tmp_path), 32
  with tfds.testing.mock_data(num_examples=10):
    train_iter, eval_iters, info = data.make_iterators(
      cfg, global_batch_size=4, seed=0, process_index=0, process_count=1)
    batch = next(train_iter)
    evals = list(eval_iters())
  assert info.task == task and set(batch) == keys
  assert all(v.shape[0] == 4 for v in batch.values())
  if task == "vision":
    assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.float32
    assert info.num_classes == 10 and info.image_shape == (32, 32, 3)
  else:
    assert batch["inputs"].dtype == np.int32 and batch["inputs"].shape == (4, 32)
    assert info.vocab_size == 259 and batch["weights"].sum() > 0
  # 10 eval examples -> 3 batches of 4 for padded tasks; packed LM/seq2seq may need fewer.
  weights = sum(float(b["weights"].sum()) for b in evals)
  if task in ("classify", "vision"):
    assert len(evals) == 3 and weights == 10
  assert weights > 0


def test_remote_seq2seq_with_sentencepiece(tmp_path):
  cfg = data.default_config()
  cfg.name, cfg.data_dir, cfg.seq_len = "wmt14_translate/de-en", str(tmp_path), 32
  cfg.tokenizer, cfg.vocab_size = "sentencepiece", 300
  with tfds.testing.mock_data(num_examples=50):
    train_iter, _, info = data.make_iterators(cfg, global_batch_size=2, seed=0, process_index=0,
                                              process_count=1)
    batch = next(train_iter)
  assert 0 < info.vocab_size <= 300 and batch["targets"].max() < info.vocab_size
