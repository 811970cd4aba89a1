"""The attention-mechanism registry: one entry per mechanism, the single source of truth.

Each mechanism registers itself where its module is defined:

    @registry.register(name="local", paper="Beltagy et al. 2020 ...", decoding="window_cache")
    class Local(nn.Module):
      window: int | tuple[int, int] = 128   # an option: model.attention_options.window
      ...

Config validation (`ModelConfig`, the trainer), the layer (`MultiHeadAttention` and the
Transformer block), decoding (`attn.decode`), the trainer's sample, the benchmarks, the README
table, the end-to-end matrix test and the ablation sweep all read `MECHANISMS`; nothing else
keeps a list of names. Adding a mechanism = its op (attn/ops), its module with the
`@register(...)` entry (in attn/layers/variants.py, or one new file in attn/layers/mechanisms/,
which is imported automatically), and its test file.

Options: the module's dataclass fields (minus the layer attributes below) are the mechanism's
options, set by `model.attention_options` (command line:
`--config.model.attention_options.window=64`). An option name means the same type in every
mechanism that has it (the config holds one typed slot per name).

Two levels:
- level='core' (default): the module turns projected `[B, T, N, H]` queries and `[B, S, K, H]`
  keys / values into `[B, T, N, Hv]`; `MultiHeadAttention` owns the projections, RoPE, QK-norm
  and the cache, and calls `core(query, key, value, **keywords of dot_product_attention)`.
  A core may define `pattern(q_len, kv_len) -> dict` of extra mask keywords (`mask`,
  `local_window_size`, `chunk_size`): the layer merges them with its own, so the KV cache,
  the window cache and the recorded weights see the pattern too.
- level='layer': the module replaces `MultiHeadAttention` (MLA, gated / differential
  attention, Gated DeltaNet need the layer's inputs and their own projections and cache). It
  is built with MultiHeadAttention's attributes (`LAYER_ATTRIBUTES`: num_heads, num_kv_heads,
  head_dim, use_bias, dropout_rate, qk_norm, softcap, rope_base, rope_fraction, scale,
  implementation, decode, record_weights, dtype, param_dtype) plus its options (subclassing
  MultiHeadAttention gives it all of them; its `attention` stays 'softmax', so
  `super().__call__` is plain softmax attention with the KV cache), and is called like it:
  `layer(inputs_q, inputs_kv=None, *, mask, bias, q_positions, kv_positions, deterministic,
  **mask_kwargs) -> [B, T, D]`. With `decode=True` it keeps its own state in the 'cache'
  collection (created by the `init` call with a maximum-length input, updated by each later
  `apply(..., mutable=['cache'])`), exactly as MultiHeadAttention does. A
  module that declares `layer_index` gets its 0-based depth in the stack (None in a scanned
  stack; differential attention's lambda_init depends on it), and a `check_config(model_config)`
  classmethod on any module runs with the config validation (ConfigErrors before anything is
  built).

Decoding (`decoding`):
- None: cannot decode; `attn.decode.generate`, the trainer's sample and seq2seq BLEU with it
  are a ConfigError.
- 'kv_cache': MultiHeadAttention keeps every key and value (model.max_len slots).
- 'window_cache': MultiHeadAttention keeps a ring buffer of the last `window` keys and values
  (the core's `cache_slots()` says how many): memory bounded by the window, not max_len.
- 'recurrent': the core is built with `decode=True` (a module attribute it must declare) and
  keeps its own state (e.g. linear attention's running sums S = sum phi(k) v^T, z = sum phi(k))
  in the 'cache' collection: created when called at init time with the maximum-length input,
  updated by every later call with the new tokens (is_causal=True). MultiHeadAttention keeps
  no KV cache for it and passes only the new tokens' queries, keys and values.

Model kinds a mechanism supports follow from its capabilities: 'lm' needs `causal`;
'classifier', 'vit' need `bidirectional`; 'encoder_decoder' needs both (the encoder
and the decoder self-attention both use it; cross-attention stays softmax). Text tasks pass
`segment_ids`: packed data needs `packed`; a mechanism with only `padding` trains with
`data.pack=False` (one sequence per row, the rest padding).
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from attn.errors import ConfigError

DECODING = (None, "kv_cache", "window_cache", "recurrent")
LEVELS = ("core", "layer")
# The model kinds; a training task exists for each (the end-to-end matrix trains every one a
# mechanism supports).
KINDS = ("lm", "encoder_decoder", "classifier", "vit")
# What a layer-level module is built with (MultiHeadAttention's attributes); not options.
LAYER_ATTRIBUTES = ("num_heads", "num_kv_heads", "head_dim", "out_features", "use_bias",
                    "dropout_rate", "qk_norm", "softcap", "rope_base", "rope_fraction", "scale",
                    "implementation", "attention", "attention_options", "decode",
                    "record_weights", "dtype", "param_dtype", "kernel_init", "bias_init",
                    "layer_index")
# Flax module fields that are never options.
_MODULE_FIELDS = ("parent", "name")


@dataclasses.dataclass(frozen=True)
class Mechanism:
  """One attention mechanism and what it supports.

  Attributes:
    name: `model.attention` value.
    module: the linen module class (a core, or a whole layer: see `level`).
    paper: the reference, as in the README table.
    summary: a few words for the README table.
    level: 'core' (called by MultiHeadAttention) or 'layer' (replaces it).
    causal: has a causal form (decoder self-attention).
    bidirectional: has a non-causal form (encoders, classifiers, ViT).
    packed: honours `segment_ids` (several sequences per row).
    padding: honours padded keys (`key_value_seq_lengths`; padding-only segment ids).
    cross_attention: works with T != S keys from another sequence.
    decoding: None, 'kv_cache', 'window_cache' or 'recurrent' (see the module docstring).
    weights: `record_weights` returns its real attention map.
    implementations: `model.attention_impl` values it runs on (None = the default).
  """

  name: str
  module: type
  paper: str
  summary: str = ""
  level: str = "core"
  causal: bool = True
  bidirectional: bool = True
  packed: bool = True
  padding: bool = True
  cross_attention: bool = True
  decoding: str | None = None
  weights: bool = False
  implementations: tuple[str, ...] = ("xla",)

  def __post_init__(self) -> None:
    if self.decoding not in DECODING:
      raise ValueError(f"{self.name}: decoding={self.decoding!r} is not one of {DECODING}.")
    if self.level not in LEVELS:
      raise ValueError(f"{self.name}: level={self.level!r} is not one of {LEVELS}.")
    if self.decoding == "recurrent" and self.level == "core" and "decode" not in _fields(
        self.module):
      raise ValueError(f"{self.name}: a recurrent core must declare a `decode` attribute.")

  @property
  def kinds(self) -> tuple[str, ...]:
    """The model kinds it supports (see the module docstring)."""
    need = {"lm": self.causal, "encoder_decoder": self.causal and self.bidirectional,
            "classifier": self.bidirectional, "vit": self.bidirectional}
    return tuple(kind for kind in KINDS if need[kind])

  @property
  def options(self) -> dict[str, tuple[Any, Any]]:
    """Option name -> (annotation, default), from the module's dataclass fields."""
    hints = typing.get_type_hints(self.module)
    skip = set(_MODULE_FIELDS) | {"decode"}
    if self.level == "layer":
      skip |= set(LAYER_ATTRIBUTES)
    return {f.name: (hints.get(f.name, Any), f.default)
            for f in dataclasses.fields(self.module)
            if f.init and f.name not in skip and f.default is not dataclasses.MISSING}


_REGISTRY: dict[str, Mechanism] = {}
_LOADED = False


def register(**entry: Any) -> Callable[[type], type]:
  """Class decorator: registers `Mechanism(module=cls, **entry)`; returns the class."""

  def wrap(cls: type) -> type:
    mechanism = Mechanism(module=cls, **entry)
    if mechanism.name in _REGISTRY and _REGISTRY[mechanism.name].module is not cls:
      raise ValueError(f"attention mechanism {mechanism.name!r} is registered twice.")
    _REGISTRY[mechanism.name] = mechanism
    return cls

  return wrap


def unregister(name: str) -> None:
  """Removes an entry (tests that register a temporary mechanism)."""
  _REGISTRY.pop(name, None)


def _load() -> None:
  """Imports every module that registers mechanisms (once)."""
  global _LOADED
  if _LOADED:
    return
  _LOADED = True
  importlib.import_module("attn.layers.variants")
  package = importlib.import_module("attn.layers.mechanisms")
  for info in pkgutil.iter_modules(package.__path__):
    importlib.import_module(f"{package.__name__}.{info.name}")


def mechanisms() -> dict[str, Mechanism]:
  """name -> Mechanism, in registration order."""
  _load()
  return dict(_REGISTRY)


def names() -> tuple[str, ...]:
  return tuple(mechanisms())


def get(name: str, field: str = "model.attention") -> Mechanism:
  """The entry for `name`; an unknown name is a ConfigError listing the valid ones."""
  table = mechanisms()
  if name not in table:
    raise ConfigError(f"{field}={name!r} is unknown; choose one of {sorted(table)}.")
  return table[name]


def _fields(cls: type) -> set[str]:
  return {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()


def _matches(value: Any, annotation: Any) -> bool:
  """Whether `value` fits the option's annotation (int | tuple[int, int], float, bool, ...)."""
  if annotation is Any:
    return True
  origin = typing.get_origin(annotation)
  if origin in (typing.Union, types.UnionType):
    return any(_matches(value, arg) for arg in typing.get_args(annotation))
  if annotation is type(None):
    return value is None
  if origin is tuple:
    args = typing.get_args(annotation)
    if not isinstance(value, (tuple, list)):
      return False
    if len(args) == 2 and args[1] is Ellipsis:
      return all(_matches(v, args[0]) for v in value)
    return len(args) == len(value) and all(_matches(v, a) for v, a in zip(value, args, strict=True))
  if annotation is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if annotation is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if isinstance(annotation, type):
    return isinstance(value, annotation)
  return True


def _describe(options: Mapping[str, tuple[Any, Any]]) -> str:
  return ", ".join(f"{k}={d!r}" for k, (_, d) in options.items()) or "none"


def check_options(name: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
  """`options` checked against the mechanism's fields; lists become tuples (hashable).

  An unknown key or a wrong type is a ConfigError naming `model.attention_options.<key>` and
  listing the valid options with their defaults.
  """
  mechanism = get(name)
  valid = mechanism.options
  out = {}
  for key, value in dict(options or {}).items():
    if key not in valid:
      raise ConfigError(
          f"model.attention_options.{key} is not an option of model.attention={name!r}; its "
          f"options (with defaults): {_describe(valid)}.")
    if isinstance(value, list):
      value = tuple(value)
    annotation, default = valid[key]
    if not _matches(value, annotation):
      raise ConfigError(
          f"model.attention_options.{key}={value!r} does not fit model.attention={name!r}: "
          f"expected {_type_name(annotation)} (default {default!r}); its options: "
          f"{_describe(valid)}.")
    out[key] = value
  return out


def _type_name(annotation: Any) -> str:
  return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _cli_type(annotation: Any) -> type | None:
  """The scalar type a command-line value of this option parses as (int for int | tuple)."""
  if isinstance(annotation, type) and annotation in (int, float, bool, str):
    return annotation
  for arg in typing.get_args(annotation):
    found = _cli_type(arg)
    if found is not None:
      return found
  return None


def option_slots() -> dict[str, type]:
  """Every option name of every mechanism -> its command-line type (one typed config slot per
  name, so `--config.model.attention_options.<name>=v` works under a locked config)."""
  slots: dict[str, tuple[type, str]] = {}
  for mechanism in mechanisms().values():
    for key, (annotation, _) in mechanism.options.items():
      cli = _cli_type(annotation)
      if cli is None:
        continue  # Not settable from a command line; still settable from Python.
      if key in slots and slots[key][0] is not cli:
        raise ValueError(
            f"attention option {key!r} is {slots[key][0].__name__} in {slots[key][1]!r} but "
            f"{cli.__name__} in {mechanism.name!r}; give one of them another name.")
      slots.setdefault(key, (cli, mechanism.name))
  return {key: cli for key, (cli, _) in sorted(slots.items())}


def check_model(name: str, kind: str) -> Mechanism:
  """The mechanism must support the model kind; else a ConfigError naming the fix."""
  mechanism = get(name)
  if kind not in mechanism.kinds:
    lacks = []
    if kind in ("lm", "encoder_decoder") and not mechanism.causal:
      lacks.append("a causal form (decoder self-attention)")
    if kind != "lm" and not mechanism.bidirectional:
      lacks.append("a bidirectional form (encoder self-attention)")
    fits = [n for n, m in mechanisms().items() if kind in m.kinds]
    raise ConfigError(
        f"model.attention={name!r} cannot be used in model.kind={kind!r}: it lacks "
        f"{' and '.join(lacks)}. Use it in model.kind in {list(mechanism.kinds)}, or pick a "
        f"mechanism that supports {kind!r}: {fits}.")
  return mechanism


def check_layer_config(name: str, model_config: Any) -> None:
  """The mechanism's own checks of the model config, before anything is built: its module's
  `check_config(model_config)` classmethod, if it has one, raises a ConfigError naming the
  field (e.g. differential attention needs paired heads)."""
  check = getattr(get(name).module, "check_config", None)
  if check is not None:
    check(model_config)


def supporting(capability: str) -> list[str]:
  """Names of the mechanisms with a truthy `capability` (e.g. 'decoding', 'packed')."""
  return [n for n, m in mechanisms().items() if getattr(m, capability)]


def readme_rows() -> list[str]:
  """The README's mechanism table rows (tests/test_readme_registry.py keeps them in sync):
  `python -c "from attn.layers import registry; print(*registry.readme_rows(), sep='\\n')"`.

  trains: the model kinds the end-to-end matrix trains it on (tests/train/test_mechanisms.py);
  decodes: its cache, tested through `attn.decode.generate`; packed: segment ids, or padding
  only (`data.pack=False`).
  """
  rows = []
  for name, m in mechanisms().items():
    options = ", ".join(f"`{k}={d!r}`" for k, (_, d) in m.options.items()) or "-"
    packed = "yes" if m.packed else ("padding only" if m.padding else "no")
    level = "" if m.level == "core" else " (layer)"
    kinds = ", ".join(m.kinds)
    rows.append(f"| `{name}`{level} | {m.summary} | {m.paper} | {options} | {kinds} | "
                f"{m.decoding or 'no'} | {packed} | {'yes' if m.weights else 'no'} |")
  return rows
