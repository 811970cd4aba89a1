"""LM train-step speed: our attention layer against flax.linen.MultiHeadDotProductAttention.

  python -m experiments.benchmarks.train [--config experiments/default.py] [--preset default]
      [--config.model.d_model=256 ...] [--steps 10] [--rounds 5] [--out PATH]

Both variants run the trainer's own jitted `train_step` (the optimizer, loss and donation of
`make train`) on one real batch of the config's dataset, on one device:
  - 'attn': the model as `attn.models.build` makes it (`MultiHeadAttention`, implementation
    from `config.model.attention_impl`, None = auto);
  - 'flax': the same model with every self-attention layer replaced by
    `flax.linen.MultiHeadDotProductAttention` fed the masks flax's helpers build
    (`make_causal_mask`, `make_attention_mask` over segment ids) and `flax.linen
    .dot_product_attention`, as the flax examples do. The parameter trees are identical, so
    the run first checks that both give the same loss on the same parameters (the same
    architecture, not just the same size).

The variants take turns (`--rounds` rounds of `--steps` steps each, after a warmup), so machine
noise hits them alike; the table reports the median step time, tokens/s (every position of the
packed batch), MFU (model FLOPs from `attn.train.metrics.model_flops_per_step`: 6 x params per
token plus the attention matmuls, MaxText's count; peak: the chip's bf16 peak, or this host's
measured float32 matmul rate on CPU), XLA's temporary memory for the step, and the ratio
tokens/s attn / flax (target >= 1.0). JSON goes to experiments/benchmarks/results/
train_<preset>_<device>.json.

Presets (`--preset`): 'default' is the config as given (experiments/default.py: the 826K LM of
`make train`, 16 x 128 bytes); 'gpt350m' is a GPT of d_model 1024, 24 layers, 8 heads of 128,
MLP 4096 and a 32k vocabulary (336M parameters) in bfloat16 at 8 x 2048 tokens, for a GPU
(too slow for a CPU).
Hardware: 'default' on this 2-core CPU takes ~1 minute.
"""

from __future__ import annotations

import contextlib
import functools
import platform
import statistics
import time
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from attn import data as data_lib
from attn import models
from attn.models import transformer
from attn.ops import positions as positions_lib
from attn.train import metrics as metrics_lib
from attn.train import state as state_lib
from attn.train import steps as steps_lib
from attn.train.optimizer import make_optimizer
from attn.train.tasks import make_task
from experiments.benchmarks import common

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/default.py",
                                          "Experiment config file.")
_PRESET = flags.DEFINE_string("preset", "default", "A name in PRESETS (applied to --config).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per round and variant.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Rounds (the variants alternate between rounds).")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps per variant after compiling.")
_VARIANTS = flags.DEFINE_list("variants", ["attn", "flax"], "Which variants to run.")

TARGET_RATIO = 1.0  # tokens/s attn / flax

# Config overrides by preset name, applied on top of --config.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "default": {},
    # GPT-2-medium-like, 24 x (4 D^2 attention + 8 D^2 MLP) = 302M in the blocks, plus a 32k
    # x 1024 tied embedding: ~336M parameters. bfloat16 compute, float32 weights.
    "gpt350m": {
        "model": {"d_model": 1024, "num_layers": 24, "num_heads": 8, "head_dim": 128,
                  "mlp_dim": 4096, "vocab_size": 32768, "max_len": 2048, "ffn": "gelu",
                  "dtype": "bfloat16", "scan_layers": True},
        "data": {"seq_len": 2048},
        "train": {"batch_size": 8},
    },
}


def apply_preset(config: ml_collections.ConfigDict, preset: str) -> ml_collections.ConfigDict:
  """A copy of `config` with PRESETS[preset] applied."""
  if preset not in PRESETS:
    raise ValueError(f"--preset={preset!r} is unknown; choose one of {sorted(PRESETS)}.")
  config = config.copy_and_resolve_references()
  for section, fields in PRESETS[preset].items():
    config[section].update(fields)
  return config


def _rope_then_attend(query, key, value, *, positions, base, fraction, bias, mask,
                      dropout_rng=None, dropout_rate=0.0, deterministic=True, dtype=None):
  """flax's `dot_product_attention` after RoPE on q and k (flax's layer has no RoPE)."""
  if positions is not None:
    query = positions_lib.apply_rope(query, positions, base=base, fraction=fraction)
    key = positions_lib.apply_rope(key, positions, base=base, fraction=fraction)
  return nn.dot_product_attention(query, key, value, bias=bias, mask=mask,
                                  dropout_rng=dropout_rng, dropout_rate=dropout_rate,
                                  deterministic=deterministic, dtype=dtype)


def flax_attention_layer(config: models.ModelConfig, name: str, *, rope: bool,
                         decode: bool = False, mechanism: str = "softmax",
                         layer_index: int | None = None):
  """A drop-in for `transformer.attention_layer` built from flax's own attention layer.

  Returns a callable with `MultiHeadAttention`'s call signature (the keywords Block passes);
  the flax module it wraps is named `name`, so the parameter tree is the same as ours.
  """
  unsupported = {"decode": decode, "attention": mechanism != "softmax",
                 "num_kv_heads": config.kv_heads != config.num_heads,
                 "qk_norm": config.qk_norm, "softcap": config.softcap is not None}
  named = [field for field, used in unsupported.items() if used]
  if named:
    raise ValueError(f"The flax baseline has no {', '.join(named)}; benchmark a config "
                     f"without them.")
  kwargs = dict(num_heads=config.num_heads, qkv_features=config.num_heads * config.head_size,
                use_bias=config.use_bias, dropout_rate=config.attention_dropout_rate,
                dtype=config.compute_dtype, param_dtype=config.weights_dtype)

  def attend(inputs_q, inputs_kv=None, *, bias=None, q_positions=None, segment_ids=None,
             is_causal=False, local_window_size=None, chunk_size=None, deterministic=True):
    if local_window_size is not None or chunk_size is not None:
      raise ValueError("The flax baseline has no local window or chunked mask.")
    inputs_kv = inputs_q if inputs_kv is None else inputs_kv
    mask = nn.make_causal_mask(inputs_q[..., 0]) if is_causal else None
    if segment_ids is not None:
      mask = nn.combine_masks(mask, nn.make_attention_mask(segment_ids, segment_ids, jnp.equal))
    positions = None
    if rope:
      positions = q_positions if q_positions is not None else jnp.broadcast_to(
          jnp.arange(inputs_q.shape[1]), inputs_q.shape[:2])
    attention_fn = functools.partial(_rope_then_attend, positions=positions,
                                     base=config.rope_base, fraction=config.rope_fraction,
                                     bias=bias)
    # Created here, inside the calling Block's compact method, so the Block is its parent.
    layer = nn.MultiHeadDotProductAttention(**kwargs, out_features=inputs_q.shape[-1],
                                            attention_fn=attention_fn, name=name)
    return layer(inputs_q, inputs_kv, mask=mask, deterministic=deterministic)

  return attend


@contextlib.contextmanager
def flax_attention() -> Iterator[None]:
  """Within the block, models built by `attn.models` use the flax baseline attention."""
  original = transformer.attention_layer
  transformer.attention_layer = flax_attention_layer
  try:
    yield
  finally:
    transformer.attention_layer = original


def _under(variant: str) -> contextlib.AbstractContextManager:
  """Where the model traces as `variant`: 'attn' (ours) or 'flax' (the baseline)."""
  if variant not in ("attn", "flax"):
    raise ValueError(f"Unknown variant {variant!r}; choose 'attn' or 'flax'.")
  return flax_attention() if variant == "flax" else contextlib.nullcontext()


def compile_step(variant: str, model: nn.Module, task: Any, tx: Any, schedule: Any,
                 state: Any, batch: Any) -> Any:
  """The trainer's `train_step`, jitted with the state donated, compiled ahead as `variant`."""
  step = jax.jit(functools.partial(steps_lib.train_step, model=model, task=task, tx=tx,
                                   schedule=schedule), donate_argnums=(0,))
  with _under(variant):
    return step.lower(state, batch).compile()


def eval_loss(variant: str, model: nn.Module, task: Any, params: Any, batch: Any) -> float:
  """The mean loss of `batch` under `params`, with the model traced as `variant`."""

  def loss(params, batch):
    logits, _ = task.forward(model, {"params": params}, batch, train=False)
    stats = task.stats(logits, batch)
    return stats["loss_sum"] / stats["weight_sum"]

  with _under(variant):
    return float(jax.jit(loss)(params, batch))


def check_same_architecture(model: nn.Module, task: Any, params: Any, batch: Any, *,
                            rtol: float) -> dict[str, float]:
  """Both variants on the same parameters: equal parameter trees and losses, or an error."""
  init = functools.partial(model.init, jax.random.PRNGKey(0), *task.inputs(batch)[0],
                           **task.inputs(batch)[1], deterministic=True)
  with _under("flax"):
    theirs = jax.eval_shape(init)["params"]
  spec = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), nn.meta.unbox(tree))  # noqa: E731
  if spec(theirs) != spec(params):
    raise AssertionError(f"The flax baseline's parameters differ from ours:\n{spec(theirs)}\n"
                         f"vs\n{spec(params)}")
  losses = {variant: eval_loss(variant, model, task, params, batch) for variant in ("attn", "flax")}
  diff = abs(losses["attn"] - losses["flax"])
  if not diff <= rtol * abs(losses["flax"]):
    raise AssertionError(f"Same parameters, different losses: {losses} (|diff| {diff:.3g}).")
  return {"loss_attn": losses["attn"], "loss_flax": losses["flax"], "abs_diff": diff}


def setup(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Model, task, optimizer, one real batch (on device) and the FLOPs of one step."""
  from attn.train import config as config_lib

  config_lib.validate(config)
  model_cfg = models.ModelConfig.from_config(config.model)
  batch_size = config.train.batch_size
  train_iter, _, info = data_lib.make_iterators(config.data, global_batch_size=batch_size,
                                                seed=config.seed)
  config_lib.check_against_data(model_cfg, info)
  task = make_task(info)
  model = models.build(model_cfg)
  tx, schedule = make_optimizer(config.optim, num_steps=config.train.num_steps)
  batch = jax.device_put(next(iter(train_iter)))
  init = state_lib.make_init_fn(model, task, tx, batch_size)
  num_params = models.count_params(jax.eval_shape(init, jnp.uint32(0)).params)
  return {
      "model_cfg": model_cfg, "info": info, "task": task, "model": model, "tx": tx,
      "schedule": schedule, "batch": batch, "init": jax.jit(init), "num_params": num_params,
      "tokens_per_step": batch_size * info.seq_len,
      "flops_per_step": metrics_lib.model_flops_per_step(num_params, model_cfg, info,
                                                         batch_size),
  }


def _timed(step: Any, state: Any, batch: Any, num_steps: int) -> tuple[Any, float]:
  """Runs `num_steps` steps; returns the state and the mean seconds per step."""
  start = time.perf_counter()
  for _ in range(num_steps):
    state, _ = step(state, batch)
  jax.block_until_ready(state)
  return state, (time.perf_counter() - start) / max(num_steps, 1)


def benchmark(config: ml_collections.ConfigDict, *, variants: list[str], num_steps: int,
              rounds: int, warmup: int) -> dict[str, Any]:
  """Compiles and times every variant (interleaved); returns the JSON-ready results."""
  s = setup(config)
  model, task, batch = s["model"], s["task"], s["batch"]
  params = s["init"](jnp.uint32(config.seed)).params
  rtol = 1e-4 if s["model_cfg"].compute_dtype == jnp.float32 else 2e-2
  check = check_same_architecture(model, task, params, batch, rtol=rtol)
  peak, peak_basis = metrics_lib.peak_flops()

  compiled, states, results = {}, {}, {}
  for variant in variants:
    state = s["init"](jnp.uint32(config.seed))
    start = time.perf_counter()
    compiled[variant] = compile_step(variant, model, task, s["tx"], s["schedule"], state, batch)
    compile_s = time.perf_counter() - start
    memory = compiled[variant].memory_analysis()
    states[variant], _ = _timed(compiled[variant], state, batch, warmup)
    results[variant] = {"compile_s": compile_s, "round_step_s": [],
                        "temp_bytes": getattr(memory, "temp_size_in_bytes", None)}
  for _ in range(rounds):
    for variant in variants:
      states[variant], seconds = _timed(compiled[variant], states[variant], batch, num_steps)
      results[variant]["round_step_s"].append(seconds)

  for r in results.values():
    step_s = statistics.median(r["round_step_s"])
    r.update(step_s=step_s, tokens_per_s=s["tokens_per_step"] / step_s,
             mfu=s["flops_per_step"] / step_s / peak)
  device = jax.devices()[0]
  out = {
      "benchmark": "train_step",
      "device": device.device_kind, "platform": device.platform,
      "host": platform.node(), "jax": jax.__version__,
      "model": {"num_params": s["num_params"], "d_model": s["model_cfg"].d_model,
                "num_layers": s["model_cfg"].num_layers, "num_heads": s["model_cfg"].num_heads,
                "head_dim": s["model_cfg"].head_size, "compute_dtype":
                    jnp.dtype(s["model_cfg"].compute_dtype).name,
                "attention_impl": s["model_cfg"].attention_impl},
      "batch": {"batch_size": config.train.batch_size, "seq_len": s["info"].seq_len,
                "dataset": config.data.name},
      "flops_per_step": s["flops_per_step"], "peak_flops": peak, "peak_basis": peak_basis,
      "steps_per_round": num_steps, "rounds": rounds, "same_architecture": check,
      "variants": results,
  }
  if "attn" in results and "flax" in results:
    out["ratio_tokens_per_s"] = results["attn"]["tokens_per_s"] / results["flax"]["tokens_per_s"]
    out["target_ratio"] = TARGET_RATIO
    out["target_met"] = out["ratio_tokens_per_s"] >= TARGET_RATIO
  return out


def format_table(result: dict[str, Any]) -> str:
  rows = [f"{'variant':8} {'step ms':>9} {'tokens/s':>10} {'MFU %':>6} {'temp MiB':>9} "
          f"{'compile s':>9}"]
  for name, r in result["variants"].items():
    temp = r["temp_bytes"] / 2**20 if r["temp_bytes"] is not None else float("nan")
    rows.append(f"{name:8} {1e3 * r['step_s']:9.2f} {r['tokens_per_s']:10.0f} "
                f"{100 * r['mfu']:6.1f} {temp:9.1f} {r['compile_s']:9.1f}")
  m = result["model"]
  batch = result["batch"]
  lines = [f"{result['platform']} {result['device']}: {m['num_params']:,} parameters, "
           f"{batch['batch_size']} x {batch['seq_len']} tokens, {m['compute_dtype']}; peak: "
           f"{result['peak_basis']}", *rows]
  check = result["same_architecture"]
  lines.append(f"same parameters, same loss: attn {check['loss_attn']:.6f} vs flax "
               f"{check['loss_flax']:.6f}")
  if "ratio_tokens_per_s" in result:
    verdict = "met" if result["target_met"] else "MISSED"
    lines.append(f"tokens/s attn / flax = {result['ratio_tokens_per_s']:.3f} (target >= "
                 f"{TARGET_RATIO}: {verdict})")
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  del argv
  config = apply_preset(_CONFIG.value, _PRESET.value)
  result = benchmark(config, variants=_VARIANTS.value, num_steps=_STEPS.value,
                     rounds=_ROUNDS.value, warmup=_WARMUP.value)
  result["preset"] = _PRESET.value
  print(format_table(result))
  path = common.write_json(result, f"train_{_PRESET.value}")
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
