"""Tokenizers: UTF-8 bytes, SentencePiece trained locally, and pass-through ids.

All share one id convention so that the pipeline and the models never special-case them:
pad = 0 (also the segment-id and loss-mask zero), bos = 1, eos = 2. Tokenizers are small,
picklable objects (Grain may send them to worker processes).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable
from typing import Protocol

import numpy as np

from attn import storage

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


class Tokenizer(Protocol):
  """What the pipeline needs from a tokenizer."""

  vocab_size: int
  pad_id: int
  bos_id: int
  eos_id: int

  def encode(self, text: str | bytes) -> np.ndarray: ...

  def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
  """UTF-8 bytes shifted past the three special ids: vocab 259, lossless on any text."""

  vocab_size = 256 + 3
  pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID
  _OFFSET = 3

  def encode(self, text: str | bytes) -> np.ndarray:
    """Text -> int32 ids (no bos/eos; the pipeline adds them)."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return np.frombuffer(data, np.uint8).astype(np.int32) + self._OFFSET

  def decode(self, ids: Iterable[int]) -> str:
    """Ids -> text; special ids are dropped, invalid UTF-8 is replaced."""
    ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, np.int64)
    ids = ids[ids >= self._OFFSET] - self._OFFSET
    return bytes(ids.astype(np.uint8)).decode("utf-8", errors="replace")


class IdsTokenizer:
  """For pre-tokenized datasets: ids pass through; the vocab comes from the dataset metadata."""

  pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID

  def __init__(self, vocab_size: int):
    self.vocab_size = vocab_size

  def encode(self, ids: Iterable[int]) -> np.ndarray:  # type: ignore[override]
    """Ids -> int32 array."""
    return np.asarray(ids, np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    """Ids -> space-separated ids (there is no text)."""
    return " ".join(str(int(i)) for i in ids)


class SentencePieceTokenizer:
  """A SentencePiece model given as its serialized proto; loaded lazily in each process."""

  pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID
  unk_id = 3

  def __init__(self, model_proto: bytes):
    self.model_proto = model_proto
    self._sp = None
    self.vocab_size = self._processor().get_piece_size()

  @classmethod
  def load(cls, path: str) -> SentencePieceTokenizer:
    """Reads a `.model` file (local or in a bucket)."""
    return cls(storage.read_bytes(path))

  def _processor(self):
    if self._sp is None:
      import sentencepiece as spm  # Imported here: only SentencePiece runs need it.

      self._sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
    return self._sp

  def __getstate__(self) -> dict:
    # The C++ processor does not pickle; workers rebuild it from the proto.
    return {"model_proto": self.model_proto, "vocab_size": self.vocab_size}

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)
    self._sp = None

  def encode(self, text: str | bytes) -> np.ndarray:
    """Text -> int32 ids (no bos/eos)."""
    if isinstance(text, bytes):
      text = text.decode("utf-8")
    return np.asarray(self._processor().encode(text), np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    """Ids -> text; special ids are dropped."""
    ids = [int(i) for i in ids if int(i) not in (PAD_ID, BOS_ID, EOS_ID)]
    return self._processor().decode(ids)


def train_sentencepiece(
  texts: Iterable[str], vocab_size: int, *, max_sentences: int = 200_000, max_chars: int = 4096
) -> bytes:
  """Trains a unigram SentencePiece model on `texts` deterministically; returns the proto."""
  import sentencepiece as spm

  def lines() -> Iterable[str]:
    count = 0
    for text in texts:
      for line in text.splitlines():
        line = line.strip()
        if line:
          yield line[:max_chars]
          count += 1
          if count >= max_sentences:
            return

  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(lines()),
    model_writer=model,
    vocab_size=vocab_size,
    model_type="unigram",
    # Rare characters (e.g. most CJK) get no piece of their own; byte_fallback spells them as
    # UTF-8 bytes instead of <unk>, so every text still round-trips.
    character_coverage=0.9995,
    byte_fallback=True,
    # Lossless: no NFKC folding and no whitespace collapsing (code indentation is content).
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    pad_id=PAD_ID,
    bos_id=BOS_ID,
    eos_id=EOS_ID,
    unk_id=SentencePieceTokenizer.unk_id,
    # One thread and no sampling: the same corpus gives the same model, byte for byte.
    num_threads=1,
    input_sentence_size=0,
    shuffle_input_sentence=False,
    hard_vocab_limit=False,
    minloglevel=2,
  )
  return model.getvalue()


def sentencepiece_path(data_dir: str, dataset: str, split: str, vocab_size: int) -> str:
  """Where the model trained on `dataset`/`split` is kept, beside the prepared data."""
  key = hashlib.sha1(f"{dataset}|{split}".encode()).hexdigest()[:8]
  safe = dataset.replace("/", "__")
  return storage.join(data_dir, "attn_tokenizers", f"{safe}-{split}-{vocab_size}-{key}.model")


def load_or_train_sentencepiece(path: str, texts: Iterable[str], vocab_size: int):
  """Reuses the model at `path`, or trains it and writes it atomically."""
  if not storage.exists(path):
    # Atomic: a reader never sees half a model.
    storage.write_bytes_atomic(path, train_sentencepiece(texts, vocab_size))
  return SentencePieceTokenizer.load(path)
