"""Helpers shared by the experiment files: argument strings and the base config."""

from __future__ import annotations

import ast
from typing import Any

import ml_collections

from attn import train


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """`"size=small,runlocal"` -> ConfigDict(size="small", runlocal=True, <other defaults>).

  A bare name means True; values are Python literals when they parse as one, else strings.
  Unknown names are an error listing the known ones.
  """
  out = ml_collections.ConfigDict(defaults)
  for part in filter(None, (arg or "").split(",")):
    key, sep, raw = part.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"Unknown experiment argument {key!r}; known: {sorted(defaults)}.")
    value: Any = True
    if sep:
      try:
        value = ast.literal_eval(raw.strip())
      except (ValueError, SyntaxError):
        value = raw.strip()
    out[key] = value
  return out


def base_config() -> ml_collections.ConfigDict:
  """Every section with its defaults (attn.train.default_config())."""
  return train.default_config()


def runlocal(config: ml_collections.ConfigDict, *, steps: int = 4) -> ml_collections.ConfigDict:
  """Shrinks a config to a seconds-long CPU smoke run of the same code paths."""
  config.train.num_steps = steps
  config.train.batch_size = 8
  config.train.eval_every = steps
  config.train.eval_steps = 2
  config.train.checkpoint_every = steps
  config.train.log_every = 1
  config.train.sample_tokens = min(config.train.sample_tokens, 8)
  config.optim.warmup_steps = min(config.optim.warmup_steps, 1)
  config.data.seq_len = min(config.data.seq_len, 32)
  config.model.d_model = 32
  config.model.num_heads = 2
  config.model.num_kv_heads = None
  config.model.mlp_dim = 64
  config.model.num_layers = 2
  return config
