"""Attention speed and memory: our implementations and mechanisms against jax.nn and flax.

  python -m experiments.benchmarks.attention [--lengths 256,512,...] [--causal] [--dtype float32]
      [--implementations blockwise,linear] [--max_quadratic_length 8192]

For each sequence length it measures the forward and the forward+backward pass of every
implementation, jitted: the median wall time over interleaved repetitions (the implementations
take turns, so machine noise hits them alike; short calls are timed back to back, see
`time_interleaved`), the compiled temporary memory from XLA's memory
analysis (deterministic), XLA's FLOP count (a loop body is counted once, so it undercounts the
blockwise and chunked paths) and the model FLOPs of softmax attention (4 B T S N H forward, 2.5x
that backward, masked blocks included) with the rate they imply. Paths that form the T x S
matrix are skipped past --max_quadratic_length.

It prints a table, writes JSON (and, when matplotlib is installed, a log-log PNG of time and
memory against T: the `notebooks` extra has it) to experiments/benchmarks/results/, and checks
the targets:
  - our default path (implementation=None) is no slower than jax.nn.dot_product_attention
    (ratio <= 1.05) at every length, forward and forward+backward;
  - blockwise temporary memory at T=8192 is <= 1/8 of the xla path's, and grows <= 5x from
    T=4096 to T=16384 (forward+backward);
  - the linear-time mechanisms (Gated DeltaNet's chunkwise form among them) take <= 5x the
    time when T grows 4x from T >= 1024 (forward+backward);
  - from T = 2048 our fastest softmax path takes <= 0.5x jax.nn's forward+backward time, and
    reaches >= 35% of this host's measured float32 matmul rate (model FLOPs);
  - on an NVIDIA GPU, the cudnn path's forward reaches >= 400 TFLOP/s from T = 4096 (run it
    with --dtype bfloat16 --head_dim 128).
`--rows_from results/attention_cpu.json` re-checks and re-plots an earlier run without
measuring.
Hardware: any; on this 2-core CPU the default lengths take ~20 minutes.
"""

import json
import math
import pathlib
import platform
import statistics
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import app, flags

from attn.ops import (
    differential,
    dot_product_attention,
    gated,
    gated_deltanet,
    linear,
    mla,
    sparse,
    variants,
)
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
_IMPLS = flags.DEFINE_list("implementations", [], "Only these (substring match; the default "
                           "path and jax.nn always run). Empty = all.")
_MAX_QUADRATIC = flags.DEFINE_integer("max_quadratic_length", 8192,
                                      "Longest T for paths that form the T x S matrix.")
_MIN_REPS = flags.DEFINE_integer("min_reps", 5, "Minimum timed repetitions per implementation.")
_MIN_SECONDS = flags.DEFINE_float("min_seconds", 2.0, "Keep repeating until this much time.")
_TARGET = flags.DEFINE_float("target_ratio", 1.05, "Max time ratio ours / jax.nn.")
_ROWS_FROM = flags.DEFINE_string("rows_from", "", "Measure nothing: re-check the targets and "
                                 "re-plot the rows of this earlier JSON.")

OURS = "attn (default)"
JAX_NN = "jax.nn.dot_product_attention"
FLAX = "flax.linen.dot_product_attention"
BLOCKWISE, XLA = "attn (blockwise)", "attn (xla)"
# Mechanisms whose time and memory are linear in T (checked: T x4 -> time <= x5).
GATED_DELTANET = "gated_deltanet (chunk 64, causal)"
LINEAR_TIME = ("linear (elu+1)", "performer (M=256)", "linformer (P=256, bidirectional)",
               GATED_DELTANET)
# Paths that materialize a T x S array; skipped past --max_quadratic_length.
QUADRATIC = (JAX_NN, FLAX, XLA, "sigmoid", "sinks", "bigbird (dense mask)",
             "differential (N/2 heads of 2 maps)", "gated (elementwise)", "mla (expanded)",
             "mla (absorbed)")


def implementations(causal: bool, length: int, head_dim: int) -> dict[str, Callable]:
  """Name -> attention(q, k, v) for every path under test at this length."""

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
  projection = linear.orthogonal_random_features(jax.random.key(0), 256, head_dim)
  linformer_e = jax.random.normal(jax.random.key(1), (256, length)) * length**-0.5
  bigbird = sparse.bigbird_mask(length, length, block_size=64) if length <= _MAX_QUADRATIC.value \
      else None
  impls.update({
      "linear (elu+1)": lambda q, k, v: linear.linear_attention(q, k, v, is_causal=causal),
      "performer (M=256)": lambda q, k, v: linear.performer_attention(
          q, k, v, projection, is_causal=causal),
      "linformer (P=256, bidirectional)": lambda q, k, v: variants.linformer_attention(
          q, k, v, linformer_e),
      "cosine": lambda q, k, v: variants.cosine_attention(q, k, v, is_causal=causal),
      "sigmoid": lambda q, k, v: variants.sigmoid_attention(q, k, v, is_causal=causal),
      "sinks": lambda q, k, v: variants.sink_attention(q, k, v, jnp.zeros(q.shape[2]),
                                                       is_causal=causal),
      "bigbird (dense mask)": lambda q, k, v: dot_product_attention(q, k, v, mask=bigbird,
                                                                    is_causal=causal),
  })
  impls.update(new_mechanisms(causal))
  keep = {name: fn for name, fn in impls.items()
          if name in (OURS, JAX_NN) or not _IMPLS.value
          or any(part in name for part in _IMPLS.value)}
  if length > _MAX_QUADRATIC.value:
    keep = {name: fn for name, fn in keep.items() if name not in QUADRATIC}
  return keep


def new_mechanisms(causal: bool) -> dict[str, Callable]:
  """Gated DeltaNet, differential, gated and MLA attention at the same q, k, v sizes.

  Gated DeltaNet is always causal (a recurrence); its decay and write strength are constants
  (their cost is the layer's projections, not the op's). Differential attention splits the
  heads in pairs (N/2 heads of two maps and a 2H value, as the paper matches parameters); the
  gate is computed from the queries; MLA's latent is the first key head (Dc = H), its rotary
  part 16 channels of the first value head, with fixed random up-projections.
  """

  def deltanet(q, k, v):
    beta = jnp.full(q.shape[:3], 0.5, jnp.float32)
    return gated_deltanet.gated_delta_rule(q, k, v, beta, jnp.full_like(beta, -0.05),
                                           chunk_size=64, scale=q.shape[-1]**-0.5)

  def diff(q, k, v):
    b, t, n, h = q.shape
    s, kv = k.shape[1], k.shape[2]
    out = differential.differential_attention(
        q.reshape(b, t, n // 2, 2, h), k.reshape(b, s, kv // 2, 2, h),
        v.reshape(b, s, kv // 2, 2 * h), 0.5, lambda_init=0.5, is_causal=causal)
    return out.reshape(b, t, n, h)

  def latent(q, k, v, absorb):
    heads, dim = q.shape[2], q.shape[3]
    w_uk, w_uv = (jax.random.normal(jax.random.key(i), (dim, heads, dim), q.dtype) * dim**-0.5
                  for i in (2, 3))
    return mla.mla_attention(q[..., :-16], q[..., -16:], k[:, :, 0], v[:, :, 0, :16],
                             w_uk[..., :-16], w_uv, absorb=absorb, is_causal=causal)

  return {
      GATED_DELTANET: deltanet,
      "differential (N/2 heads of 2 maps)": diff,
      "gated (elementwise)": lambda q, k, v: gated.gated_attention(q, k, v, q,
                                                                   is_causal=causal),
      "mla (expanded)": lambda q, k, v: latent(q, k, v, absorb=False),
      "mla (absorbed)": lambda q, k, v: latent(q, k, v, absorb=True),
  }


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


# One timed sample is this long at least: back-to-back calls, one wait for the last.
SAMPLE_SECONDS = 0.01
MAX_CALLS_PER_SAMPLE = 64


def time_interleaved(executables: dict[str, Callable], args, min_reps: int,
                     min_seconds: float) -> dict[str, float]:
  """Median seconds per call; the executables run in turn, one sample each per round.

  A sample is `calls` back-to-back calls and one wait for the last, divided by `calls`, with
  `calls` from the warm-up so that a sample lasts >= SAMPLE_SECONDS: an accelerator runs the
  calls while the host dispatches the next ones, so a call shorter than the host's round trip
  is timed as device time, not as that round trip (on an H200, cuDNN's causal forward at
  T=4096, B=4, N=16, H=128: 0.92 ms one call at a time, 0.56 ms back to back). Calls longer
  than SAMPLE_SECONDS are timed one at a time, as before.
  """
  calls = {}
  for name, exe in executables.items():
    jax.block_until_ready(exe(*args))  # warm up
    t0 = time.perf_counter()
    jax.block_until_ready(exe(*args))
    once = time.perf_counter() - t0
    calls[name] = max(1, min(MAX_CALLS_PER_SAMPLE, math.ceil(SAMPLE_SECONDS / max(once, 1e-9))))
  samples = {name: [] for name in executables}
  start = time.perf_counter()
  while (min(len(s) for s in samples.values()) < min_reps
         or time.perf_counter() - start < min_seconds):
    for name, exe in executables.items():
      t0 = time.perf_counter()
      jax.block_until_ready([exe(*args) for _ in range(calls[name])])
      samples[name].append((time.perf_counter() - t0) / calls[name])
  return {name: statistics.median(s) for name, s in samples.items()}


def model_flops(length: int, mode: str) -> float:
  """Softmax attention's matmul FLOPs, 4 B T S N H forward and 2.5x that backward."""
  forward = 4.0 * _BATCH.value * length * length * _HEADS.value * _HEAD_DIM.value
  return forward if mode == "fwd" else 3.5 * forward


def run_length(length: int) -> list[dict]:
  """Every implementation at one sequence length, forward and forward+backward."""
  impls = implementations(_CAUSAL.value, length, _HEAD_DIM.value)
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
                   "median_s": times[name],
                   "ratio_vs_jax_nn": times[name] / times[JAX_NN] if JAX_NN in times else None,
                   "model_flops": model_flops(length, mode),
                   "model_gflops_per_s": model_flops(length, mode) / times[name] / 1e9,
                   **stats[name]})
  return rows


def print_table(rows: list[dict]) -> None:
  header = (f"{'T':>6} {'mode':>8} {'implementation':<34} {'median ms':>10} {'vs jax.nn':>9} "
            f"{'temp MiB':>9} {'XLA GFLOP':>9} {'model GFLOP/s':>13}")
  print(header)
  print("-" * len(header))
  for r in rows:
    mem = "n/a" if r["temp_bytes"] is None else f"{r['temp_bytes'] / 2**20:.1f}"
    flops = "n/a" if not r["flops"] else f"{r['flops'] / 1e9:.2f}"
    ratio = "n/a" if r["ratio_vs_jax_nn"] is None else f"{r['ratio_vs_jax_nn']:.3f}"
    print(f"{r['length']:>6} {r['mode']:>8} {r['implementation']:<34} "
          f"{r['median_s'] * 1e3:>10.2f} {ratio:>9} {mem:>9} {flops:>9} "
          f"{r['model_gflops_per_s']:>13.1f}")


def check_target(rows: list[dict], target: float) -> dict:
  """Worst ratio of our default path to jax.nn over every length and mode where both ran."""
  ours = [r for r in rows if r["implementation"] == OURS and r["ratio_vs_jax_nn"] is not None]
  worst = max(ours, key=lambda r: r["ratio_vs_jax_nn"])
  return {"target_ratio": target, "worst_ratio": worst["ratio_vs_jax_nn"],
          "worst_at": {"length": worst["length"], "mode": worst["mode"]},
          "met": worst["ratio_vs_jax_nn"] <= target}


def _lookup(rows: list[dict], name: str, length: int, mode: str = "fwd+bwd") -> dict | None:
  return next((r for r in rows if (r["implementation"], r["length"], r["mode"])
               == (name, length, mode)), None)


def check_scaling(rows: list[dict]) -> dict:
  """The blockwise memory targets and the linear mechanisms' time growth, where measured."""
  verdicts = {}
  blockwise, xla = _lookup(rows, BLOCKWISE, 8192), _lookup(rows, XLA, 8192)
  if blockwise and xla:
    ratio = blockwise["temp_bytes"] / xla["temp_bytes"]
    verdicts["blockwise_memory_vs_xla_at_8192"] = {"ratio": ratio, "met": ratio <= 1 / 8}
  short, long = _lookup(rows, BLOCKWISE, 4096), _lookup(rows, BLOCKWISE, 16384)
  if short and long:
    growth = long["temp_bytes"] / short["temp_bytes"]
    verdicts["blockwise_memory_growth_4096_to_16384"] = {"ratio": growth, "met": growth <= 5}
  lengths = sorted({r["length"] for r in rows})
  for name in LINEAR_TIME:
    growths = [(t, _lookup(rows, name, 4 * t)["median_s"] / _lookup(rows, name, t)["median_s"])
               for t in lengths if t >= 1024 and _lookup(rows, name, t)
               and _lookup(rows, name, 4 * t)]
    if growths:
      worst = max(growths, key=lambda g: g[1])
      verdicts[f"{name}: time x4 T"] = {"ratio": worst[1], "from_length": worst[0],
                                        "met": worst[1] <= 5}
  return verdicts


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
  """Log-log time (forward, forward+backward) and memory against T; False without matplotlib."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return False
  fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
  panels = [("fwd", "median_s", "forward time (s)"), ("fwd+bwd", "median_s",
                                                      "forward+backward time (s)"),
            ("fwd+bwd", "temp_bytes", "forward+backward temp memory (bytes)")]
  names = list(dict.fromkeys(r["implementation"] for r in rows))
  colors = {name: plt.cm.tab20(i % 20) for i, name in enumerate(names)}
  for ax, (mode, key, title) in zip(axes, panels, strict=True):
    for name in names:
      points = sorted((r["length"], r[key]) for r in rows
                      if r["implementation"] == name and r["mode"] == mode and r[key])
      if points:
        style = "-" if name.startswith("attn") else ("--" if name in QUADRATIC else ":")
        ax.plot(*zip(*points, strict=True), style, marker="o", markersize=3, label=name,
                color=colors[name])
    ax.set(xscale="log", yscale="log", xlabel="sequence length T", title=title)
    ax.grid(True, which="both", alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def main(argv: list[str]) -> None:
  del argv
  device = jax.devices()[0]
  if _ROWS_FROM.value:  # re-check an earlier run: its rows, settings, machine and matmul rate
    result = json.loads(pathlib.Path(_ROWS_FROM.value).read_text())
    rows = result["rows"]
    matmul_flops = result.get("matmul_flops") or metrics_lib.measure_matmul_flops()
  else:
    rows = []
    for length in map(int, _LENGTHS.value):
      rows.extend(run_length(length))
      print(f"done T={length}", flush=True)
    # Measured right after the timings, in the same conditions.
    matmul_flops = metrics_lib.measure_matmul_flops()
    result = {
        "device": device.device_kind, "platform": device.platform, "jax": jax.__version__,
        "host": platform.processor() or platform.machine(),
        "settings": {"batch": _BATCH.value, "heads": _HEADS.value,
                     "kv_heads": _KV_HEADS.value or _HEADS.value, "head_dim": _HEAD_DIM.value,
                     "dtype": _DTYPE.value, "causal": _CAUSAL.value},
        "rows": rows}
  print_table(rows)
  verdict = check_target(rows, _TARGET.value)
  print(f"\nTarget: ours / jax.nn <= {verdict['target_ratio']} at every length: "
        f"{'MET' if verdict['met'] else 'NOT MET'} (worst {verdict['worst_ratio']:.3f} at "
        f"T={verdict['worst_at']['length']} {verdict['worst_at']['mode']})")
  scaling = check_scaling(rows)
  scaling.update(check_speed(rows, matmul_flops, causal=result["settings"]["causal"]))
  for name, check in scaling.items():
    print(f"Target {name}: {check['ratio']:.3f} {'MET' if check['met'] else 'NOT MET'}")
  result.update(matmul_flops=matmul_flops, target=verdict, scaling=scaling)
  if _ROWS_FROM.value and not common.OUT.value:
    out = pathlib.Path(_ROWS_FROM.value)
    out.write_text(json.dumps(result, indent=1) + "\n")
  else:
    out = common.write_json(result, "attention")
  print(f"wrote {out}")
  png = out.with_suffix(".png")
  if plot(rows, png):
    print(f"wrote {png}")
  else:
    print("matplotlib is not installed (pip install -e .[notebooks]): no plot.")


if __name__ == "__main__":
  app.run(main)
