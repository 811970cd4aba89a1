"""Data: embedded TFDS datasets (no download), tokenizers, and deterministic Grain pipelines.

The entry point is `make_iterators(config.data, global_batch_size=..., seed=...)`; the batch
format and every `config.data` field are documented in `attn.data.pipeline`. Datasets are listed
in `attn.data.registry.DATASETS`; the embedded ones are TFDS builders in `attn.data.builders`.
Nothing here imports TensorFlow or downloads.
"""

from attn.data.pipeline import DataInfo, default_config, make_iterators, make_tokenizer
from attn.data.registry import DATASETS, DataError, default_data_dir, get_builder, open_source
from attn.data.tokenizers import ByteTokenizer, IdsTokenizer, SentencePieceTokenizer

__all__ = [
  "DATASETS",
  "ByteTokenizer",
  "DataError",
  "DataInfo",
  "IdsTokenizer",
  "SentencePieceTokenizer",
  "default_config",
  "default_data_dir",
  "get_builder",
  "make_iterators",
  "make_tokenizer",
  "open_source",
]
