"""Decoding time per token against the context length: softmax's KV cache vs recurrent states.

  python -m experiments.benchmarks.decode [--contexts 256,512,...,16384]
      [--mechanisms softmax,linear,performer] [--d_model 256] [--num_layers 2]

For each context length C it builds a real decode-mode language model (`attn.models`, RoPE,
small width) per mechanism, fills its cache as if C tokens had been decoded (softmax: a KV
cache of C + headroom slots holding C keys and values; linear / performer: their recurrent
state S, z after C tokens), and times jitted single-token steps (the cache donated, as inside
`attn.decode.generate`'s loop): the median over interleaved rounds (the mechanisms take turns,
so machine noise hits them alike) of the mean time of back-to-back steps. The softmax step reads
every cached key, so its time grows with C; a recurrent step reads a state of fixed size.

It prints a table, writes JSON (and, when matplotlib is installed, a PNG of ms per token and
cache memory against C) to experiments/benchmarks/results/, and checks the target:
  - recurrent decoding's time per token is flat: max / min over C in [1024, 16384] <= 1.10,
    for linear and performer;
and reports where softmax's KV-cache step becomes slower than each recurrent step (the
crossover). Hardware: any; on this 2-core CPU the default run took ~11 minutes (under load).
"""

import platform
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from attn.layers import registry
from attn.models import ModelConfig, build
from experiments.benchmarks import common

_CONTEXTS = flags.DEFINE_list(
    "contexts", ["256", "512", "1024", "2048", "4096", "8192", "16384"],
    "Context lengths C (tokens already decoded).")
_MECHANISMS = flags.DEFINE_list("mechanisms", ["softmax", "linear", "performer"],
                                "model.attention values to compare.")
_D_MODEL = flags.DEFINE_integer("d_model", 256, "Model width.")
_NUM_HEADS = flags.DEFINE_integer("num_heads", 4, "Attention heads.")
_NUM_LAYERS = flags.DEFINE_integer("num_layers", 2, "Decoder layers.")
_ROUNDS = flags.DEFINE_integer("decode_rounds", 7, "Interleaved timing rounds per context.")
_STEPS = flags.DEFINE_integer("decode_steps", 20, "Back-to-back steps per timed sample.")
_FLAT = flags.DEFINE_float("flat_tolerance", 0.10, "Max relative spread of recurrent ms/token "
                           "over C in [1024, 16384].")

RECURRENT = ("linear", "performer")
FLAT_FROM, FLAT_TO = 1024, 16384


def model_config(mechanism: str, context: int, *, d_model: int, num_heads: int,
                 num_layers: int, headroom: int) -> ModelConfig:
  """A small LM; max_len (the KV cache's slots) is the context plus the timed steps."""
  return ModelConfig(kind="lm", vocab_size=256, d_model=d_model, num_heads=num_heads,
                     mlp_dim=2 * d_model, num_layers=num_layers, max_len=context + headroom,
                     position="rope", attention=mechanism)


def filled_cache(decoder: Any, batch: int, max_len: int, context: int, seed: int = 0) -> Any:
  """The decode cache as after `context` tokens: random keys / values / sums, indices = C.

  Timing does not depend on the values, only on their sizes (the normalizer sums z are kept
  positive so that no step divides by ~0)."""
  shapes = jax.eval_shape(decoder.init, jax.random.key(0),
                          jnp.zeros((batch, max_len), jnp.int32))["cache"]
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    if jnp.issubdtype(leaf.dtype, jnp.integer):
      return jnp.full(leaf.shape, context, leaf.dtype)
    x = rng.normal(size=leaf.shape)
    if jax.tree_util.keystr(path).endswith("['z']"):
      x = np.abs(x) + 1.0
    return jnp.asarray(x, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def stepper(mechanism: str, context: int, *, batch: int, headroom: int, **sizes: Any):
  """(jitted step(cache, token, position) -> (logits, cache) with the cache donated, cache)."""
  config = model_config(mechanism, context, headroom=headroom, **sizes)
  model = build(config)
  decoder = model.clone(decode=True)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((batch, 8), jnp.int32))["params"]

  def step(params, cache, token, position):
    logits, state = decoder.apply({"params": params, "cache": cache}, token,
                                  positions=position, mutable=["cache"])
    return logits, state["cache"]

  donated = jax.jit(step, donate_argnums=(1,))
  cache = filled_cache(decoder, batch, config.max_len, context)
  return (lambda cache, token, position: donated(params, cache, token, position)), cache


def cache_bytes(cache: Any) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))


def time_all(contexts: list[int], mechanisms: list[str], *, batch: int = 1, rounds: int,
             steps: int, **sizes: Any) -> list[dict]:
  """Median ms per token of every (mechanism, context); each round visits all of them in turn,
  so machine noise hits every context alike (the flatness target compares contexts)."""
  runners, caches, rows = {}, {}, {}
  headroom = steps * (rounds + 1) + 8
  for context in contexts:
    for name in mechanisms:
      key = (name, context)
      if name in RECURRENT and (name, contexts[0]) in runners:
        # Its step and state do not depend on C (only the state's values do): one compiled
        # step, a state filled for this context.
        runners[key] = runners[(name, contexts[0])]
        model = model_config(name, context, headroom=headroom, **sizes)
        caches[key] = filled_cache(build(model).clone(decode=True), batch, model.max_len,
                                   context)
      else:
        runners[key], caches[key] = stepper(name, context, batch=batch, headroom=headroom,
                                            **sizes)
      rows[key] = {"mechanism": name, "context": context, "cache_bytes": cache_bytes(
          caches[key]), "decoding": registry.get(name).decoding, "ms_samples": []}
      _, caches[key] = jax.block_until_ready(runners[key](caches[key], *_inputs(batch,
                                                                                context)))
    print(f"compiled C={context}", flush=True)
  for _ in range(rounds):
    for key, run in runners.items():
      token, position = _inputs(batch, key[1])
      t0 = time.perf_counter()
      for _ in range(steps):
        logits, caches[key] = run(caches[key], token, position)
      jax.block_until_ready(logits)
      rows[key]["ms_samples"].append(1e3 * (time.perf_counter() - t0) / steps)
  for row in rows.values():
    row["ms_per_token"] = statistics.median(row["ms_samples"])
  return list(rows.values())


def _inputs(batch: int, context: int) -> tuple[jax.Array, jax.Array]:
  """The next token and its position (the context's length)."""
  return jnp.ones((batch, 1), jnp.int32), jnp.full((batch, 1), context, jnp.int32)


def check_targets(rows: list[dict], tolerance: float) -> dict:
  """Recurrent flatness over [FLAT_FROM, FLAT_TO] and the softmax crossover, where measured."""
  verdicts = {}
  for name in sorted({r["mechanism"] for r in rows if r["mechanism"] in RECURRENT}):
    times = {r["context"]: r["ms_per_token"] for r in rows if r["mechanism"] == name}
    span = [t for c, t in times.items() if FLAT_FROM <= c <= FLAT_TO]
    if FLAT_FROM in times and FLAT_TO in times:
      spread = max(span) / min(span)
      verdicts[f"{name}: ms/token max/min, C {FLAT_FROM}-{FLAT_TO}"] = {
          "ratio": spread, "target": 1.0 + tolerance, "met": spread <= 1.0 + tolerance}
    softmax = {r["context"]: r["ms_per_token"] for r in rows if r["mechanism"] == "softmax"}
    slower = sorted(c for c in times if c in softmax and softmax[c] > times[c])
    verdicts[f"{name}: softmax slower from C"] = {"context": slower[0] if slower else None}
  return verdicts


def print_table(rows: list[dict]) -> None:
  names = list(dict.fromkeys(r["mechanism"] for r in rows))
  header = f"{'C':>6} " + " ".join(f"{n + ' ms':>14} {'cache MiB':>9}" for n in names)
  print(header)
  print("-" * len(header))
  for context in sorted({r["context"] for r in rows}):
    cells = []
    for name in names:
      r = next(r for r in rows if (r["mechanism"], r["context"]) == (name, context))
      cells.append(f"{r['ms_per_token']:>14.3f} {r['cache_bytes'] / 2**20:>9.2f}")
    print(f"{context:>6} " + " ".join(cells))


def plot(rows: list[dict], path) -> bool:
  """ms per token and cache memory against the context; False without matplotlib."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return False
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  for name in dict.fromkeys(r["mechanism"] for r in rows):
    points = sorted((r["context"], r["ms_per_token"], r["cache_bytes"] / 2**20) for r in rows
                    if r["mechanism"] == name)
    contexts, ms, mib = zip(*points, strict=True)
    axes[0].plot(contexts, ms, marker="o", label=name)
    axes[1].plot(contexts, mib, marker="o", label=name)
  axes[0].set(xscale="log", yscale="log", xlabel="context C (tokens)", ylabel="ms per token",
              title="decoding step time")
  axes[1].set(xscale="log", yscale="log", xlabel="context C (tokens)", ylabel="MiB",
              title="cache / state memory")
  for ax in axes:
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def benchmark(contexts: list[int], mechanisms: list[str], *, rounds: int, steps: int,
              tolerance: float, **sizes: Any) -> dict:
  """Every mechanism at every context; the result dict (rows, settings, verdicts)."""
  rows = time_all(contexts, mechanisms, rounds=rounds, steps=steps, **sizes)
  device = jax.devices()[0]
  return {"device": device.device_kind, "platform": device.platform, "jax": jax.__version__,
          "host": platform.processor() or platform.machine(),
          "settings": dict(sizes, rounds=rounds, steps=steps, batch=1, position="rope",
                           vocab_size=256),
          "rows": rows, "targets": check_targets(rows, tolerance)}


def main(argv: list[str]) -> None:
  del argv
  result = benchmark(list(map(int, _CONTEXTS.value)), _MECHANISMS.value,
                     rounds=_ROUNDS.value, steps=_STEPS.value, tolerance=_FLAT.value,
                     d_model=_D_MODEL.value, num_heads=_NUM_HEADS.value,
                     num_layers=_NUM_LAYERS.value)
  print_table(result["rows"])
  for name, check in result["targets"].items():
    if "met" in check:
      print(f"Target {name} <= {check['target']:.2f}: {check['ratio']:.3f} "
            f"{'PASS' if check['met'] else 'FAIL'}")
    else:
      print(f"{name}: {check['context']}")
  out = common.write_json(result, "decode")
  print(f"wrote {out}")
  png = out.with_suffix(".png")
  if plot(result["rows"], png):
    print(f"wrote {png}")
  else:
    print("matplotlib is not installed (pip install -e .[notebooks]): no plot.")


if __name__ == "__main__":
  app.run(main)
