"""Decoding time per token against the context length, for every mechanism that decodes.

  python -m experiments.benchmarks.decode --quick       # smoke run: C = 128, 512 (~3 min CPU)
  python -m experiments.benchmarks.decode               # C = 256 ... 16384 (`make bench-decode`)
  # GPU (JAX_PLATFORMS unset or cuda; writes results/decode_<device>.json and .png):
  # (100 s on one H200: results/decode_nvidia_h200.json; each added context ~40 s)
  python -m experiments.benchmarks.decode --contexts 1024,16384 --decode_rounds 5 \
      --decode_steps 64

The mechanisms are the registry's causal decoders (`attn/layers/registry.py`: every entry with
a causal form and decoding 'kv_cache', 'window_cache' or 'recurrent'; `--mechanisms` picks
some). For each context length C it builds a real decode-mode language model (`attn.models`,
RoPE, small width) per mechanism, fills its cache as if C tokens had been decoded (a KV cache of
C + headroom slots holding C keys and values; a window's ring buffer; a recurrent state S, z
after C tokens: random values, the indices at C) and times `--decode_steps` greedy steps run
back to back inside one jitted `lax.fori_loop` (as `attn.decode.generate` runs its loop; the
cache donated), with `block_until_ready` on the inputs before the clock starts and on the
returned token and cache before it stops: on a GPU that is device time for the steps plus one
dispatch, not the host's time to launch each step. One untimed round first (clocks ramp
up), then the median over interleaved rounds (the mechanisms take turns, so machine noise hits
them alike). A KV-cache step reads every cached
key, so its time grows with C; a window or a recurrent state has a fixed size.

It prints a table, writes JSON (and, with matplotlib, a PNG of ms per token and cache memory
against C) to experiments/benchmarks/results/decode_<device>.json (--quick:
decode_quick_<device>.json; --out overrides), and checks:
  - every recurrent entry (decoding='recurrent': linear, performer, gated_deltanet) has a flat
    time per token: max / min over C in [--flat_from, --flat_to] = [1024, 16384] <= 1.10
    (PASS / FAIL, "targets" in the JSON);
  - where softmax's KV-cache step becomes slower than each recurrent step (the crossover);
  - MLA's cache bytes per token and layer against MHA's and GQA's (--gqa_kv_heads) at the same
    width, measured from the models' real caches (the growth of the cache's bytes with
    max_len) and compared with `attn.ops.mla`'s formulas ("cache_bytes_per_token").
Hardware: any; on this 2-core CPU the default run takes ~30 minutes.
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
from attn.ops import mla as mla_ops
from experiments.benchmarks import common

_CONTEXTS = flags.DEFINE_list(
    "contexts", ["256", "512", "1024", "2048", "4096", "8192", "16384"],
    "Context lengths C (tokens already decoded).")
_D_MODEL = flags.DEFINE_integer("d_model", 256, "Model width.")
_NUM_HEADS = flags.DEFINE_integer("num_heads", 4, "Attention heads.")
_NUM_LAYERS = flags.DEFINE_integer("num_layers", 2, "Decoder layers.")
_GQA_KV_HEADS = flags.DEFINE_integer("gqa_kv_heads", 0, "GQA's key/value heads in the cache "
                                     "comparison (0 = num_heads / 2).")
_ROUNDS = flags.DEFINE_integer("decode_rounds", 7, "Interleaved timing rounds per context.")
_STEPS = flags.DEFINE_integer("decode_steps", 20, "Back-to-back steps per timed sample.")
_FLAT = flags.DEFINE_float("flat_tolerance", 0.10, "Max relative spread of recurrent ms/token "
                           "over C in [--flat_from, --flat_to].")
_FLAT_FROM = flags.DEFINE_integer("flat_from", 1024, "Flatness check: shortest context.")
_FLAT_TO = flags.DEFINE_integer("flat_to", 16384, "Flatness check: longest context.")

# --quick (smoke run; --mechanisms default: every causal decoder of the registry).
QUICK = {"contexts": ["128", "512"], "flat_from": 128, "flat_to": 512, "decode_rounds": 2,
         "decode_steps": 4}


def default_mechanisms() -> list[str]:
  """Every registry entry that decodes causally (kv_cache, window_cache, recurrent)."""
  return [name for name, m in registry.mechanisms().items() if m.decoding and m.causal]


def recurrent(name: str) -> bool:
  return registry.get(name).decoding == "recurrent"


def model_config(mechanism: str, context: int, *, d_model: int, num_heads: int,
                 num_layers: int, headroom: int, num_kv_heads: int | None = None) -> ModelConfig:
  """A small LM; max_len (the KV cache's slots) is the context plus the timed steps."""
  return ModelConfig(kind="lm", vocab_size=256, d_model=d_model, num_heads=num_heads,
                     num_kv_heads=num_kv_heads, mlp_dim=2 * d_model, num_layers=num_layers,
                     max_len=context + headroom, position="rope", attention=mechanism)


def cache_shapes(config: ModelConfig, batch: int = 1) -> Any:
  """The decode cache's shapes and dtypes (nothing computed)."""
  decoder = build(config).clone(decode=True)
  return jax.eval_shape(decoder.init, jax.random.key(0),
                        jnp.zeros((batch, config.max_len), jnp.int32))["cache"]


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


def stepper(mechanism: str, context: int, *, batch: int, headroom: int, steps: int,
            **sizes: Any):
  """(jitted run(cache, token, position) -> (last token, cache): `steps` greedy steps in one
  `lax.fori_loop`, the cache donated; the cache filled for C)."""
  config = model_config(mechanism, context, headroom=headroom, **sizes)
  model = build(config)
  decoder = model.clone(decode=True)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((batch, 8), jnp.int32))["params"]

  def run(params, cache, token, position):
    def body(i, carry):
      cache, token = carry
      logits, state = decoder.apply({"params": params, "cache": cache}, token,
                                    positions=position + i, mutable=["cache"])
      return state["cache"], jnp.argmax(logits[:, -1:], axis=-1).astype(token.dtype)

    cache, token = jax.lax.fori_loop(0, steps, body, (cache, token))
    return token, cache

  donated = jax.jit(run, donate_argnums=(1,))
  cache = filled_cache(decoder, batch, config.max_len, context)
  return (lambda cache, token, position: donated(params, cache, token, position)), cache


def cache_bytes(cache: Any) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))


def time_all(contexts: list[int], mechanisms: list[str], *, batch: int = 1, rounds: int,
             steps: int, **sizes: Any) -> list[dict]:
  """Median ms per token of every (mechanism, context); each round visits all of them in turn,
  so machine noise hits every context alike (the flatness target compares contexts)."""
  runners, caches, rows, positions = {}, {}, {}, {}
  headroom = steps * (rounds + 2) + 8  # the compiling call, one untimed round, the rounds
  for context in contexts:
    for name in mechanisms:
      key = (name, context)
      if recurrent(name) and (name, contexts[0]) in runners:
        # Its step and state do not depend on C (only the state's values do): one compiled
        # step, a state filled for this context.
        runners[key] = runners[(name, contexts[0])]
        model = model_config(name, context, headroom=headroom, **sizes)
        caches[key] = filled_cache(build(model).clone(decode=True), batch, model.max_len,
                                   context)
      else:
        runners[key], caches[key] = stepper(name, context, batch=batch, headroom=headroom,
                                            steps=steps, **sizes)
      rows[key] = {"mechanism": name, "context": context, "cache_bytes": cache_bytes(
          caches[key]), "decoding": registry.get(name).decoding, "ms_samples": []}
      positions[key] = context
      _, caches[key] = jax.block_until_ready(runners[key](caches[key], *_inputs(
          batch, positions[key])))  # compiles, warms up
      positions[key] += steps
    print(f"compiled C={context}", flush=True)
  for timed in [False] + [True] * rounds:  # an untimed round first: clocks ramp up, caches warm
    for key, run in runners.items():
      inputs = jax.block_until_ready((caches[key], *_inputs(batch, positions[key])))
      t0 = time.perf_counter()
      token, caches[key] = run(*inputs)
      jax.block_until_ready((token, caches[key]))
      if timed:
        rows[key]["ms_samples"].append(1e3 * (time.perf_counter() - t0) / steps)
      positions[key] += steps
  for row in rows.values():
    row["ms_per_token"] = statistics.median(row["ms_samples"])
  return list(rows.values())


def _inputs(batch: int, position: int) -> tuple[jax.Array, jax.Array]:
  """The next token and its position."""
  return jnp.ones((batch, 1), jnp.int32), jnp.full((batch, 1), position, jnp.int32)


def check_targets(rows: list[dict], tolerance: float, flat_from: int = 1024,
                  flat_to: int = 16384) -> dict:
  """Recurrent flatness over [flat_from, flat_to] and the softmax crossover, where measured."""
  verdicts = {}
  for name in dict.fromkeys(r["mechanism"] for r in rows):
    if not recurrent(name):
      continue
    times = {r["context"]: r["ms_per_token"] for r in rows if r["mechanism"] == name}
    span = [t for c, t in times.items() if flat_from <= c <= flat_to]
    key = f"{name}: ms/token max/min, C {flat_from}-{flat_to}"
    if flat_from in times and flat_to in times:
      spread = max(span) / min(span)
      verdicts[key] = {"ratio": spread, "target": 1.0 + tolerance,
                       "met": spread <= 1.0 + tolerance}
    else:
      verdicts[key] = {"ratio": None, "target": 1.0 + tolerance, "met": None}
    softmax = {r["context"]: r["ms_per_token"] for r in rows if r["mechanism"] == "softmax"}
    slower = sorted(c for c in times if c in softmax and softmax[c] > times[c])
    verdicts[f"{name}: softmax slower from C"] = {"context": slower[0] if slower else None}
  return verdicts


def cache_per_token(mechanism: str, *, num_kv_heads: int | None = None, **sizes: Any) -> float:
  """Bytes per token and layer of the mechanism's real decode cache: how much the cache grows
  per extra max_len slot, over the layers (so fixed-size leaves such as indices cancel)."""
  short, long = (cache_bytes(cache_shapes(model_config(mechanism, 0, headroom=h,
                                                       num_kv_heads=num_kv_heads, **sizes)))
                 for h in (64, 128))
  return (long - short) / 64 / sizes["num_layers"]


def compare_caches(*, gqa_kv_heads: int, d_model: int, num_heads: int,
                   num_layers: int) -> dict:
  """MLA's cache bytes per token and layer against MHA's and GQA's at the same width (float32:
  the benchmark's dtype), measured, and the formulas of `attn.ops.mla`."""
  sizes = dict(d_model=d_model, num_heads=num_heads, num_layers=num_layers)
  options = registry.get("mla").options
  rank, rope = options["kv_lora_rank"][1], options["rope_head_dim"][1]
  head_dim = d_model // num_heads
  measured = {"mha": cache_per_token("softmax", **sizes),
              "gqa": cache_per_token("softmax", num_kv_heads=gqa_kv_heads, **sizes),
              "mla": cache_per_token("mla", **sizes)}
  expected = {"mha": mla_ops.kv_cache_bytes_per_token(num_heads, head_dim, jnp.float32),
              "gqa": mla_ops.kv_cache_bytes_per_token(gqa_kv_heads, head_dim, jnp.float32),
              "mla": mla_ops.latent_cache_bytes_per_token(rank, rope, jnp.float32)}
  return {"bytes_per_token_per_layer": measured, "expected": expected,
          "matches_formulas": measured == expected,
          "mla_over_mha": measured["mla"] / measured["mha"],
          "mla_over_gqa": measured["mla"] / measured["gqa"],
          "shape": dict(sizes, head_dim=head_dim, gqa_kv_heads=gqa_kv_heads,
                        kv_lora_rank=rank, rope_head_dim=rope, dtype="float32")}


def print_table(rows: list[dict]) -> None:
  """ms per token, then cache MiB: one row per mechanism, one column per context."""
  contexts = sorted({r["context"] for r in rows})
  names = list(dict.fromkeys(r["mechanism"] for r in rows))
  by = {(r["mechanism"], r["context"]): r for r in rows}
  for title, cell in (("ms per token", lambda r: f"{r['ms_per_token']:.3f}"),
                      ("cache MiB", lambda r: f"{r['cache_bytes'] / 2**20:.2f}")):
    header = f"{title:<16} {'decoding':<13}" + "".join(f"{'C=' + str(c):>10}" for c in contexts)
    print(header)
    print("-" * len(header))
    for name in names:
      print(f"{name:<16} {registry.get(name).decoding:<13}" + "".join(
          f"{cell(by[(name, c)]):>10}" if (name, c) in by else f"{'-':>10}" for c in contexts))
    print()


def print_checks(result: dict) -> None:
  for name, check in result["targets"].items():
    if "met" in check:
      verdict = {True: "PASS", False: "FAIL", None: "not measured"}[check["met"]]
      ratio = "-" if check["ratio"] is None else f"{check['ratio']:.3f}"
      print(f"Target {name} <= {check['target']:.2f}: {ratio} {verdict}")
    else:
      print(f"{name}: {check['context']}")
  caches = result["cache_bytes_per_token"]
  per = caches["bytes_per_token_per_layer"]
  print(f"Cache bytes per token and layer ({caches['shape']}): MHA {per['mha']:.0f}, GQA "
        f"{per['gqa']:.0f}, MLA {per['mla']:.0f}; MLA / MHA {caches['mla_over_mha']:.3f}, "
        f"MLA / GQA {caches['mla_over_gqa']:.3f}; equal to attn.ops.mla's formulas: "
        f"{caches['matches_formulas']}")


def plot(rows: list[dict], path) -> bool:
  """ms per token and cache memory against the context; False without matplotlib."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return False
  fig, axes = plt.subplots(1, 2, figsize=(13, 5))
  for name in dict.fromkeys(r["mechanism"] for r in rows):
    points = sorted((r["context"], r["ms_per_token"], r["cache_bytes"] / 2**20) for r in rows
                    if r["mechanism"] == name)
    contexts, ms, mib = zip(*points, strict=True)
    style = "-" if recurrent(name) else "--"
    axes[0].plot(contexts, ms, style, marker="o", label=name)
    axes[1].plot(contexts, mib, style, marker="o", label=name)
  axes[0].set(xscale="log", yscale="log", xlabel="context C (tokens)", ylabel="ms per token",
              title="decoding step time (recurrent solid)")
  axes[1].set(xscale="log", yscale="log", xlabel="context C (tokens)", ylabel="MiB",
              title="cache / state memory")
  for ax in axes:
    ax.grid(True, which="both", alpha=0.3)
  axes[0].legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def benchmark(contexts: list[int], mechanisms: list[str], *, rounds: int, steps: int,
              tolerance: float, flat_from: int = 1024, flat_to: int = 16384,
              gqa_kv_heads: int = 0, **sizes: Any) -> dict:
  """Every mechanism at every context; the result dict (rows, settings, verdicts, caches)."""
  for name in mechanisms:
    entry = registry.get(name, "--mechanisms")
    if not (entry.decoding and entry.causal):
      raise ValueError(f"--mechanisms: {name!r} does not decode causally (registry); choose "
                       f"from {default_mechanisms()}.")
  rows = time_all(contexts, mechanisms, rounds=rounds, steps=steps, **sizes)
  device = jax.devices()[0]
  gqa_kv_heads = gqa_kv_heads or max(1, sizes["num_heads"] // 2)
  return {"device": device.device_kind, "platform": device.platform, "jax": jax.__version__,
          "host": platform.processor() or platform.machine(),
          "settings": dict(sizes, rounds=rounds, steps=steps, batch=1, position="rope",
                           vocab_size=256, flat_from=flat_from, flat_to=flat_to),
          "rows": rows, "targets": check_targets(rows, tolerance, flat_from, flat_to),
          "cache_bytes_per_token": compare_caches(gqa_kv_heads=gqa_kv_heads, **sizes)}


def main(argv: list[str]) -> None:
  del argv
  if common.QUICK.value:
    common.apply_quick(QUICK)
  mechanisms = common.MECHANISMS.value or default_mechanisms()
  result = benchmark(list(map(int, _CONTEXTS.value)), mechanisms,
                     rounds=_ROUNDS.value, steps=_STEPS.value, tolerance=_FLAT.value,
                     flat_from=_FLAT_FROM.value, flat_to=_FLAT_TO.value,
                     gqa_kv_heads=_GQA_KV_HEADS.value, d_model=_D_MODEL.value,
                     num_heads=_NUM_HEADS.value, num_layers=_NUM_LAYERS.value)
  print_table(result["rows"])
  print_checks(result)
  out = common.write_json(result, "decode_quick" if common.QUICK.value else "decode")
  print(f"wrote {out}")
  png = out.with_suffix(".png")
  if plot(result["rows"], png):
    print(f"wrote {png}")
  else:
    print("matplotlib is not installed (pip install -e .[notebooks]): no plot.")


if __name__ == "__main__":
  app.run(main)
