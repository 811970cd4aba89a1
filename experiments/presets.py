"""Named pieces the experiment files share: model sizes, attention variants, datasets.

experiments/common.py holds the argument parser, the base config and `runlocal`; this module
adds the presets that several experiments pick by name, so that `size=small` or
`attention=gqa` means the same thing in lm.py, attention_ablation.py and mqar.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ml_collections

from attn.errors import ConfigError

# Decoder / encoder sizes (d_model, layers, heads, mlp). Parameter counts are for the byte
# vocabulary (259) with tied embeddings; a 32k SentencePiece vocabulary adds 32k x d_model.
SIZES: dict[str, dict[str, int]] = {
  "tiny": {"d_model": 64, "num_layers": 2, "num_heads": 4, "mlp_dim": 256},  # ~0.1M
  "small": {"d_model": 128, "num_layers": 4, "num_heads": 4, "mlp_dim": 512},  # ~0.8M
  "medium": {"d_model": 256, "num_layers": 6, "num_heads": 8, "mlp_dim": 1024},  # ~4.8M
  "base": {"d_model": 512, "num_layers": 6, "num_heads": 8, "mlp_dim": 2048},  # ~19M
  "large": {"d_model": 1024, "num_layers": 12, "num_heads": 16, "mlp_dim": 4096},  # ~150M
}


def _kv(heads: int) -> int:
  """GQA's key/value heads: groups of 4 query heads, at least 2 KV heads (else it is MQA)."""
  kv = max(2, heads // 4)
  return kv if heads % kv == 0 else heads


# Head sharing by name: name -> num_kv_heads from num_heads. Every other `attention=` name is
# a registry mechanism (attn.layers.registry), run with MHA heads.
HEAD_SHARING: dict[str, Callable[[int], int]] = {
  "mha": lambda heads: heads,
  "gqa": _kv,
  "mqa": lambda heads: 1,
}
# Length-like mechanism options, as a fraction of the sequence length, so that a pattern matters
# at the experiment's length (local window = seq/4, as in the Zoology MQAR setup). Keyed by
# option name: a new mechanism with a `window` option is scaled without editing this file.
LENGTH_OPTIONS: dict[str, float] = {
  "window": 1 / 4,  # local, longformer
  "chunk_size": 1 / 4,  # chunked (a compute chunk for linear / performer: any size is exact)
  "block_size": 1 / 8,  # bigbird
  "projected_length": 1 / 4,  # linformer
  "max_length": 2.0,  # linformer: the longest key length it projects (room for a [CLS])
}


def choose(kind: str, value: str, table: dict[str, Any]) -> Any:
  """table[value], or an error that lists the valid names."""
  if value not in table:
    raise ValueError(f"Unknown {kind} {value!r}; valid: {', '.join(sorted(table))}.")
  return table[value]


def set_size(config: ml_collections.ConfigDict, size: str) -> None:
  config.model.update(choose("size", size, SIZES))


def attention_names() -> list[str]:
  """What `attention=` accepts: the head-sharing variants, then every registry mechanism."""
  from attn.layers import registry  # Deferred: importing the layers imports jax.

  return [*HEAD_SHARING, *registry.names()]


def set_attention(config: ml_collections.ConfigDict, name: str) -> None:
  """`attention=NAME`: a head-sharing variant (softmax with N, few or one KV heads) or a registry
  mechanism with MHA heads and its length-like options scaled to `config.data.seq_len`."""
  from attn.layers import registry

  heads, seq = config.model.num_heads, config.data.seq_len
  for option in config.model.attention_options:  # an earlier mechanism's options go
    config.model.attention_options[option] = None
  config.model.attention_pattern = ()
  if name in HEAD_SHARING or name == "softmax":
    name = "mha" if name == "softmax" else name
    config.model.update(attention="softmax", num_kv_heads=HEAD_SHARING[name](heads))
    return
  choose("attention", name, dict.fromkeys(attention_names()))
  entry = registry.get(name)
  config.model.update(attention=name, num_kv_heads=heads)
  for option in entry.options:
    if option in LENGTH_OPTIONS:
      config.model.attention_options[option] = max(1, int(seq * LENGTH_OPTIONS[option]))
  fit_mechanism(config, name)


# Hybrid layer patterns by name (`pattern=NAME`; or mechanisms joined by '+'): the mechanisms
# repeated over the layers (model.attention_pattern), as current models stack them.
PATTERNS: dict[str, tuple[str, ...]] = {
  "qwen3_next": ("gated_deltanet",) * 3 + ("gated",),  # Qwen3-Next: 3 Gated DeltaNet, 1 gated
  "gemma3": ("local",) * 5 + ("softmax",),  # Gemma 3: 5 sliding-window, 1 global
}


def parse_pattern(pattern: str) -> tuple[str, ...]:
  """`qwen3_next` (a PATTERNS name) or `gated_deltanet+gated` -> the mechanisms; `none` -> ()."""
  if pattern in ("none", ""):
    return ()
  if pattern in PATTERNS:
    return PATTERNS[pattern]
  names = tuple(name.strip() for name in pattern.split("+"))
  for name in names:
    choose("pattern mechanism", name, dict.fromkeys(attention_names()[len(HEAD_SHARING):]))
  return names


def set_attention_pattern(config: ml_collections.ConfigDict, pattern: str) -> None:
  """`pattern=NAME`: model.attention_pattern, MHA heads, each mechanism's length-like options
  scaled as in `set_attention`, and num_layers raised to a multiple of the pattern's length
  (Gemma 3's six on the small model's four layers: six)."""
  names = parse_pattern(pattern)
  if not names:
    return
  options = {}
  for name in dict.fromkeys(names):  # the options of every mechanism of the pattern
    set_attention(config, name)
    options.update({k: v for k, v in config.model.attention_options.items() if v is not None})
  config.model.attention_options.update(options)
  length, depth = len(names), config.model.num_layers
  config.model.update(attention="softmax", attention_pattern=names,
                      num_layers=-(-depth // length) * length)


def fit_mechanism(config: ml_collections.ConfigDict, name: str) -> None:
  """Turns off what the experiment's defaults ask of mechanism `name` and the registry says it
  cannot do (packing, sampling, BLEU decoding: the trainer's own check,
  `attn.train.config.mechanism_conflicts`), and prints one line saying what and why. Asking
  for it again on the command line (`--config.train.sample_tokens=64`) is the trainer's
  ConfigError; where nothing fits (a text task with a mechanism that handles neither packing
  nor padding) it is a ConfigError here."""
  from attn.train.config import mechanism_conflicts  # Deferred: the trainer imports jax.

  changes, reasons = [], []
  for conflict in mechanism_conflicts(config, config.model.kind, (name,)):
    if conflict.fits is None:
      raise ConfigError(conflict.message)
    section, key = conflict.field.split(".")
    changes.append(f"{conflict.field} {config[section][key]!r} -> {conflict.fits!r}")
    reasons.append(conflict.reason)
    config[section][key] = conflict.fits
  if changes:
    print(f"attention={name!r}: turned off {', '.join(changes)} "
          f"({'; '.join(dict.fromkeys(reasons))}; registry: attn/layers/registry.py)")


# Local stand-ins for remote datasets: the same task on embedded data (no download).
TEXT_DATA: dict[str, dict[str, Any]] = {
  # lm1b: SentencePiece 32k trained on the train split on first use (saved in data_dir).
  "lm1b": {"name": "lm1b", "tokenizer": "sentencepiece", "vocab_size": 32_000},
  "pystdlib": {"name": "pystdlib/small", "tokenizer": "byte"},
  "pystdlib_full": {"name": "pystdlib/full", "tokenizer": "byte"},
  "wmt14": {"name": "wmt14_translate/de-en", "tokenizer": "sentencepiece", "vocab_size": 32_000},
  "wmt17": {"name": "wmt17_translate/de-en", "tokenizer": "sentencepiece", "vocab_size": 32_000},
  "imdb": {"name": "imdb_reviews", "tokenizer": "byte"},
  "sst2": {"name": "glue/sst2", "tokenizer": "byte"},
  "listops": {"name": "listops/small", "tokenizer": "ids"},
  "listops_lra": {"name": "listops/lra", "tokenizer": "ids"},
}
BYTE_VOCAB = 259  # 256 bytes + pad / bos / eos.


def set_text_data(config: ml_collections.ConfigDict, key: str, *, vocab: int | None = None) -> None:
  """Points config.data at TEXT_DATA[key] and sizes the model's vocabulary for its tokenizer.

  `vocab` is the model vocabulary for the `ids` tokenizer (pre-tokenized datasets).
  """
  preset = choose("dataset", key, TEXT_DATA)
  config.data.name = preset["name"]
  config.data.tokenizer = preset["tokenizer"]
  if preset["tokenizer"] == "sentencepiece":
    config.data.vocab_size = preset["vocab_size"]
    config.model.vocab_size = preset["vocab_size"]
  elif preset["tokenizer"] == "byte":
    config.model.vocab_size = BYTE_VOCAB
  elif vocab is not None:
    config.model.vocab_size = vocab


def set_steps(config: ml_collections.ConfigDict, steps: int | None) -> None:
  """The `steps=N` arg: train N steps, with the warmup cut to at most a tenth of them."""
  if steps:
    config.train.num_steps = steps
    config.optim.warmup_steps = min(config.optim.warmup_steps, max(1, steps // 10))


def fit_lengths(config: ml_collections.ConfigDict) -> None:
  """The model's max_len covers the data's inputs and targets (plus the BOS that starts a
  decoded target: BLEU decoding writes target_len tokens after it into the KV cache)."""
  target = config.data.target_len or config.data.seq_len
  extra = 1 if config.model.kind == "encoder_decoder" else 0
  config.model.max_len = max(config.data.seq_len, target + extra)


def runlocal_steps(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """What common.runlocal leaves out for a quiet smoke run: no sample, no BLEU decoding."""
  config.train.sample_tokens = 0
  config.train.bleu_batches = min(config.train.bleu_batches, 1)
  return config
