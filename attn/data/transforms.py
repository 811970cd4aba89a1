"""Per-example and per-batch transforms of the Grain pipelines (picklable, NumPy only).

Example-level: a TFDS record -> token arrays (`Encode`), long LM documents -> windows
(`LMWindows`), padding to a fixed length (`pad_example`). Batch-level: Grain's packed or padded
features -> the batch format documented in `attn.data.pipeline` (`finalize_batch`).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np
from absl import logging

from attn.data.registry import DataError, DatasetSpec, get_feature
from attn.data.tokenizers import BOS_ID, EOS_ID, PAD_ID, Tokenizer


class _OverflowCounter:
  """Counts truncated examples in this process and logs at powers of two (not every time)."""

  def __init__(self):
    self._lock = threading.Lock()
    self.count = 0

  def add(self, what: str, length: int, limit: int) -> None:
    with self._lock:
      self.count += 1
      count = self.count
    if count & (count - 1) == 0:
      logging.warning(
        "Truncated %d example(s) so far to the maximum length (latest: %s of length %d > %d). "
        "Set config.data.overflow='error' to fail instead.", count, what, length, limit,
      )


TRUNCATED = _OverflowCounter()


def _fit(ids: np.ndarray, limit: int, overflow: str, what: str) -> np.ndarray:
  """Applies the overflow policy to one sequence."""
  if len(ids) <= limit:
    return ids
  if overflow == "error":
    raise DataError(
      f"A {what} sequence has {len(ids)} tokens, more than the maximum {limit}. Raise the "
      "length in config.data or set config.data.overflow='truncate'."
    )
  TRUNCATED.add(what, len(ids), limit)
  return ids[:limit]


@dataclasses.dataclass(frozen=True)
class Encode:
  """A TFDS record -> a dict of 1-D int32 arrays (and scalars), according to the task.

  lm: `tokens` = [bos] + text + [eos] (windows are cut later), or for pre-tokenized datasets
  `inputs`/`targets` as stored. seq2seq: `inputs` = source + [eos], `targets` = target + [eos],
  `decoder_inputs` = [bos] + target (teacher forcing, so that models never shift).
  classify: `inputs` (no specials), `label`, `weights`. vision: `image` in [-1, 1], `label`.
  """

  spec: DatasetSpec
  tokenizer: Tokenizer | None
  seq_len: int
  target_len: int
  overflow: str

  def __call__(self, record: Mapping[str, Any]) -> dict[str, Any]:
    task, fields = self.spec.task, self.spec.fields
    if task == "lm" and "text" in fields:
      ids = self.tokenizer.encode(get_feature(record, fields["text"]))
      return {"tokens": np.concatenate([[BOS_ID], ids, [EOS_ID]]).astype(np.int32)}
    if task == "lm":
      inputs = _fit(self.tokenizer.encode(record[fields["inputs"]]), self.seq_len, self.overflow,
                    "inputs")
      targets = _fit(self.tokenizer.encode(record[fields["targets"]]), self.seq_len,
                     self.overflow, "targets")
      return {"inputs": inputs, "targets": targets}
    if task == "seq2seq":
      src = _fit(self.tokenizer.encode(get_feature(record, fields["inputs"])), self.seq_len - 1,
                 self.overflow, "inputs")
      tgt = _fit(self.tokenizer.encode(get_feature(record, fields["targets"])),
                 self.target_len - 1, self.overflow, "targets")
      return {
        "inputs": np.concatenate([src, [EOS_ID]]).astype(np.int32),
        "targets": np.concatenate([tgt, [EOS_ID]]).astype(np.int32),
        "decoder_inputs": np.concatenate([[BOS_ID], tgt]).astype(np.int32),
      }
    if task == "classify":
      ids = _fit(self.tokenizer.encode(get_feature(record, fields["inputs"])), self.seq_len,
                 self.overflow, "inputs")
      return {"inputs": ids, "label": np.int32(record[fields["label"]]),
              "weights": np.float32(1.0)}
    if task == "vision":
      image = np.asarray(record[fields["image"]], np.float32)
      return {"image": image * np.float32(2.0 / 255.0) - np.float32(1.0),
              "label": np.int32(record[fields["label"]]), "weights": np.float32(1.0)}
    raise DataError(f"Unknown task {task!r}.")


class LMWindows(grain.experimental.FlatMapTransform):
  """Cuts [bos] + doc + [eos] into next-token pairs of at most `seq_len` (documents are split,
  never truncated, and no token is predicted twice)."""

  def __init__(self, seq_len: int, max_fan_out: int = 1 << 20):
    self.seq_len = seq_len
    self.max_fan_out = max_fan_out

  def flat_map(self, element: Mapping[str, np.ndarray]) -> Sequence[dict[str, np.ndarray]]:
    tokens = element["tokens"]
    # Pair t predicts tokens[t + 1], so a document of n tokens gives n - 1 pairs; consecutive
    # windows overlap by one token (the last target of one is the first input of the next).
    inputs, targets = tokens[:-1], tokens[1:]
    return [
      {"inputs": inputs[start:start + self.seq_len], "targets": targets[start:start + self.seq_len]}
      for start in range(0, len(inputs), self.seq_len)
    ]


def pad_example(element: Mapping[str, Any], lengths: Mapping[str, int]) -> dict[str, Any]:
  """Pads the sequence features in `lengths` with 0 and adds Grain-style segment ids/positions."""
  out = dict(element)
  for key, length in lengths.items():
    ids = element[key]
    padded = np.zeros((length,), np.int32)
    padded[:len(ids)] = ids
    out[key] = padded
    out[f"{key}_segment_ids"] = (np.arange(length) < len(ids)).astype(np.int32)
    out[f"{key}_positions"] = np.where(out[f"{key}_segment_ids"], np.arange(length), 0).astype(
      np.int32)
  return out


def finalize_batch(batch: Mapping[str, np.ndarray], task: str) -> dict[str, np.ndarray]:
  """Grain's packed/padded feature names -> the batch format of `attn.data.pipeline`."""
  if task == "lm":
    return {
      "inputs": batch["inputs"],
      "targets": batch["targets"],
      "segment_ids": batch["inputs_segment_ids"],
      "positions": batch["inputs_positions"],
      # Pad targets are 0, and mqar marks positions without a loss with target 0 as well.
      "weights": (batch["targets"] != PAD_ID).astype(np.float32),
    }
  if task == "seq2seq":
    return {
      "inputs": batch["inputs"],
      "inputs_segment_ids": batch["inputs_segment_ids"],
      "inputs_positions": batch["inputs_positions"],
      "decoder_inputs": batch["decoder_inputs"],
      "targets": batch["targets"],
      "targets_segment_ids": batch["targets_segment_ids"],
      "targets_positions": batch["targets_positions"],
      "weights": (batch["targets_segment_ids"] != 0).astype(np.float32),
    }
  if task == "classify":
    return {
      "inputs": batch["inputs"],
      "segment_ids": batch["inputs_segment_ids"],
      "positions": batch["inputs_positions"],
      "label": batch["label"],
      "weights": batch["weights"],
    }
  return {"image": batch["image"], "label": batch["label"], "weights": batch["weights"]}


def zeros_like_batch(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """An all-padding batch (every weight and segment id 0) with the same shapes and dtypes."""
  return {k: np.zeros_like(v) for k, v in batch.items()}


def pad_batch(batch: Mapping[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
  """Pads a short final batch with all-padding rows up to `batch_size`."""
  out = {}
  for key, value in batch.items():
    pad = np.zeros((batch_size - value.shape[0], *value.shape[1:]), value.dtype)
    out[key] = np.concatenate([value, pad])
  return out
