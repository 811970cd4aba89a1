"""The trainer's config sections (`config.optim`, `config.train`, `config.mesh`) and the checks
that run on the whole config before anything is built or compiled.

An experiment file starts from `attn.train.default_config()` (every section with every field)
and changes what it needs; unknown keys, wrong types and impossible combinations are errors that
name the field and the fix.
"""

from __future__ import annotations

import typing
from typing import Any

import ml_collections
from ml_collections import config_dict

from attn import data as data_lib
from attn.errors import ConfigError, check_choice

SECTIONS = ("model", "data", "optim", "train", "mesh")
MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes, in priority order: a mesh axis already used by an earlier name of
# the same array is skipped (flax's rule), so activations shard the batch over data and fsdp
# while parameters shard 'embed' over fsdp (ZeRO-3 style) and heads / mlp / vocab over tensor.
DEFAULT_RULES = (
  ("batch", ("data", "fsdp")),
  ("vocab", "tensor"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("mlp", "tensor"),
  ("embed", "fsdp"),
  ("head_dim", None),
  ("length", None),
  ("relpos_buckets", None),
  ("layers", None),
)


def optim_config() -> ml_collections.ConfigDict:
  """`config.optim`: optimizer, schedule, clipping, weight decay."""
  return ml_collections.ConfigDict({
    "name": "adamw",  # adamw | adafactor | lion | sgd
    "learning_rate": 1e-3,  # peak, reached at the end of the warmup
    "schedule": "cosine",  # cosine | linear | inverse_sqrt | constant (after the warmup)
    "warmup_steps": 100,  # 0 = no warmup (the Post-LN ablation needs it)
    "decay_steps": config_dict.placeholder(int),  # None = train.num_steps
    "end_lr_factor": 0.0,  # final lr / peak lr for cosine and linear
    "b1": 0.9,  # adamw / lion first moment; sgd uses `momentum`
    "b2": 0.98,
    "eps": 1e-8,
    "momentum": 0.9,  # sgd
    "nesterov": False,
    "weight_decay": 0.0,  # decoupled; never applied to norms and biases
    "clip_norm": 1.0,  # global-norm clipping; 0 = off
  })


def train_config() -> ml_collections.ConfigDict:
  """`config.train`: the loop, evaluation, checkpoints, logging."""
  return ml_collections.ConfigDict({
    "num_steps": 1000,
    "batch_size": 32,  # global, over all processes and devices
    "grad_accum_steps": 1,  # micro-batches per step; batch_size must divide by it
    "eval_every": 200,  # 0 = only at the end
    "eval_steps": 20,  # eval batches per evaluation; 0 = the whole eval split
    "checkpoint_every": 200,  # 0 = only at the end
    "log_every": 20,
    "keep_checkpoints": 2,  # the latest N
    "keep_best": 1,  # plus the best N by `best_metric` (0 = off)
    "best_metric": "loss",  # an eval metric name
    "best_mode": "min",  # min | max
    "async_checkpoints": True,
    "progress_bar": True,
    "sample_tokens": 0,  # lm: tokens to generate from `sample_prompt` at the end (0 = none)
    "sample_prompt": "def ",
    "sample_temperature": 0.0,
    "bleu_batches": 2,  # seq2seq: eval batches decoded for BLEU / chrF at each eval (0 = off)
    "heartbeat_timeout_s": 100,  # multi-host: how soon a dead peer is noticed
  })


def mesh_config() -> ml_collections.ConfigDict:
  """`config.mesh`: axis sizes (-1 = all remaining devices) and logical axis rules."""
  return ml_collections.ConfigDict({
    "data": -1,
    "fsdp": 1,
    "tensor": 1,
    "rules": [tuple(rule) for rule in DEFAULT_RULES],
    # Also constrain activations (nn.with_logical_constraint in the layers) by the rules.
    "activation_constraints": True,
  })


def default_config() -> ml_collections.ConfigDict:
  """A full config: every section with its defaults (experiment files start here)."""
  from attn import models  # Deferred: models import layers and ops, which the checks do not need.

  return ml_collections.ConfigDict({
    "seed": 0,
    "model": models.default_config(),
    "data": data_lib.default_config(),
    "optim": optim_config(),
    "train": train_config(),
    "mesh": mesh_config(),
  })


def _check_section(name: str, section: Any, defaults: ml_collections.ConfigDict) -> None:
  """Unknown keys and wrong types in one section, against its defaults."""
  if not isinstance(section, (ml_collections.ConfigDict, dict)):
    raise ConfigError(f"config.{name} must be a ConfigDict section, got {type(section).__name__}.")
  unknown = sorted(set(section.keys()) - set(defaults.keys()))
  if unknown:
    raise ConfigError(
      f"Unknown field(s) config.{name}.{unknown}; known: {sorted(defaults.keys())}.")
  for key in defaults.keys():
    if key not in section:
      continue
    value, default = section[key], defaults[key]
    if value is None or default is None:
      continue
    if isinstance(default, bool) != isinstance(value, bool):
      raise ConfigError(f"config.{name}.{key} must be a bool, got {value!r}.")
    if isinstance(default, float) and not isinstance(value, (int, float)):
      raise ConfigError(f"config.{name}.{key} must be a number, got {value!r}.")
    if isinstance(default, int) and not isinstance(default, bool) and not isinstance(value, int):
      raise ConfigError(f"config.{name}.{key} must be an int, got {value!r}.")
    if isinstance(default, str) and not isinstance(value, str):
      raise ConfigError(f"config.{name}.{key} must be a string, got {value!r}.")


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks everything that does not need devices or data; raises ConfigError."""
  from attn.train import optimizer  # Lists of valid names live beside their implementations.

  missing = [s for s in SECTIONS if s not in config]
  if missing:
    raise ConfigError(f"config is missing section(s) {missing}; start from "
                      "attn.train.default_config().")
  unknown = sorted(set(config.keys()) - set(SECTIONS) - {"seed"})
  if unknown:
    raise ConfigError(f"Unknown top-level config field(s) {unknown}; known: seed, {SECTIONS}.")
  if not isinstance(config.get("seed", 0), int):
    raise ConfigError(f"config.seed must be an int, got {config.seed!r}.")
  _check_section("data", config.data, data_lib.default_config())
  _check_section("optim", config.optim, optim_config())
  _check_section("train", config.train, train_config())
  _check_section("mesh", config.mesh, mesh_config())

  o, t = config.optim, config.train
  check_choice("config.optim.name", o.name, optimizer.OPTIMIZERS)
  check_choice("config.optim.schedule", o.schedule, optimizer.SCHEDULES)
  if o.learning_rate < 0:
    raise ConfigError(f"config.optim.learning_rate must be >= 0, got {o.learning_rate}.")
  if o.warmup_steps < 0:
    raise ConfigError(f"config.optim.warmup_steps must be >= 0, got {o.warmup_steps}.")
  decay = o.decay_steps if o.decay_steps is not None else t.num_steps
  if o.schedule in ("cosine", "linear") and o.warmup_steps > decay:
    raise ConfigError(f"config.optim.warmup_steps ({o.warmup_steps}) exceeds the decay length "
                      f"({decay}); lower it or raise optim.decay_steps / train.num_steps.")
  for key in ("num_steps", "batch_size", "grad_accum_steps", "log_every"):
    if t[key] <= 0:
      raise ConfigError(f"config.train.{key} must be positive, got {t[key]}.")
  for key in ("eval_every", "eval_steps", "checkpoint_every", "keep_best", "sample_tokens",
              "bleu_batches"):
    if t[key] < 0:
      raise ConfigError(f"config.train.{key} must be >= 0, got {t[key]}.")
  if t.keep_checkpoints < 1:
    raise ConfigError("config.train.keep_checkpoints must be >= 1 (resume needs one).")
  if t.batch_size % t.grad_accum_steps:
    raise ConfigError(f"config.train.batch_size ({t.batch_size}) must be divisible by "
                      f"config.train.grad_accum_steps ({t.grad_accum_steps}).")
  check_choice("config.train.best_mode", t.best_mode, ("min", "max"))
  _check_sizes(config)

  sizes = [config.mesh[a] for a in MESH_AXES]
  if sum(s == -1 for s in sizes) > 1:
    raise ConfigError(f"At most one of config.mesh.{{data,fsdp,tensor}} may be -1, got {sizes}.")
  if any(s == 0 or s < -1 for s in sizes):
    raise ConfigError(f"config.mesh axis sizes must be positive or -1, got {sizes}.")
  for rule in config.mesh.rules:
    if len(rule) != 2:
      raise ConfigError(f"config.mesh.rules entries are (logical_name, mesh_axes), got {rule!r}.")
    axes = rule[1] if isinstance(rule[1], (tuple, list)) else (rule[1],)
    for axis in axes:
      if axis is not None and axis not in MESH_AXES:
        raise ConfigError(f"config.mesh.rules maps {rule[0]!r} to unknown mesh axis {axis!r}; "
                          f"mesh axes: {MESH_AXES}.")


class Conflict(typing.NamedTuple):
  """Something a run asks of a mechanism that its registry entry says it cannot do."""

  field: str  # the config field, e.g. 'data.pack'
  fits: Any  # the value that fits the mechanism, or None when none does (pick another one)
  reason: str  # a few words: why
  message: str  # the ConfigError's message: the field, what is wrong, the fix


def mechanism_conflicts(config: ml_collections.ConfigDict, kind: str,
                        mechanisms: tuple[str, ...]) -> list[Conflict]:
  """What `config` asks of these mechanisms that the registry says they cannot do: packed
  text, sampling / BLEU decoding (`check_mechanism` raises the first; experiments.presets
  turns off what fits)."""
  from attn.layers import registry  # Deferred like the models: layers import jax and flax.

  t, out = config.train, []
  for name in mechanisms:  # each mechanism of a hybrid attention_pattern too
    entry = registry.get(name)
    if kind != "vit":  # Text tasks always pass segment ids (0 = padding).
      packs = kind in ("lm", "encoder_decoder") and bool(config.data.get("pack", True))
      if packs and not entry.packed:
        fix = ("set data.pack=False (one sequence per row)" if entry.padding
               else "pick another mechanism")
        out.append(Conflict(
            "data.pack", False if entry.padding else None, f"{name!r} cannot pack sequences",
            f"model.attention={name!r} does not support packed sequences (segment_ids), and "
            f"data.pack=True packs several per row; {fix}, or use one of "
            f"{registry.supporting('packed')}."))
      if not entry.packed and not entry.padding:
        out.append(Conflict(
            "model.attention", None, f"{name!r} handles neither packing nor padding",
            f"model.attention={name!r} supports neither packed sequences nor padding, which "
            f"every text task has; use it with model.kind='vit' or pick one of "
            f"{registry.supporting('padding')}."))
    decoders = registry.supporting("decoding")
    if entry.decoding is None and kind == "lm" and t.sample_tokens > 0:
      out.append(Conflict(
          "train.sample_tokens", 0, f"{name!r} cannot decode",
          f"model.attention={name!r} cannot decode (no KV cache or recurrent state), so "
          f"train.sample_tokens={t.sample_tokens} cannot sample; set train.sample_tokens=0 or "
          f"use one of {decoders}."))
    if entry.decoding is None and kind == "encoder_decoder" and t.bleu_batches > 0:
      out.append(Conflict(
          "train.bleu_batches", 0, f"{name!r} cannot decode",
          f"model.attention={name!r} cannot decode (no KV cache or recurrent state), so "
          f"train.bleu_batches={t.bleu_batches} cannot translate for BLEU; set "
          f"train.bleu_batches=0 or use one of {decoders}."))
  return out


def model_config(config: ml_collections.ConfigDict) -> Any:
  """`validate`d config -> its `models.ModelConfig`, checked against the attention mechanism:
  all a launcher can check before a run starts (no devices, no data). Raises ConfigError."""
  from attn import models  # Deferred: config errors surface before the model imports.

  try:
    model_cfg = models.ModelConfig.from_config(config.model)
  except (TypeError, ValueError) as e:
    raise ConfigError(str(e)) from e
  check_mechanism(config, model_cfg)
  return model_cfg


def check_mechanism(config: ml_collections.ConfigDict, model_cfg: Any) -> None:
  """The attention mechanism must do what this run asks of it (registry capabilities): packed
  text, sampling / BLEU decoding. The kind and the options were checked by ModelConfig."""
  for conflict in mechanism_conflicts(config, model_cfg.kind, model_cfg.mechanisms):
    raise ConfigError(conflict.message)


def _check_sizes(config: ml_collections.ConfigDict) -> None:
  """Data sizes: positive ints, and sequences that fit the model's max_len (before any I/O)."""
  d = config.data
  for key, low in (("seq_len", 1), ("target_len", 1), ("vocab_size", 1), ("read_threads", 1),
                   ("num_workers", 0)):
    value = d.get(key)
    if value is None and key == "target_len":
      continue
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
      raise ConfigError(f"config.data.{key} must be an int >= {low}, got {value!r}.")
  model = config.model
  if model.get("kind") != "vit" and isinstance(model.get("max_len"), int):
    longest = max(d.seq_len, d.get("target_len") or d.seq_len)
    if longest > model.max_len:
      field = "seq_len" if d.seq_len == longest else "target_len"
      raise ConfigError(f"config.model.max_len={model.max_len} is shorter than the data's "
                        f"sequences ({longest}) set by config.data.{field}; raise "
                        f"model.max_len or lower data.{field}.")


def check_against_data(model_cfg: Any, info: data_lib.DataInfo) -> None:
  """The model must fit the data: task vs kind, vocabulary, classes, lengths, image shape."""
  kinds = {"lm": ("lm",), "seq2seq": ("encoder_decoder",), "classify": ("classifier",),
           "vision": ("vit",)}[info.task]
  if model_cfg.kind not in kinds:
    raise ConfigError(f"config.model.kind={model_cfg.kind!r} cannot train on {info.name!r} (a "
                      f"{info.task} dataset); use model.kind={kinds[0]!r}.")
  if info.vocab_size is not None and model_cfg.kind != "vit":
    if model_cfg.vocab_size < info.vocab_size:
      raise ConfigError(f"config.model.vocab_size={model_cfg.vocab_size} is smaller than the "
                        f"tokenizer's vocabulary ({info.vocab_size}); set it >= {info.vocab_size}.")
  if info.task in ("classify", "vision") and info.num_classes is not None:
    if model_cfg.num_classes != info.num_classes:
      raise ConfigError(f"config.model.num_classes={model_cfg.num_classes} but {info.name!r} "
                        f"has {info.num_classes} classes.")
  if info.task != "vision":
    longest = max(info.seq_len, info.target_len)
    if model_cfg.max_len < longest:
      raise ConfigError(f"config.model.max_len={model_cfg.max_len} is shorter than the data's "
                        f"sequences ({longest}); raise it or lower config.data.seq_len.")
  elif info.image_shape is not None:
    height, width, channels = info.image_shape
    if (height, width) != (model_cfg.image_size, model_cfg.image_size):
      raise ConfigError(f"config.model.image_size={model_cfg.image_size} but {info.name!r} "
                        f"images are {height}x{width}.")
    if channels != model_cfg.channels:
      raise ConfigError(f"config.model.channels={model_cfg.channels} but {info.name!r} images "
                        f"have {channels}.")
