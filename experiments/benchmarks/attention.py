"""Attention speed and memory against T: every registry mechanism, and our softmax paths
against jax.nn and flax.

  python -m experiments.benchmarks.attention --quick       # smoke run: T = 128, 512 (~2 min CPU)
  python -m experiments.benchmarks.attention               # CPU, T = 256 ... 16384
  # GPU (JAX_PLATFORMS unset or cuda; writes results/attention_<device>.json and .png); on
  # one H200 this took 229 s (results/attention_mechanisms_nvidia_h200.json), add lengths
  # (1024, 4096, 16384) for the curves at ~2 minutes each:
  python -m experiments.benchmarks.attention --dtype bfloat16 --head_dim 128 --batch 4 \
      --heads 16 --min_reps 3 --min_seconds 0.2 --lengths 2048,8192 --implementations cudnn,xla

Two groups of rows, timed together (interleaved) at each length T:
- baselines, on q, k, v `[B, T, N, H]`: our `dot_product_attention` (auto, and each
  implementation the backend has) against `jax.nn.dot_product_attention` and
  `flax.linen.dot_product_attention`; forward and forward+backward (`--implementations`
  filters them by substring; the default path and jax.nn always run).
- mechanisms: every entry of the registry (`attn/layers/registry.py`; `--mechanisms` picks
  some, `--mechanisms=` none), built as the model builds it
  (`attn.models.transformer.attention_layer`: projections, the mechanism's parameters, its
  options at their defaults; x `[B, T, N * H]`), forward+backward with respect to x and the
  parameters, as it trains. Causal (with --causal) where the entry has a causal form, else
  bidirectional; each row says which. An option named `max_length` (linformer's projection
  along the sequence) is set to T.

Each row: the median wall time over interleaved repetitions (the paths take turns, so machine
noise hits them alike; calls shorter than SAMPLE_SECONDS are timed back to back, one wait per
sample, so an accelerator's device time is measured, not the host's round trip; see
`time_interleaved`), XLA's compiled memory (temporaries, and the peak: arguments + outputs +
temporaries - aliases; deterministic), XLA's FLOP count (a loop body counted once) and, for the
softmax baselines, softmax attention's model FLOPs (4 B T S N H forward, 2.5x that backward)
with the rate they imply. A path whose compiled peak exceeds --max_memory_gib (default: 90% of
the device's memory, half the host's on CPU), or that fails to compile or run, is skipped and
listed under "skipped" in the JSON: no list of "quadratic" paths is kept.

It prints a table, writes JSON (and, with matplotlib, a log-log PNG of time and peak memory
against T) to experiments/benchmarks/results/attention_<device>.json (--quick:
attention_quick_<device>.json; --out overrides), and checks the targets:
  - our default path (implementation=None) is no slower than jax.nn (ratio <= 1.05) at every
    length, forward and forward+backward;
  - blockwise temporary memory at T=8192 is <= 1/8 of the xla path's, and grows <= 5x from
    T=4096 to T=16384 (forward+backward);
  - every recurrent mechanism (registry decoding='recurrent': linear, performer,
    gated_deltanet, linear in T by construction) takes <= 5x the forward+backward time when T
    grows 4x from --growth_from (2048 -> 8192: #18's check of Gated DeltaNet's chunkwise form);
    PASS / FAIL / not measured, in the printed table and the JSON's "growth";
  - from T = 2048 our fastest softmax path takes <= 0.5x jax.nn's forward+backward time, and
    reaches >= 35% of this host's measured float32 matmul rate (a CPU target);
  - on an NVIDIA GPU, the cudnn path's forward reaches >= 400 TFLOP/s from T = 4096 (run it
    with --dtype bfloat16 --head_dim 128).
`--rows_from results/attention_cpu.json` re-checks and re-plots an earlier run without
measuring. Hardware: any; on this 2-core CPU the default lengths take ~30 minutes.
"""

import json
import math
import os
import pathlib
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import app, flags

from attn.layers import registry
from attn.models import ModelConfig, transformer
from attn.ops import dot_product_attention
from attn.train import metrics as metrics_lib
from experiments.benchmarks import common

_LENGTHS = flags.DEFINE_list(
    "lengths", ["256", "512", "1024", "2048", "4096", "8192", "16384"], "Sequence lengths (T = S).")
_BATCH = flags.DEFINE_integer("batch", 1, "Batch size.")
_HEADS = flags.DEFINE_integer("heads", 4, "Query heads.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 0, "Key/value heads (0 = same as heads).")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Head dimension.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Input dtype.")
_CAUSAL = flags.DEFINE_boolean("causal", True, "Causal masking.")
_IMPLS = flags.DEFINE_list("implementations", [], "Baselines: only these (substring match; the "
                           "default path and jax.nn always run). Empty = all.")
_MAX_MEMORY = flags.DEFINE_float("max_memory_gib", 0.0, "Skip paths whose compiled peak memory "
                                 "exceeds this (0 = 90% of the device's, half the host's).")
_MIN_REPS = flags.DEFINE_integer("min_reps", 5, "Minimum timed repetitions per implementation.")
_MIN_SECONDS = flags.DEFINE_float("min_seconds", 2.0, "Keep repeating until this much time.")
_TARGET = flags.DEFINE_float("target_ratio", 1.05, "Max time ratio ours / jax.nn.")
_GROWTH_FROM = flags.DEFINE_integer("growth_from", 2048, "The recurrent mechanisms' growth check "
                                    "compares T = this and 4x this.")
_ROWS_FROM = flags.DEFINE_string("rows_from", "", "Measure nothing: re-check the targets and "
                                 "re-plot the rows of this earlier JSON.")

# --quick (smoke run; `--mechanisms=` none, default every registry entry).
QUICK = {"lengths": ["128", "512"], "growth_from": 128, "min_reps": 1, "min_seconds": 0.0}

OURS = "attn (default)"
JAX_NN = "jax.nn.dot_product_attention"
FLAX = "flax.linen.dot_product_attention"
BLOCKWISE, XLA = "attn (blockwise)", "attn (xla)"
BASELINE, MECHANISM = "baseline", "mechanism"
# The mechanisms' reference row: softmax attention built the same way.
SOFTMAX = "softmax"
GROWTH_FACTOR, GROWTH_LIMIT = 4, 5.0


def baselines(causal: bool) -> dict[str, Callable]:
  """Name -> attention(q, k, v): our softmax paths, jax.nn and flax."""

  def flax_attention(q, k, v):
    # flax's function takes a dense mask and needs K/V heads repeated to the query heads.
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    mask = nn.make_causal_mask(jnp.ones(q.shape[:2])) if causal else None
    return nn.dot_product_attention(q, k, v, mask=mask)

  impls = {
      OURS: lambda q, k, v: dot_product_attention(q, k, v, is_causal=causal),
      JAX_NN: lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal),
      FLAX: flax_attention,
  }
  for name in dict.fromkeys(("xla",) + tuple(_available())):
    impls[f"attn ({name})"] = (
        lambda q, k, v, name=name: dot_product_attention(q, k, v, is_causal=causal,
                                                         implementation=name))
  return {name: fn for name, fn in impls.items()
          if name in (OURS, JAX_NN) or not _IMPLS.value
          or any(part in name for part in _IMPLS.value)}


def mechanism_names() -> list[str]:
  """--mechanisms, checked against the registry (unknown: an error listing the valid ones)."""
  if common.MECHANISMS.value is None:
    return list(registry.names())
  return [registry.get(name, "--mechanisms").name for name in common.MECHANISMS.value if name]


def mechanism_layer(name: str, length: int, *, causal: bool, batch: int, heads: int,
                    kv_heads: int, head_dim: int, dtype: str,
                    seed: int = 0) -> tuple[Callable, tuple[Any, jax.Array], bool]:
  """(loss(params, x), (params, x), causal) for the registry entry `name` at length T.

  The layer is the model's (`attention_layer` from a ModelConfig with this mechanism): causal
  when asked and the entry has a causal form, or when it has no bidirectional one.
  """
  entry = registry.get(name)
  causal = (causal and entry.causal) or not entry.bidirectional
  options = {key: length for key in entry.options if key == "max_length"}
  config = ModelConfig(kind="lm" if causal else "classifier", d_model=heads * head_dim,
                       num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                       max_len=length, position="none", dtype=dtype, attention=name,
                       attention_options=options)
  layer = transformer.attention_layer(config, "attention", rope=False, mechanism=name,
                                      layer_index=0)
  x = jax.random.normal(jax.random.key(seed), (batch, length, heads * head_dim), dtype)
  params = jax.jit(layer.init)(jax.random.key(seed + 1), x)["params"]

  def apply(params, x):
    return layer.apply({"params": params}, x, is_causal=causal)

  return apply, (params, x), causal


def _available() -> tuple[str, ...]:
  from attn.ops import available_implementations
  return available_implementations()


def forward_and_backward(fn: Callable) -> Callable:
  """The gradient of a scalar of fn's output with respect to every argument."""

  def loss(*args):
    return jnp.sum(fn(*args).astype(jnp.float32) ** 2)

  return lambda *args: jax.grad(loss, argnums=tuple(range(len(args))))(*args)


def compile_once(fn: Callable, args) -> tuple[Callable, dict]:
  """Jit and compile; return the executable and XLA's memory and FLOP numbers."""
  compiled = jax.jit(fn).lower(*args).compile()
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  stats = {"temp_bytes": None, "peak_bytes": None,
           "flops": float(cost.get("flops", 0.0)) if cost else None}
  if memory is not None:
    stats["temp_bytes"] = int(memory.temp_size_in_bytes)
    stats["peak_bytes"] = int(memory.argument_size_in_bytes + memory.output_size_in_bytes
                              + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  return compiled, stats


def memory_budget() -> float:
  """--max_memory_gib in bytes, or 90% of the device's memory (half the host's on CPU)."""
  if _MAX_MEMORY.value:
    return _MAX_MEMORY.value * 2**30
  stats = jax.devices()[0].memory_stats() or {}
  if stats.get("bytes_limit"):
    return 0.9 * stats["bytes_limit"]
  return 0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# One timed sample is this long at least: back-to-back calls, one wait for the last.
SAMPLE_SECONDS = 0.01
MAX_CALLS_PER_SAMPLE = 64


def time_interleaved(calls: dict[str, Callable[[], Any]], min_reps: int,
                     min_seconds: float) -> dict[str, float]:
  """Median seconds per call of each zero-argument callable; they run in turn, one sample
  each per round.

  A sample is `n` back-to-back calls and one wait for the last, divided by `n`, with `n` from
  the warm-up so that a sample lasts >= SAMPLE_SECONDS: an accelerator runs the calls while the
  host dispatches the next ones, so a call shorter than the host's round trip is timed as
  device time, not as that round trip (on an H200, cuDNN's causal forward at T=4096, B=4, N=16,
  H=128: 0.92 ms one call at a time, 0.56 ms back to back). Calls longer than SAMPLE_SECONDS
  are timed one at a time.
  """
  if not calls:
    return {}
  repeats = {}
  for name, call in calls.items():
    jax.block_until_ready(call())  # warm up
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    once = time.perf_counter() - t0
    repeats[name] = max(1, min(MAX_CALLS_PER_SAMPLE, math.ceil(SAMPLE_SECONDS / max(once, 1e-9))))
  samples = {name: [] for name in calls}
  start = time.perf_counter()
  while (min(len(s) for s in samples.values()) < min_reps
         or time.perf_counter() - start < min_seconds):
    for name, call in calls.items():
      t0 = time.perf_counter()
      jax.block_until_ready([call() for _ in range(repeats[name])])
      samples[name].append((time.perf_counter() - t0) / repeats[name])
  return {name: statistics.median(s) for name, s in samples.items()}


def model_flops(length: int, mode: str) -> float:
  """Softmax attention's matmul FLOPs, 4 B T S N H forward, 2.5x that backward."""
  forward = 4.0 * _BATCH.value * length * length * _HEADS.value * _HEAD_DIM.value
  return forward if mode == "fwd" else 3.5 * forward


def _paths(length: int, skipped: list[dict]) -> list[tuple[str, str, str, Callable, tuple, bool]]:
  """(name, group, mode, fn, args, causal) of everything measured at this length; a mechanism
  that cannot be built goes to `skipped`."""
  kv_heads = _KV_HEADS.value or _HEADS.value
  dtype = jnp.dtype(_DTYPE.value)
  keys = jax.random.split(jax.random.key(length), 3)
  q = jax.random.normal(keys[0], (_BATCH.value, length, _HEADS.value, _HEAD_DIM.value), dtype)
  k = jax.random.normal(keys[1], (_BATCH.value, length, kv_heads, _HEAD_DIM.value), dtype)
  v = jax.random.normal(keys[2], (_BATCH.value, length, kv_heads, _HEAD_DIM.value), dtype)
  paths = []
  for mode, wrap in (("fwd", lambda f: f), ("fwd+bwd", forward_and_backward)):
    for name, fn in baselines(_CAUSAL.value).items():
      paths.append((name, BASELINE, mode, wrap(fn), (q, k, v), _CAUSAL.value))
  for name in mechanism_names():
    try:
      fn, args, causal = mechanism_layer(
          name, length, causal=_CAUSAL.value, batch=_BATCH.value, heads=_HEADS.value,
          kv_heads=kv_heads, head_dim=_HEAD_DIM.value, dtype=_DTYPE.value)
    except Exception as e:  # noqa: BLE001  (reported, the other paths still run)
      skipped.append({"length": length, "mode": "fwd+bwd", "implementation": name,
                      "reason": _error(e)})
      continue
    paths.append((name, MECHANISM, "fwd+bwd", forward_and_backward(fn), args, causal))
  return paths


def run_length(length: int, budget: float, skipped: list[dict]) -> list[dict]:
  """Every path at one sequence length; what does not fit or fails goes to `skipped`."""
  rows, calls = [], {}
  for name, group, mode, fn, args, causal in _paths(length, skipped):
    where = {"length": length, "mode": mode, "implementation": name}
    try:
      exe, stats = compile_once(fn, args)
      if stats["peak_bytes"] is not None and stats["peak_bytes"] > budget:
        skipped.append({**where, "reason": f"peak {stats['peak_bytes'] / 2**30:.1f} GiB > "
                        f"budget {budget / 2**30:.1f} GiB (--max_memory_gib)"})
        continue
      jax.block_until_ready(exe(*args))
    except Exception as e:  # noqa: BLE001  (an out-of-memory or unsupported path: reported)
      skipped.append({**where, "reason": _error(e)})
      continue
    calls[(name, mode)] = lambda exe=exe, args=args: exe(*args)
    rows.append({**where, "group": group, "causal": causal,
                 "model_flops": model_flops(length, mode) if group == BASELINE else None,
                 **stats})
  times = time_interleaved(calls, _MIN_REPS.value, _MIN_SECONDS.value)
  for row in rows:
    row["median_s"] = times[(row["implementation"], row["mode"])]
  for row in rows:
    reference = JAX_NN if row["group"] == BASELINE else SOFTMAX
    ref = times.get((reference, row["mode"]))
    row["ratio_vs_" + ("jax_nn" if row["group"] == BASELINE else "softmax")] = (
        row["median_s"] / ref if ref else None)
    row["model_gflops_per_s"] = (row["model_flops"] / row["median_s"] / 1e9
                                 if row["model_flops"] else None)
  for s in skipped:
    if s["length"] == length:
      print(f"skipped {s['implementation']} T={length} {s['mode']}: {s['reason']}")
  return rows


def _error(e: Exception) -> str:
  return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def _ratio(row: dict) -> float | None:
  return row.get("ratio_vs_jax_nn", row.get("ratio_vs_softmax"))


def print_table(rows: list[dict]) -> None:
  header = (f"{'T':>6} {'mode':>8} {'implementation / mechanism':<34} {'mask':>6} "
            f"{'median ms':>10} {'vs ref':>7} {'temp MiB':>9} {'peak MiB':>9} "
            f"{'XLA GFLOP':>9} {'model GFLOP/s':>13}")
  print("vs ref: baselines against jax.nn, mechanisms (layers) against the softmax layer.")
  print(header)
  print("-" * len(header))
  for r in rows:
    mib = {key: "n/a" if r.get(key) is None else f"{r[key] / 2**20:.1f}"
           for key in ("temp_bytes", "peak_bytes")}
    flops = "n/a" if not r.get("flops") else f"{r['flops'] / 1e9:.2f}"
    ratio = "n/a" if _ratio(r) is None else f"{_ratio(r):.3f}"
    rate = "n/a" if not r.get("model_gflops_per_s") else f"{r['model_gflops_per_s']:.1f}"
    mask = "causal" if r.get("causal", True) else "bidir"
    print(f"{r['length']:>6} {r['mode']:>8} {r['implementation']:<34} {mask:>6} "
          f"{r['median_s'] * 1e3:>10.2f} {ratio:>7} {mib['temp_bytes']:>9} "
          f"{mib['peak_bytes']:>9} {flops:>9} {rate:>13}")


def check_target(rows: list[dict], target: float) -> dict:
  """Worst ratio of our default path to jax.nn over every length and mode where both ran."""
  ours = [r for r in rows if r["implementation"] == OURS and r.get("ratio_vs_jax_nn")]
  if not ours:
    return {"target_ratio": target, "worst_ratio": None, "worst_at": None, "met": None}
  worst = max(ours, key=lambda r: r["ratio_vs_jax_nn"])
  return {"target_ratio": target, "worst_ratio": worst["ratio_vs_jax_nn"],
          "worst_at": {"length": worst["length"], "mode": worst["mode"]},
          "met": worst["ratio_vs_jax_nn"] <= target}


def _lookup(rows: list[dict], name: str, length: int, mode: str = "fwd+bwd") -> dict | None:
  return next((r for r in rows if (r["implementation"], r["length"], r["mode"])
               == (name, length, mode)), None)


def check_scaling(rows: list[dict]) -> dict:
  """The blockwise memory targets, where measured."""
  verdicts = {}
  blockwise, xla = _lookup(rows, BLOCKWISE, 8192), _lookup(rows, XLA, 8192)
  if blockwise and xla:
    ratio = blockwise["temp_bytes"] / xla["temp_bytes"]
    verdicts["blockwise_memory_vs_xla_at_8192"] = {"ratio": ratio, "met": ratio <= 1 / 8}
  short, long = _lookup(rows, BLOCKWISE, 4096), _lookup(rows, BLOCKWISE, 16384)
  if short and long:
    growth = long["temp_bytes"] / short["temp_bytes"]
    verdicts["blockwise_memory_growth_4096_to_16384"] = {"ratio": growth, "met": growth <= 5}
  return verdicts


def check_growth(rows: list[dict], from_length: int) -> dict:
  """Each recurrent mechanism's forward+backward time at 4T over T (T = from_length) <= 5:
  #18's check of Gated DeltaNet's chunkwise form (2048 -> 8192), and the same bound for every
  registry entry with decoding='recurrent'. `met` is None where a length was not measured."""
  verdicts = {}
  to_length = GROWTH_FACTOR * from_length
  for name in registry.names():
    if registry.get(name).decoding != "recurrent":
      continue
    short, long = _lookup(rows, name, from_length), _lookup(rows, name, to_length)
    ratio = long["median_s"] / short["median_s"] if short and long else None
    verdicts[f"{name}: fwd+bwd time, T {from_length} -> {to_length}"] = {
        "mechanism": name, "from_length": from_length, "to_length": to_length,
        "from_ms": short["median_s"] * 1e3 if short else None,
        "to_ms": long["median_s"] * 1e3 if long else None, "ratio": ratio,
        "target": GROWTH_LIMIT, "met": None if ratio is None else ratio <= GROWTH_LIMIT}
  return verdicts


def print_growth(verdicts: dict) -> None:
  """The growth verdicts as a table: PASS / FAIL / not measured."""
  print(f"\nRecurrent mechanisms, forward+backward time when T grows {GROWTH_FACTOR}x "
        f"(target <= {GROWTH_LIMIT:.1f}x):")
  print(f"{'mechanism':<16} {'from T':>7} {'ms':>9} {'to T':>7} {'ms':>9} {'growth':>7} verdict")
  for v in verdicts.values():
    cells = [f"{v[k]:>9.2f}" if v[k] is not None else f"{'-':>9}" for k in ("from_ms", "to_ms")]
    ratio = f"{v['ratio']:>7.2f}" if v["ratio"] is not None else f"{'-':>7}"
    verdict = {True: "PASS", False: "FAIL", None: "not measured"}[v["met"]]
    print(f"{v['mechanism']:<16} {v['from_length']:>7} {cells[0]} {v['to_length']:>7} "
          f"{cells[1]} {ratio} {verdict}")


# Our softmax paths; "best CPU path" is the fastest of them at each length.
SOFTMAX_PATHS = (OURS, XLA, BLOCKWISE)
CUDNN = "attn (cudnn)"


def check_speed(rows: list[dict], matmul_flops: float, *, causal: bool) -> dict:
  """The speed targets: our best path vs jax.nn from T = 2048 (<= 0.5x; the auto path's ratio
  is reported next to it), the fraction of the host's matmul rate it reaches (aim >= 35%,
  dense-equivalent model FLOPs as the issue counts them), and on a GPU cuDNN's forward rate
  (>= 400 TFLOP/s at T >= 4096, bf16, head_dim 128; causal counts half the dense FLOPs, the
  work a causal kernel does, as FlashAttention reports it)."""
  verdicts = {}
  best = []
  for length in sorted({r["length"] for r in rows if r["length"] >= 2048}):
    ours = [r for name in SOFTMAX_PATHS if (r := _lookup(rows, name, length))]
    reference = _lookup(rows, JAX_NN, length)
    if ours and reference:
      fastest = min(ours, key=lambda r: r["median_s"])
      auto = _lookup(rows, OURS, length)
      best.append({"length": length, "implementation": fastest["implementation"],
                   "auto_ratio_vs_jax_nn": auto["median_s"] / reference["median_s"]
                   if auto else None,
                   "ratio_vs_jax_nn": fastest["median_s"] / reference["median_s"],
                   "fraction_of_matmul_rate": fastest["model_gflops_per_s"] * 1e9
                   / matmul_flops,
                   "jax_nn_fraction_of_matmul_rate": reference["model_gflops_per_s"] * 1e9
                   / matmul_flops})
  if best:
    worst = max(best, key=lambda b: b["ratio_vs_jax_nn"])
    verdicts["best path vs jax.nn fwd+bwd, T >= 2048"] = {
        "ratio": worst["ratio_vs_jax_nn"], "at": worst["length"], "met": worst["ratio_vs_jax_nn"]
        <= 0.5, "per_length": best}
    low = min(best, key=lambda b: b["fraction_of_matmul_rate"])
    verdicts["best path fraction of matmul rate, T >= 2048"] = {
        "ratio": low["fraction_of_matmul_rate"], "at": low["length"],
        "met": low["fraction_of_matmul_rate"] >= 0.35, "matmul_flops": matmul_flops}
  cudnn = [r for r in rows if r["implementation"] == CUDNN and r["mode"] == "fwd"
           and r["length"] >= 4096]
  if cudnn:
    low = min(cudnn, key=lambda r: r["model_gflops_per_s"])
    tflops = low["model_gflops_per_s"] / 1e3 / (2 if causal else 1)
    verdicts["cudnn forward TFLOP/s, T >= 4096"] = {
        "ratio": tflops, "at": low["length"], "met": tflops >= 400, "causal_halved": causal}
  return verdicts


def plot(rows: list[dict], path: pathlib.Path) -> bool:
  """Log-log time (forward, forward+backward) and peak memory against T; False without
  matplotlib. Baselines solid (ours) or dotted (jax.nn, flax), mechanisms dashed."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return False
  fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
  panels = [("fwd", "median_s", "forward time (s)"),
            ("fwd+bwd", "median_s", "forward+backward time (s)"),
            ("fwd+bwd", "peak_bytes", "forward+backward peak memory (bytes, XLA)")]
  names = list(dict.fromkeys(r["implementation"] for r in rows))
  groups = {r["implementation"]: r.get("group", BASELINE) for r in rows}
  colors = {name: plt.cm.tab20(i % 20) for i, name in enumerate(names)}
  for ax, (mode, key, title) in zip(axes, panels, strict=True):
    for name in names:
      points = sorted((r["length"], r.get(key) or r.get("temp_bytes")) for r in rows
                      if r["implementation"] == name and r["mode"] == mode
                      and (r.get(key) or r.get("temp_bytes")))
      if points:
        style = "--" if groups[name] == MECHANISM else ("-" if name.startswith("attn") else ":")
        ax.plot(*zip(*points, strict=True), style, marker="o", markersize=3, label=name,
                color=colors[name])
    ax.set(xscale="log", yscale="log", xlabel="sequence length T", title=title)
    ax.grid(True, which="both", alpha=0.3)
  axes[1].legend(fontsize=6, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def measure() -> dict:
  """Every length; the result dict (rows, skipped, settings, machine)."""
  device = jax.devices()[0]
  budget = memory_budget()
  rows, skipped = [], []
  for length in map(int, _LENGTHS.value):
    rows.extend(run_length(length, budget, skipped))
    print(f"done T={length}", flush=True)
  return {
      "device": device.device_kind, "platform": device.platform, "jax": jax.__version__,
      "host": platform.processor() or platform.machine(),
      "settings": {"batch": _BATCH.value, "heads": _HEADS.value,
                   "kv_heads": _KV_HEADS.value or _HEADS.value, "head_dim": _HEAD_DIM.value,
                   "dtype": _DTYPE.value, "causal": _CAUSAL.value,
                   "mechanisms": mechanism_names(), "max_memory_bytes": budget,
                   "growth_from": _GROWTH_FROM.value, "quick": common.QUICK.value},
      "rows": rows, "skipped": skipped}


def main(argv: list[str]) -> None:
  del argv
  if common.QUICK.value:
    common.apply_quick(QUICK)
  if _ROWS_FROM.value:  # re-check an earlier run: its rows, settings, machine and matmul rate
    result = json.loads(pathlib.Path(_ROWS_FROM.value).read_text())
    rows = result["rows"]
    matmul_flops = result.get("matmul_flops") or metrics_lib.measure_matmul_flops()
  else:
    result = measure()
    rows = result["rows"]
    # Measured right after the timings, in the same conditions.
    matmul_flops = metrics_lib.measure_matmul_flops()
  print_table(rows)
  verdict = check_target(rows, _TARGET.value)
  if verdict["met"] is not None:
    print(f"\nTarget: ours / jax.nn <= {verdict['target_ratio']} at every length: "
          f"{'MET' if verdict['met'] else 'NOT MET'} (worst {verdict['worst_ratio']:.3f} at "
          f"T={verdict['worst_at']['length']} {verdict['worst_at']['mode']})")
  scaling = check_scaling(rows)
  scaling.update(check_speed(rows, matmul_flops, causal=result["settings"]["causal"]))
  for name, check in scaling.items():
    print(f"Target {name}: {check['ratio']:.3f} {'MET' if check['met'] else 'NOT MET'}")
  growth = check_growth(rows, result["settings"].get("growth_from", _GROWTH_FROM.value))
  print_growth(growth)
  result.update(matmul_flops=matmul_flops, target=verdict, scaling=scaling, growth=growth)
  if _ROWS_FROM.value and not common.OUT.value:
    out = pathlib.Path(_ROWS_FROM.value)
    out.write_text(json.dumps(result, indent=1) + "\n")
  else:
    out = common.write_json(result, "attention_quick" if common.QUICK.value else "attention")
  print(f"wrote {out}")
  png = out.with_suffix(".png")
  if plot(rows, png):
    print(f"wrote {png}")
  else:
    print("matplotlib is not installed (pip install -e .[notebooks]): no plot.")


if __name__ == "__main__":
  app.run(main)
