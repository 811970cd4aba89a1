"""Tests of attn/data/tokenizers.py: round trips on real non-ASCII text, determinism, reuse."""

import os
import pickle

import numpy as np
import pytest

from attn.data import tokenizers
from attn.data.builders.cldr_translate.cldr_translate_dataset_builder import pairs

REAL_TEXT = [
  "Vereinigtes Königreich",
  "Côte d’Ivoire — République",
  "オディア語",
  "Ελληνικά 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 emoji 🙂",
  "def f(x):\n    return x  # tab\there\n",
]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
  """Real multilingual text: CLDR names in German, French, Russian and Japanese."""
  return [p["target"] for lang in ("de", "fr", "ru", "ja") for p in pairs(lang)]


@pytest.mark.parametrize("text", REAL_TEXT)
def test_byte_round_trip(text):
  tok = tokenizers.ByteTokenizer()
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and ids.min() >= 3 and ids.max() < tok.vocab_size == 259
  assert len(ids) == len(text.encode("utf-8"))
  assert tok.decode(ids) == text
  assert tok.decode([tok.bos_id, *ids, tok.eos_id, 0, 0]) == text  # Specials are dropped.


def test_byte_ids_are_utf8_bytes_plus_three():
  np.testing.assert_array_equal(tokenizers.ByteTokenizer().encode("Aé"), [65 + 3, 0xC3 + 3,
                                                                          0xA9 + 3])


def test_sentencepiece_round_trip_and_special_ids(corpus):
  tok = tokenizers.SentencePieceTokenizer(tokenizers.train_sentencepiece(corpus, 1200))
  assert tok.vocab_size == 1200
  for text in REAL_TEXT + corpus[::97]:
    ids = tok.encode(text)
    assert ids.min() > tokenizers.EOS_ID
    assert tok.decode(ids) == text
  # It learned the corpus: its text takes far fewer pieces than bytes.
  pieces = sum(len(tok.encode(t)) for t in corpus)
  assert pieces < 0.5 * sum(len(t.encode()) for t in corpus)
  clone = pickle.loads(pickle.dumps(tok))  # Grain workers receive it pickled.
  np.testing.assert_array_equal(clone.encode(corpus[5]), tok.encode(corpus[5]))


def test_sentencepiece_training_is_deterministic_and_reused(corpus, tmp_path):
  first_proto = tokenizers.train_sentencepiece(corpus, 1000)
  assert tokenizers.train_sentencepiece(corpus, 1000) == first_proto
  path = tokenizers.sentencepiece_path(str(tmp_path), "cldr_translate/en_de", "train", 1000)
  first = tokenizers.load_or_train_sentencepiece(path, corpus, 1000)
  stamp = os.stat(path).st_mtime_ns

  def must_not_train():
    raise AssertionError("retrained although a saved model exists")
    yield  # pragma: no cover

  second = tokenizers.load_or_train_sentencepiece(path, must_not_train(), 1000)
  assert os.stat(path).st_mtime_ns == stamp and second.model_proto == first.model_proto


def test_ids_tokenizer_passes_ids_through():
  tok = tokenizers.IdsTokenizer(18)
  np.testing.assert_array_equal(tok.encode([3, 4, 17]), [3, 4, 17])
  assert tok.vocab_size == 18 and tok.decode([3, 4]) == "3 4"
