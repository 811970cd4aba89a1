"""Deterministic Grain pipelines from `config.data`: source -> tokenize -> pack/pad -> batch.

    train_iter, eval_iters, info = make_iterators(config.data, global_batch_size=256, seed=0)
    batch = next(train_iter)            # dict of NumPy arrays, this process's rows only
    state = train_iter.get_state()      # checkpoint it (grain.checkpoint.CheckpointSave)
    for batch in eval_iters():          # a fresh, finite pass over the eval split
      ...

Order of operations (the same on every process: topology-independent data):
`tfds.data_source` -> global shuffle (seed, reshuffled every epoch) -> repeat forever (train) ->
tokenize -> LM windows -> pack (first-fit, `global_batch_size` bins) or pad -> batch to
`global_batch_size` rows -> this process's contiguous rows [process_index * B, (process_index
+ 1) * B) -> optional worker processes. Every process runs the whole pipeline and keeps its own
rows, so the global batch at step s depends only on the config and the seed (not on the number
of processes), and the iterator state is the same on every process: a checkpoint taken with one
process count resumes with any other (`attn.train.checkpoint` reads any process's state file)
and continues with exactly the next global batch. The state only means something for the same
config (data, batch size, seed) and num_workers. With P processes each one reads, tokenizes and
packs the whole global batch: P times the input work of slicing the records (see the README).

Batch format (B = global_batch_size // process_count rows; T = seq_len; 0 is always padding):
- lm:       inputs, targets [B, T] int32 (targets = inputs shifted by one within each document),
            segment_ids [B, T] int32 (1, 2, ... per packed document, 0 = padding),
            positions [B, T] int32 (restart at 0 in each segment), weights [B, T] float32.
- seq2seq:  inputs, inputs_segment_ids, inputs_positions [B, T];
            decoder_inputs ([bos] + target), targets (target + [eos]), targets_segment_ids,
            targets_positions [B, T_target] int32; weights [B, T_target] float32.
- classify: inputs, segment_ids, positions [B, T] int32; label [B] int32; weights [B] float32.
- vision:   image [B, H, W, C] float32 in [-1, 1]; label [B] int32; weights [B] float32.
Eval batches are padded to B rows with weights 0, so every eval step has one shape.

`config.data` fields (see `default_config()`):
- name: "dataset" or "dataset/builder_config", e.g. "pystdlib/small", "mqar/default",
  "algorithmic/reverse", "cldr_translate/en_de", "listops/small", "digits", "lm1b",
  "wmt14_translate/de-en", "imdb_reviews", "glue/sst2", "cifar10".
- data_dir: TFDS data dir; None = $ATTN_DATA_DIR or ~/.cache/attn/tensorflow_datasets. Remote
  datasets must already be prepared there (e.g. gs://bucket/tensorflow_datasets on a TPU VM).
- train_split, eval_split: None = the dataset's defaults (TFDS split syntax works: "train[:90%]").
- seq_len: tokens per row (lm, classify; seq2seq inputs). target_len: seq2seq targets (None =
  seq_len).
- pack: pack several sequences per row instead of padding each one (lm and seq2seq; classify
  and vision always have one example per row).
- tokenizer: None = the dataset's default; "byte", "sentencepiece" or "ids" (pre-tokenized).
  vocab_size: SentencePiece vocabulary size (trained on the train split, saved in data_dir).
- seed: shuffle seed; None = the seed passed to make_iterators (config.seed).
- shuffle: shuffle the training data (eval is never shuffled).
- overflow: "truncate" (with a logged count) or "error" for sequences longer than the maximum.
- num_workers: Grain worker processes (0 = in this process). read_threads: reader threads.
- eval_drop_remainder: drop the last partial eval batch instead of padding it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import flags

from attn.data import registry, transforms
from attn.data.registry import DataError, DatasetSpec
from attn.data.tokenizers import (
  BOS_ID,
  EOS_ID,
  PAD_ID,
  ByteTokenizer,
  IdsTokenizer,
  Tokenizer,
  load_or_train_sentencepiece,
  sentencepiece_path,
)

TASKS = ("lm", "seq2seq", "classify", "vision")


def default_config() -> ml_collections.ConfigDict:
  """The `config.data` section with every field the pipeline reads."""
  return ml_collections.ConfigDict({
    "name": "pystdlib/small",
    "data_dir": ml_collections.FieldReference(None, field_type=str),
    "train_split": ml_collections.FieldReference(None, field_type=str),
    "eval_split": ml_collections.FieldReference(None, field_type=str),
    "seq_len": 256,
    "target_len": ml_collections.FieldReference(None, field_type=int),
    "pack": True,
    "tokenizer": ml_collections.FieldReference(None, field_type=str),
    "vocab_size": 1024,
    "seed": ml_collections.FieldReference(None, field_type=int),
    "shuffle": True,
    "overflow": "truncate",
    "num_workers": 0,
    "read_threads": 2,
    "eval_drop_remainder": False,
  })


@dataclasses.dataclass(frozen=True)
class DataInfo:
  """What the model and the task need to know about the data."""

  name: str
  task: str
  vocab_size: int | None
  pad_id: int
  bos_id: int
  eos_id: int
  seq_len: int
  target_len: int
  num_classes: int | None
  image_shape: tuple[int, ...] | None
  batch_size: int  # Rows per batch in this process.
  global_batch_size: int
  train_examples: int  # Records in the train split (all processes).
  eval_examples: int
  tokenizer: Tokenizer | None = dataclasses.field(repr=False, default=None)


def _get(cfg: Any, key: str, default: Any = None) -> Any:
  """Reads a field of a ConfigDict or dict, falling back to the default config."""
  value = cfg.get(key, None) if hasattr(cfg, "get") else getattr(cfg, key, None)
  if value is None:
    value = default_config().get(key) if default is None else default
  return value


def _texts(source: Any, spec: DatasetSpec, limit: int) -> Iterator[str]:
  """Up to `limit` texts of a source, for training SentencePiece (both sides for seq2seq)."""
  keys = [spec.fields[k] for k in ("text", "inputs", "targets") if k in spec.fields]
  for i in range(min(limit, len(source))):
    record = source[i]
    for key in keys:
      value = registry.get_feature(record, key)
      yield value.decode("utf-8") if isinstance(value, bytes) else str(value)


def make_tokenizer(name: str, cfg: Any, train_source: Any, data_dir: str) -> Tokenizer | None:
  """The tokenizer `cfg.tokenizer` (or the dataset's default) for dataset `name`."""
  base, spec, full = registry.parse_name(name)
  kind = _get(cfg, "tokenizer", spec.tokenizer)
  if spec.tokenizer == "none":
    return None
  if spec.tokenizer == "ids" and kind != "ids":
    raise DataError(f"Dataset {name!r} is pre-tokenized: tokenizer must be 'ids', not {kind!r}.")
  if kind == "byte":
    return ByteTokenizer()
  if kind == "ids":
    builder = registry.get_builder(name, data_dir)
    return IdsTokenizer(int(builder.info.metadata["vocab_size"]))
  if kind == "sentencepiece":
    vocab = int(_get(cfg, "vocab_size"))
    split = _get(cfg, "train_split", spec.train_split)
    path = sentencepiece_path(data_dir, full, split, vocab)
    with registry.file_lock(data_dir, f"spm-{full}-{split}-{vocab}"):
      return load_or_train_sentencepiece(path, _texts(train_source, spec, 50_000), vocab)
  raise DataError(f"Unknown tokenizer {kind!r}. Known: byte, sentencepiece, ids.")


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Everything that decides the batches, resolved from the config once."""

  name: str
  spec: DatasetSpec
  encode: transforms.Encode
  lengths: dict[str, int]  # Sequence features -> row length; empty for vision.
  pack: bool
  batch_size: int  # Global rows per batch (all processes).
  seed: int
  read_threads: int
  num_workers: int
  shuffle: bool


class _Rows:
  """Rows [lo, hi) of a batch: this process's share of a global batch."""

  def __init__(self, lo: int, hi: int):
    self.lo, self.hi = lo, hi

  def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v[self.lo:self.hi] for k, v in batch.items()}


def _pipeline(plan: _Plan, source: Any, *, train: bool, rows: _Rows | None) -> grain.IterDataset:
  """The Grain dataset for one split: global batches, or only `rows` of each one."""
  ds = grain.MapDataset.source(source)
  if train:
    ds = ds.shuffle(seed=plan.seed) if plan.shuffle else ds
    ds = ds.repeat(None)  # Reshuffled every epoch (the epoch is folded into the seed).
  ds = ds.map(plan.encode)
  ids = ds.to_iter_dataset(
    grain.ReadOptions(num_threads=plan.read_threads, prefetch_buffer_size=64)
  )
  if plan.spec.task == "lm" and "text" in plan.spec.fields:
    ids = grain.experimental.FlatMapIterDataset(ids, transforms.LMWindows(plan.lengths["inputs"]))
  if plan.pack:
    ids = grain.experimental.FirstFitPackIterDataset(
      ids, length_struct=dict(plan.lengths), num_packing_bins=plan.batch_size, seed=plan.seed,
      shuffle_bins=train,
    )
  elif plan.lengths:
    lengths = dict(plan.lengths)
    ids = ids.map(lambda x: transforms.pad_example(x, lengths))
  ids = ids.batch(plan.batch_size, drop_remainder=train)
  if rows is not None:
    ids = ids.map(rows)
  task = plan.spec.task
  ids = ids.map(lambda b: transforms.finalize_batch(b, task))
  if plan.num_workers > 0:
    # Grain's workers read absl flags; outside an absl app (tests, notebooks) they were never
    # parsed, so take their defaults instead of failing.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ids = ids.mp_prefetch(grain.MultiprocessingOptions(num_workers=plan.num_workers))
  return ids


def make_iterators(
  cfg: Any,
  *,
  global_batch_size: int,
  seed: int,
  process_index: int | None = None,
  process_count: int | None = None,
) -> tuple[grain.DatasetIterator, Callable[..., Iterator[dict[str, np.ndarray]]], DataInfo]:
  """Builds the train iterator, an eval-iterator factory and the `DataInfo` from `config.data`.

  Args:
    cfg: the `config.data` section (ConfigDict or dict; missing fields take the defaults).
    global_batch_size: rows per step over all processes; must divide by the process count.
    seed: the run's seed; the shuffle seed unless `cfg.seed` is set.
    process_index, process_count: this process's place; None = from `jax.process_index()` and
      `jax.process_count()`.

  Returns:
    train_iter: an endless, checkpointable `grain.DatasetIterator` of this process's rows of
      the global batches; its state is the same on every process.
    eval_iters: `eval_iters(num_batches=None)` -> a fresh finite iterator over the eval split.
      Every process gets its rows of the same global eval batches (the last one padded to
      `global_batch_size` rows before it is split). With `num_batches` it yields exactly that
      many batches, all-padding ones after the data runs out.
    info: a `DataInfo`.
  """
  if process_index is None or process_count is None:
    import jax  # Only here: the pipeline itself never touches devices.

    process_index, process_count = jax.process_index(), jax.process_count()
  if global_batch_size % process_count:
    raise DataError(
      f"global_batch_size={global_batch_size} is not divisible by process_count={process_count}."
    )
  name = str(_get(cfg, "name"))
  _, spec, full = registry.parse_name(name)
  data_dir = _get(cfg, "data_dir", registry.default_data_dir())
  train_split = _get(cfg, "train_split", spec.train_split)
  eval_split = _get(cfg, "eval_split", spec.eval_split)
  train_source = registry.open_source(name, train_split, data_dir)
  eval_source = registry.open_source(name, eval_split, data_dir)
  tokenizer = make_tokenizer(name, cfg, train_source, data_dir)

  seq_len = int(_get(cfg, "seq_len"))
  target_len = int(_get(cfg, "target_len", seq_len))
  overflow = str(_get(cfg, "overflow"))
  if overflow not in ("truncate", "error"):
    raise DataError(f"config.data.overflow must be 'truncate' or 'error', not {overflow!r}.")
  pack = bool(_get(cfg, "pack"))
  if spec.task in ("classify", "vision"):
    pack = False  # One example per row: the label belongs to the whole row.
  lengths = {
    "lm": {"inputs": seq_len, "targets": seq_len},
    "seq2seq": {"inputs": seq_len, "targets": target_len, "decoder_inputs": target_len},
    "classify": {"inputs": seq_len},
    "vision": {},
  }[spec.task]
  batch_size = global_batch_size // process_count
  rows = _Rows(process_index * batch_size, (process_index + 1) * batch_size)
  shuffle_seed = int(_get(cfg, "seed", seed)) % (2**32)
  plan = _Plan(
    name=full, spec=spec,
    encode=transforms.Encode(spec, tokenizer, seq_len, target_len, overflow),
    lengths=lengths, pack=pack, batch_size=global_batch_size, seed=shuffle_seed,
    read_threads=int(_get(cfg, "read_threads")), num_workers=int(_get(cfg, "num_workers")),
    shuffle=bool(_get(cfg, "shuffle", True)),
  )

  train_ds = _pipeline(plan, train_source, train=True, rows=rows)
  eval_ds = _pipeline(dataclasses.replace(plan, num_workers=0), eval_source, train=False,
                      rows=None)  # Global batches: padded to the global size, then split.
  drop = bool(_get(cfg, "eval_drop_remainder"))

  def eval_iters(num_batches: int | None = None) -> Iterator[dict[str, np.ndarray]]:
    """A fresh pass over the eval split; see `make_iterators`."""
    template = None
    count = 0
    for batch in eval_ds:
      if num_batches is not None and count >= num_batches:
        return
      if next(iter(batch.values())).shape[0] < global_batch_size:
        if drop:
          break
        batch = transforms.pad_batch(batch, global_batch_size)
      batch = rows(batch)
      template = batch
      count += 1
      yield batch
    if num_batches is not None and count < num_batches:
      if template is None:  # The eval split is empty; shapes from a train batch.
        template = next(iter(train_ds))
      empty = transforms.zeros_like_batch(template)
      for _ in range(num_batches - count):
        yield empty

  image_shape = None
  if spec.task == "vision":
    image_shape = tuple(train_source.dataset_info.features[spec.fields["image"]].shape)
  builder_info = train_source.dataset_info
  info = DataInfo(
    name=full, task=spec.task, vocab_size=tokenizer.vocab_size if tokenizer else None,
    pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, seq_len=seq_len, target_len=target_len,
    num_classes=spec.num_classes or _num_classes(builder_info, spec), image_shape=image_shape,
    batch_size=batch_size, global_batch_size=global_batch_size,
    train_examples=len(train_source), eval_examples=len(eval_source), tokenizer=tokenizer,
  )
  return iter(train_ds), eval_iters, info


def _num_classes(builder_info: Any, spec: DatasetSpec) -> int | None:
  """The number of classes from a ClassLabel feature, if the dataset has one."""
  label = spec.fields.get("label")
  if label is None:
    return None
  feature = builder_info.features[label]
  return getattr(feature, "num_classes", None)
