"""Attention speed and memory: our implementations against jax.nn and flax, side by side.

  python -m experiments.benchmarks.attention [--lengths 256,512,...] [--causal] [--dtype float32]

For each sequence length it measures the forward and the forward+backward pass of every
implementation, jitted: the median wall time over interleaved repetitions (the implementations
take turns, so machine noise hits them alike), the compiled temporary memory from XLA's memory
analysis (deterministic) and XLA's FLOP count. It prints a table, writes JSON to
experiments/benchmarks/results/attention_<device>.json and checks the target: our default path
(implementation=None) is no slower than jax.nn.dot_product_attention (ratio <= 1.05) at every
length, forward and forward+backward.
"""

import json
import pathlib
import platform
import statistics
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import app, flags

from attn.ops import dot_product_attention

_LENGTHS = flags.DEFINE_list("lengths", ["256", "512", "1024", "2048", "4096", "8192"],
                             "Sequence lengths (T = S).")
_BATCH = flags.DEFINE_integer("batch", 1, "Batch size.")
_HEADS = flags.DEFINE_integer("heads", 4, "Query heads.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 0, "Key/value heads (0 = same as heads).")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Head dimension.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Input dtype.")
_CAUSAL = flags.DEFINE_boolean("causal", True, "Causal masking.")
_MIN_REPS = flags.DEFINE_integer("min_reps", 5, "Minimum timed repetitions per implementation.")
_MIN_SECONDS = flags.DEFINE_float("min_seconds", 2.0, "Keep repeating until this much time.")
_TARGET = flags.DEFINE_float("target_ratio", 1.05, "Max time ratio ours / jax.nn.")
_OUT = flags.DEFINE_string("out", "", "JSON path (default: results/attention_<device>.json).")

RESULTS_DIR = pathlib.Path(__file__).parent / "results"
OURS = "attn (default)"
JAX_NN = "jax.nn.dot_product_attention"


def implementations(causal: bool) -> dict[str, Callable]:
  """Name -> attention(q, k, v) for every path under test."""

  def flax_attention(q, k, v):
    # flax's function takes a dense mask and needs K/V heads repeated to the query heads.
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    mask = nn.make_causal_mask(jnp.ones(q.shape[:2])) if causal else None
    return nn.dot_product_attention(q, k, v, mask=mask)

  impls = {
      OURS: lambda q, k, v: dot_product_attention(q, k, v, is_causal=causal),
      JAX_NN: lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal),
      "flax.linen.dot_product_attention": flax_attention,
  }
  for name in dict.fromkeys(("xla",) + tuple(_available())):
    impls[f"attn ({name})"] = (
        lambda q, k, v, name=name: dot_product_attention(q, k, v, is_causal=causal,
                                                         implementation=name))
  return impls


def _available() -> tuple[str, ...]:
  from attn.ops import available_implementations
  return available_implementations()


def forward_and_backward(fn: Callable) -> Callable:
  """The gradient of a scalar of fn's output with respect to q, k and v."""

  def loss(q, k, v):
    return jnp.sum(fn(q, k, v).astype(jnp.float32) ** 2)

  return jax.grad(loss, argnums=(0, 1, 2))


def compile_once(fn: Callable, args) -> tuple[Callable, dict]:
  """Jit and compile; return the executable and XLA's memory and FLOP numbers."""
  compiled = jax.jit(fn).lower(*args).compile()
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return compiled, {
      "temp_bytes": int(memory.temp_size_in_bytes) if memory is not None else None,
      "flops": float(cost.get("flops", 0.0)) if cost else None,
  }


def time_interleaved(executables: dict[str, Callable], args, min_reps: int,
                     min_seconds: float) -> dict[str, float]:
  """Median seconds per call; the executables run in turn, once each per round."""
  for exe in executables.values():
    jax.block_until_ready(exe(*args))  # warm up
  samples = {name: [] for name in executables}
  start = time.perf_counter()
  while (min(len(s) for s in samples.values()) < min_reps
         or time.perf_counter() - start < min_seconds):
    for name, exe in executables.items():
      t0 = time.perf_counter()
      jax.block_until_ready(exe(*args))
      samples[name].append(time.perf_counter() - t0)
  return {name: statistics.median(s) for name, s in samples.items()}


def run_length(length: int, impls: dict[str, Callable]) -> list[dict]:
  """Every implementation at one sequence length, forward and forward+backward."""
  kv_heads = _KV_HEADS.value or _HEADS.value
  dtype = jnp.dtype(_DTYPE.value)
  keys = jax.random.split(jax.random.key(length), 3)
  q = jax.random.normal(keys[0], (_BATCH.value, length, _HEADS.value, _HEAD_DIM.value), dtype)
  k = jax.random.normal(keys[1], (_BATCH.value, length, kv_heads, _HEAD_DIM.value), dtype)
  v = jax.random.normal(keys[2], (_BATCH.value, length, kv_heads, _HEAD_DIM.value), dtype)
  rows = []
  for mode, wrap in (("fwd", lambda f: f), ("fwd+bwd", forward_and_backward)):
    executables, stats = {}, {}
    for name, fn in impls.items():
      executables[name], stats[name] = compile_once(wrap(fn), (q, k, v))
    times = time_interleaved(executables, (q, k, v), _MIN_REPS.value, _MIN_SECONDS.value)
    for name in impls:
      rows.append({"length": length, "mode": mode, "implementation": name,
                   "median_s": times[name], "ratio_vs_jax_nn": times[name] / times[JAX_NN],
                   **stats[name]})
  return rows


def print_table(rows: list[dict]) -> None:
  header = f"{'T':>6} {'mode':>8} {'implementation':<34} {'median ms':>10} {'vs jax.nn':>9} " \
           f"{'temp MiB':>9} {'GFLOP':>8}"
  print(header)
  print("-" * len(header))
  for r in rows:
    mem = "n/a" if r["temp_bytes"] is None else f"{r['temp_bytes'] / 2**20:.1f}"
    flops = "n/a" if not r["flops"] else f"{r['flops'] / 1e9:.2f}"
    print(f"{r['length']:>6} {r['mode']:>8} {r['implementation']:<34} "
          f"{r['median_s'] * 1e3:>10.2f} {r['ratio_vs_jax_nn']:>9.3f} {mem:>9} {flops:>8}")


def check_target(rows: list[dict], target: float) -> dict:
  """Worst ratio of our default path to jax.nn over every length and mode."""
  ours = [r for r in rows if r["implementation"] == OURS]
  worst = max(ours, key=lambda r: r["ratio_vs_jax_nn"])
  return {"target_ratio": target, "worst_ratio": worst["ratio_vs_jax_nn"],
          "worst_at": {"length": worst["length"], "mode": worst["mode"]},
          "met": worst["ratio_vs_jax_nn"] <= target}


def main(argv: list[str]) -> None:
  del argv
  device = jax.devices()[0]
  impls = implementations(_CAUSAL.value)
  rows = []
  for length in map(int, _LENGTHS.value):
    rows.extend(run_length(length, impls))
    print(f"done T={length}", flush=True)
  print_table(rows)
  verdict = check_target(rows, _TARGET.value)
  print(f"\nTarget: ours / jax.nn <= {verdict['target_ratio']} at every length: "
        f"{'MET' if verdict['met'] else 'NOT MET'} (worst {verdict['worst_ratio']:.3f} at "
        f"T={verdict['worst_at']['length']} {verdict['worst_at']['mode']})")
  device_name = device.device_kind.replace(" ", "_").lower()
  out = pathlib.Path(_OUT.value or RESULTS_DIR / f"attention_{device_name}.json")
  out.parent.mkdir(parents=True, exist_ok=True)
  settings = {"batch": _BATCH.value, "heads": _HEADS.value, "kv_heads": _KV_HEADS.value or
              _HEADS.value, "head_dim": _HEAD_DIM.value, "dtype": _DTYPE.value,
              "causal": _CAUSAL.value}
  out.write_text(json.dumps({
      "device": device.device_kind, "platform": device.platform, "jax": jax.__version__,
      "host": platform.processor() or platform.machine(), "settings": settings,
      "target": verdict, "rows": rows}, indent=1))
  print(f"wrote {out}")


if __name__ == "__main__":
  app.run(main)
