"""Tasks: what differs between training an LM, a translation model and a classifier.

A task is a small object: how to call the model on a batch (`forward`), the loss and metric
sums of one batch (`stats`, pure and jittable), the metrics from summed stats (`finalize`),
and host-side extras (`extra_eval`: BLEU / chrF for seq2seq). The trainer is the same for all.
Losses are summed over weighted positions and divided once by the total weight, so gradient
accumulation and multi-device sums give the same number as one big batch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from attn.data import ByteTokenizer, DataInfo, SentencePieceTokenizer

Batch = dict[str, Any]
Stats = dict[str, jax.Array]


def cross_entropy_sums(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> Stats:
  """Summed float32 cross entropy, correct predictions and weights."""
  logits = logits.astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  return {
    "loss_sum": jnp.sum(losses * weights),
    "correct_sum": jnp.sum(correct * weights),
    "weight_sum": jnp.sum(weights),
  }


def bytes_per_token(tokenizer: Any) -> np.ndarray | None:
  """UTF-8 bytes each token id stands for (for bits per byte); None if ids are not text."""
  if isinstance(tokenizer, ByteTokenizer):
    table = np.ones(tokenizer.vocab_size, np.float32)
    table[: ByteTokenizer._OFFSET] = 0.0  # pad, bos, eos are not text
    return table
  if isinstance(tokenizer, SentencePieceTokenizer):
    # Single-id decoding drops a word's leading space; count it back from the piece marker.
    sp = tokenizer._processor()
    pieces = [sp.id_to_piece(i) for i in range(tokenizer.vocab_size)]
    table = np.array([len(p.replace("\u2581", " ").encode("utf-8")) for p in pieces], np.float32)
    table[[tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id]] = 0.0
    return table
  return None


@dataclasses.dataclass(frozen=True)
class Task:
  """Base: classification-style metrics from `stats` sums."""

  info: DataInfo

  name = "base"

  def inputs(self, batch: Batch) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Positional and keyword model inputs."""
    raise NotImplementedError

  def labels(self, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(labels, weights)."""
    return batch["targets"], batch["weights"]

  def forward(self, model: Any, variables: Any, batch: Batch, *, train: bool,
              rng: jax.Array | None = None) -> tuple[jax.Array, Any]:
    """Logits and updated mutable collections (batch_stats in training; {} otherwise)."""
    args, kwargs = self.inputs(batch)
    mutable = ["batch_stats"] if train and "batch_stats" in variables else False
    rngs = {"dropout": rng} if train and rng is not None else None
    out = model.apply(variables, *args, **kwargs, deterministic=not train, rngs=rngs,
                      mutable=mutable)
    return out if mutable else (out, {})

  def stats(self, logits: jax.Array, batch: Batch) -> Stats:
    """Sums over the batch (pure, jittable); `loss_sum / weight_sum` is the loss."""
    labels, weights = self.labels(batch)
    return cross_entropy_sums(logits, labels, weights)

  def finalize(self, sums: dict[str, float]) -> dict[str, float]:
    """Metrics from stats summed over batches (host side)."""
    total = max(float(sums["weight_sum"]), 1e-9)
    return {"loss": float(sums["loss_sum"]) / total,
            "accuracy": float(sums["correct_sum"]) / total}

  def extra_eval(self, generate_fn: Any, batches: Iterable[Batch]) -> dict[str, float]:
    """Host-side metrics that need decoding; none by default."""
    del generate_fn, batches
    return {}

  def sample(self, model: Any, params: Any, *, prompt: str, max_tokens: int,
             temperature: float, seed: int) -> str | None:
    """Text generated from `prompt` at the end of a run (LMs); None for the others."""
    del model, params, prompt, max_tokens, temperature, seed
    return None

  def tokens_per_row(self) -> int:
    """The tokens a batch row counts for tokens/s."""
    return self.info.seq_len

  def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
    """A batch of the right shapes and dtypes, for shape-first init."""
    raise NotImplementedError


def _tokens(batch_size: int, length: int) -> np.ndarray:
  return np.full((batch_size, length), 3, np.int32)


@dataclasses.dataclass(frozen=True)
class LMTask(Task):
  """Next-token prediction: loss, accuracy, perplexity, bits per byte (text tokenizers)."""

  name = "lm"
  bytes_table: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)

  @classmethod
  def create(cls, info: DataInfo) -> LMTask:
    return cls(info=info, bytes_table=bytes_per_token(info.tokenizer))

  def inputs(self, batch: Batch) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return (batch["inputs"],), {"segment_ids": batch["segment_ids"],
                                "positions": batch["positions"]}

  def stats(self, logits: jax.Array, batch: Batch) -> Stats:
    out = super().stats(logits, batch)
    if self.bytes_table is not None:
      table = jnp.asarray(self.bytes_table)
      out["byte_sum"] = jnp.sum(table[batch["targets"]] * batch["weights"])
    return out

  def finalize(self, sums: dict[str, float]) -> dict[str, float]:
    metrics = super().finalize(sums)
    metrics["perplexity"] = math.exp(min(metrics["loss"], 50.0))
    metrics["bits_per_token"] = metrics["loss"] / math.log(2)
    if "byte_sum" in sums and float(sums["byte_sum"]) > 0:
      metrics["bits_per_byte"] = float(sums["loss_sum"]) / math.log(2) / float(sums["byte_sum"])
    return metrics

  def sample(self, model: Any, params: Any, *, prompt: str, max_tokens: int,
             temperature: float, seed: int) -> str | None:
    info = self.info
    if not max_tokens or info.tokenizer is None:
      return None
    from attn import decode  # Deferred: decoding is needed once, at the end of a run.

    prompt_ids = np.concatenate([[info.bos_id], info.tokenizer.encode(prompt)])
    # The KV cache holds model.max_len positions: a longer sample is cut to fit, not an error
    # at the end of a finished run.
    new_tokens = min(int(max_tokens), model.config.max_len - len(prompt_ids))
    if new_tokens <= 0:
      return None
    out = decode.generate(model, params, jnp.asarray(prompt_ids[None], jnp.int32),
                          max_new_tokens=new_tokens, rng=jax.random.PRNGKey(seed),
                          temperature=float(temperature), eos_id=info.eos_id)
    return info.tokenizer.decode(np.asarray(out)[0, 1:])

  def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
    t = self.info.seq_len
    return {"inputs": _tokens(batch_size, t), "targets": _tokens(batch_size, t),
            "segment_ids": np.ones((batch_size, t), np.int32),
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (batch_size, t)).copy(),
            "weights": np.ones((batch_size, t), np.float32)}


@dataclasses.dataclass(frozen=True)
class Seq2SeqTask(Task):
  """Teacher-forced loss / accuracy / perplexity, plus BLEU and chrF on decoded eval batches."""

  name = "seq2seq"

  @classmethod
  def create(cls, info: DataInfo) -> Seq2SeqTask:
    return cls(info=info)

  def inputs(self, batch: Batch) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return (batch["inputs"], batch["decoder_inputs"]), {
      "inputs_segment_ids": batch["inputs_segment_ids"],
      "inputs_positions": batch["inputs_positions"],
      "targets_segment_ids": batch["targets_segment_ids"],
      "targets_positions": batch["targets_positions"],
    }

  def finalize(self, sums: dict[str, float]) -> dict[str, float]:
    metrics = super().finalize(sums)
    metrics["perplexity"] = math.exp(min(metrics["loss"], 50.0))
    return metrics

  def tokens_per_row(self) -> int:
    return self.info.seq_len + self.info.target_len

  def extra_eval(self, generate_fn: Any, batches: Iterable[Batch]) -> dict[str, float]:
    """Greedy-decodes the sources and scores the hypotheses against the targets."""
    import sacrebleu  # Only seq2seq runs need it.

    tok = self.info.tokenizer
    hyps, refs = [], []
    for batch in batches:
      # Packed rows hold several examples; score only the first one in each row. The rest
      # becomes padding, which decoding masks like the pipeline's own (`attn.decode`).
      first = batch["inputs_segment_ids"] == 1
      sources = np.where(first, batch["inputs"], self.info.pad_id)
      out = np.asarray(generate_fn(sources))
      for row in range(out.shape[0]):
        if not batch["weights"][row].any():
          continue
        target = batch["targets"][row][batch["targets_segment_ids"][row] == 1]
        hyps.append(tok.decode(_until_eos(out[row], self.info.eos_id)))
        refs.append(tok.decode(_until_eos(target, self.info.eos_id)))
    if not hyps:
      return {}
    return {"bleu": sacrebleu.corpus_bleu(hyps, [refs]).score,
            "chrf": sacrebleu.corpus_chrf(hyps, [refs]).score}

  def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
    s, t = self.info.seq_len, self.info.target_len
    ones = lambda n: np.ones((batch_size, n), np.int32)
    pos = lambda n: np.broadcast_to(np.arange(n, dtype=np.int32), (batch_size, n)).copy()
    return {"inputs": _tokens(batch_size, s), "inputs_segment_ids": ones(s),
            "inputs_positions": pos(s), "decoder_inputs": _tokens(batch_size, t),
            "targets": _tokens(batch_size, t), "targets_segment_ids": ones(t),
            "targets_positions": pos(t), "weights": np.ones((batch_size, t), np.float32)}


def _until_eos(ids: np.ndarray, eos_id: int) -> np.ndarray:
  ids = np.asarray(ids)
  stop = np.flatnonzero(ids == eos_id)
  return ids[: stop[0]] if stop.size else ids


@dataclasses.dataclass(frozen=True)
class ClassifyTask(Task):
  """One label per row (token sequences or images): loss and accuracy."""

  name = "classify"

  @classmethod
  def create(cls, info: DataInfo) -> ClassifyTask:
    return cls(info=info)

  def labels(self, batch: Batch) -> tuple[jax.Array, jax.Array]:
    return batch["label"], batch["weights"]

  def tokens_per_row(self) -> int:
    return 1 if self.info.task == "vision" else self.info.seq_len  # An image counts as one.

  def inputs(self, batch: Batch) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if "image" in batch:
      return (batch["image"],), {}
    return (batch["inputs"],), {"segment_ids": batch["segment_ids"],
                                "positions": batch["positions"]}

  def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
    out = {"label": np.zeros((batch_size,), np.int32),
           "weights": np.ones((batch_size,), np.float32)}
    if self.info.task == "vision":
      out["image"] = np.zeros((batch_size, *self.info.image_shape), np.float32)
    else:
      t = self.info.seq_len
      out.update(inputs=_tokens(batch_size, t), segment_ids=np.ones((batch_size, t), np.int32),
                 positions=np.broadcast_to(np.arange(t, dtype=np.int32), (batch_size, t)).copy())
    return out


TASKS: dict[str, Any] = {
  "lm": LMTask,
  "seq2seq": Seq2SeqTask,
  "classify": ClassifyTask,
  "vision": ClassifyTask,  # A label per image: the same loss and metrics.
}


def make_task(info: DataInfo) -> Task:
  """The task for the data's kind."""
  if info.task not in TASKS:
    raise ValueError(f"No task for data kind {info.task!r}; known: {list(TASKS)}.")
  return TASKS[info.task].create(info)
