"""The train-step benchmark's flax baseline is the same model, and the benchmark runs end to end.

Speed itself is never asserted here (shared machines are noisy): the benchmark script reports
it. What is asserted is what makes its ratio meaningful: both variants have the same parameter
tree and compute the same loss on the same parameters.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn import models
from experiments import default
from experiments.benchmarks import train as train_bench


def _config(**model):
  config = default.get_config("runlocal")
  config.train.batch_size = 4
  config.model.update(model)
  return config


def _packed(batch):
  """The batch with each row split into three packed segments (positions restart)."""
  batch_size, length = batch["inputs"].shape
  ids = np.repeat([1, 2, 3], [length // 2, length // 4, length - length // 2 - length // 4])
  positions = np.concatenate([np.arange(n) for n in np.bincount(ids)[1:]])
  return dict(batch, segment_ids=jnp.asarray(np.tile(ids, (batch_size, 1)), jnp.int32),
              positions=jnp.asarray(np.tile(positions, (batch_size, 1)), jnp.int32))


@pytest.mark.parametrize("position", ["rope", "learned", "alibi"])
def test_flax_baseline_has_our_parameters_and_loss(position):
  s = train_bench.setup(_config(position=position))
  params = s["init"](jnp.uint32(0)).params
  check = train_bench.check_same_architecture(s["model"], s["task"], params,
                                              _packed(s["batch"]), rtol=1e-5)
  assert check["abs_diff"] <= 1e-5 * check["loss_flax"]


def test_flax_baseline_really_runs_flax_attention():
  """The swap takes effect (different programs), and the baseline's loss depends on the packing,
  so the equal losses above compare two real implementations of the same masks."""
  s = train_bench.setup(_config())
  params = s["init"](jnp.uint32(0)).params
  packed = _packed(s["batch"])
  unpacked = dict(packed, segment_ids=jnp.ones_like(packed["segment_ids"]))
  theirs = [train_bench.eval_loss("flax", s["model"], s["task"], params, b)
            for b in (packed, unpacked)]
  assert abs(theirs[0] - theirs[1]) > 1e-4

  def program(variant):
    with train_bench._under(variant):
      return jax.jit(lambda p, b: s["task"].forward(s["model"], {"params": p}, b,
                                                    train=False)[0]).lower(params, packed).as_text()

  assert program("attn") != program("flax")


@pytest.mark.parametrize("field, value, match", [
    ("num_kv_heads", 1, "num_kv_heads"),
    ("qk_norm", True, "qk_norm"),
    ("attention", "linear", "attention"),
])
def test_flax_baseline_refuses_what_flax_has_not(field, value, match):
  model_cfg = models.ModelConfig.from_config(_config(**{field: value}).model)
  with pytest.raises(ValueError, match=match):
    train_bench.flax_attention_layer(model_cfg, "self_attention", rope=True,
                                     mechanism=model_cfg.attention)


def test_benchmark_runs_both_variants_and_reports_the_ratio(tmp_path):
  result = train_bench.benchmark(_config(), variants=["attn", "flax"], num_steps=1, rounds=2,
                                 warmup=1)
  for r in result["variants"].values():
    assert len(r["round_step_s"]) == 2 and r["step_s"] > 0
    assert r["tokens_per_s"] == pytest.approx(result["batch"]["batch_size"]
                                              * result["batch"]["seq_len"] / r["step_s"])
    assert 0 < r["mfu"] < 1 and r["temp_bytes"] > 0
  ratio = result["variants"]["attn"]["tokens_per_s"] / result["variants"]["flax"]["tokens_per_s"]
  assert result["ratio_tokens_per_s"] == pytest.approx(ratio)
  assert "tokens/s attn / flax" in train_bench.format_table(result)
  json.loads(json.dumps(result, default=float))


def test_gpt350m_preset_has_about_350m_parameters():
  config = train_bench.apply_preset(default.get_config(), "gpt350m")
  model_cfg = models.ModelConfig.from_config(config.model)
  model = models.build(model_cfg)
  tokens = jnp.zeros((1, 16), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens))
  assert 300e6 < models.count_params(shapes["params"]) < 400e6
  with pytest.raises(ValueError, match="preset"):
    train_bench.apply_preset(default.get_config(), "gpt-9000")


def _row(name, length, seconds, mode="fwd+bwd", flops=1e9):
  return {"implementation": name, "length": length, "mode": mode, "median_s": seconds,
          "model_gflops_per_s": flops / seconds / 1e9, "temp_bytes": 1}


def test_attention_speed_targets_take_the_fastest_of_our_paths():
  from experiments.benchmarks import attention as attn_bench

  rows = [_row(attn_bench.JAX_NN, 2048, 1.0), _row(attn_bench.OURS, 2048, 0.6),
          _row(attn_bench.BLOCKWISE, 2048, 0.4), _row(attn_bench.JAX_NN, 4096, 4.0),
          _row(attn_bench.OURS, 4096, 1.0), _row(attn_bench.OURS, 1024, 9.0)]
  verdicts = attn_bench.check_speed(rows, matmul_flops=5e9, causal=True)
  speed = verdicts["best path vs jax.nn fwd+bwd, T >= 2048"]
  assert speed["ratio"] == pytest.approx(0.4) and speed["at"] == 2048 and speed["met"]
  assert [b["implementation"] for b in speed["per_length"]] == [attn_bench.BLOCKWISE,
                                                                attn_bench.OURS]
  assert [b["auto_ratio_vs_jax_nn"] for b in speed["per_length"]] == pytest.approx([0.6, 0.25])
  rate = verdicts["best path fraction of matmul rate, T >= 2048"]
  assert rate["ratio"] == pytest.approx(1e9 / 1.0 / 5e9) and rate["at"] == 4096
  assert not rate["met"]
  assert "cudnn forward TFLOP/s, T >= 4096" not in verdicts
  rows.append(_row(attn_bench.CUDNN, 4096, 1e-3, mode="fwd", flops=3e11))
  cudnn = attn_bench.check_speed(rows, matmul_flops=5e9, causal=False)[
      "cudnn forward TFLOP/s, T >= 4096"]
  assert cudnn["ratio"] == pytest.approx(300.0) and not cudnn["met"]
  causal = attn_bench.check_speed(rows, matmul_flops=5e9, causal=True)[
      "cudnn forward TFLOP/s, T >= 4096"]
  assert causal["ratio"] == pytest.approx(150.0)


def test_attention_timing_batches_short_calls_and_reports_seconds_per_call(monkeypatch):
  """A call shorter than SAMPLE_SECONDS is timed back to back (one wait per sample); the result
  is still seconds per call. A fake clock that each call advances (by binary fractions, so
  exactly) makes it exact."""
  import math
  import types

  from experiments.benchmarks import attention as attn_bench

  clock = [0.0]
  monkeypatch.setattr(attn_bench, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
  calls = {"short": 0, "long": 0}

  def executable(name, seconds):
    def run():
      calls[name] += 1
      clock[0] += seconds
      return jnp.zeros(2)
    return run

  times = attn_bench.time_interleaved(
      {"short": executable("short", 2**-10), "long": executable("long", 2**-4)},
      min_reps=3, min_seconds=0.0)
  assert times == {"short": 2**-10, "long": 2**-4}
  per_sample = math.ceil(attn_bench.SAMPLE_SECONDS / 2**-10)
  assert per_sample > 1
  assert calls == {"short": 2 + 3 * per_sample, "long": 2 + 3}  # 2 warm-up calls each
  assert attn_bench.time_interleaved({}, min_reps=3, min_seconds=0.0) == {}


@pytest.fixture
def bench_flags():
  """The benchmarks' absl flags, parsed with their defaults and restored after the test.

  The benchmark modules are imported first: flags defined inside `flagsaver` are removed when
  it exits, and a module imported there (cached afterwards) would not define them again."""
  from absl import flags
  from absl.testing import flagsaver

  from experiments.benchmarks import attention, decode  # noqa: F401  (defines their flags)

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  with flagsaver.flagsaver():
    yield flags.FLAGS


def test_attention_benchmark_mechanisms_are_the_registry(bench_flags):
  from attn.errors import ConfigError
  from attn.layers import registry
  from experiments.benchmarks import attention as attn_bench

  assert attn_bench.mechanism_names() == list(registry.names())
  assert {"mla", "gated", "differential", "gated_deltanet"} <= set(attn_bench.mechanism_names())
  bench_flags.mechanisms = ["mla", "gated_deltanet"]
  assert attn_bench.mechanism_names() == ["mla", "gated_deltanet"]
  bench_flags.mechanisms = []
  assert attn_bench.mechanism_names() == []
  bench_flags.mechanisms = ["flash"]
  with pytest.raises(ConfigError, match="gated_deltanet"):
    attn_bench.mechanism_names()


def test_attention_benchmark_smoke_measures_mechanisms_and_baselines(bench_flags):
  """Tiny sizes end to end through `measure`: the baselines and two registry mechanisms (one
  bidirectional-only: linformer runs unmasked), forward+backward, XLA's memory numbers and the
  reference ratios."""
  from experiments.benchmarks import attention as attn_bench

  bench_flags.lengths, bench_flags.heads, bench_flags.head_dim = ["32"], 2, 16
  bench_flags.min_reps, bench_flags.min_seconds = 1, 0.0
  bench_flags.implementations = ["none of them"]  # the default path and jax.nn only
  bench_flags.mechanisms = ["linformer", "gated_deltanet"]
  result = attn_bench.measure()
  rows = {(r["implementation"], r["mode"]): r for r in result["rows"]}
  assert not result["skipped"] and len(rows) == 6
  for name in (attn_bench.OURS, attn_bench.JAX_NN):
    for mode in ("fwd", "fwd+bwd"):
      assert rows[(name, mode)]["group"] == attn_bench.BASELINE
      assert rows[(name, mode)]["ratio_vs_jax_nn"] == pytest.approx(
          rows[(name, mode)]["median_s"] / rows[(attn_bench.JAX_NN, mode)]["median_s"])
  for name in bench_flags.mechanisms:
    row = rows[(name, "fwd+bwd")]
    assert row["group"] == attn_bench.MECHANISM and (name, "fwd") not in rows
    assert row["causal"] == (name != "linformer")
    assert row["peak_bytes"] >= row["temp_bytes"] > 0 and row["median_s"] > 0
    assert row["ratio_vs_softmax"] is None  # softmax was not measured
  assert result["settings"]["mechanisms"] == ["linformer", "gated_deltanet"]


def test_attention_benchmark_skips_what_exceeds_the_memory_budget(bench_flags, monkeypatch):
  from experiments.benchmarks import attention as attn_bench

  monkeypatch.setattr(attn_bench, "compile_once", lambda fn, args: (
      fn, {"temp_bytes": 2**20, "peak_bytes": 2**21, "flops": 1.0}))
  bench_flags.lengths, bench_flags.mechanisms = ["16"], []
  bench_flags.max_memory_gib = 1.5 / 1024  # 1.5 MiB: the 2 MiB peaks do not fit
  result = attn_bench.measure()
  assert result["rows"] == [] and len(result["skipped"]) == 2 * len(attn_bench.baselines(True))
  assert all("peak 0.0 GiB > budget 0.0 GiB" in s["reason"] for s in result["skipped"])
  bench_flags.max_memory_gib = 0.0
  assert attn_bench.memory_budget() > 2**28  # the device's (or host's) memory

  def unbuildable(name, *args, **kwargs):
    raise ValueError(f"{name} cannot be built here")

  monkeypatch.setattr(attn_bench, "mechanism_layer", unbuildable)
  bench_flags.mechanisms = ["mla"]
  result = attn_bench.measure()  # reported, not raised: the other paths still run
  assert {"length": 16, "mode": "fwd+bwd", "implementation": "mla",
          "reason": "ValueError: mla cannot be built here"} in result["skipped"]


def test_attention_growth_check_is_every_recurrent_mechanism(capsys):
  """#18: Gated DeltaNet's forward+backward time may grow <= 5x from T=2048 to 8192; the same
  bound for every registry entry that decodes recurrently. PASS / FAIL / not measured."""
  from attn.layers import registry
  from experiments.benchmarks import attention as attn_bench

  rows = [_row("gated_deltanet", 2048, 0.1), _row("gated_deltanet", 8192, 0.49),
          _row("linear", 2048, 0.1), _row("linear", 8192, 0.51), _row("performer", 2048, 1.0),
          _row("softmax", 2048, 1.0), _row("softmax", 8192, 16.0)]
  growth = attn_bench.check_growth(rows, 2048)
  recurrent = [n for n, m in registry.mechanisms().items() if m.decoding == "recurrent"]
  assert {"linear", "performer", "gated_deltanet"} <= set(recurrent)
  assert [v["mechanism"] for v in growth.values()] == recurrent
  deltanet = growth["gated_deltanet: fwd+bwd time, T 2048 -> 8192"]
  assert deltanet["ratio"] == pytest.approx(4.9) and deltanet["met"]
  assert deltanet["from_ms"] == pytest.approx(100.0) and deltanet["to_ms"] == pytest.approx(490)
  assert growth["linear: fwd+bwd time, T 2048 -> 8192"]["met"] is False
  assert growth["performer: fwd+bwd time, T 2048 -> 8192"]["met"] is None
  attn_bench.print_growth(growth)
  lines = capsys.readouterr().out.splitlines()
  assert any(line.startswith("gated_deltanet") and line.endswith("PASS") for line in lines)
  assert any(line.startswith("linear") and line.endswith("FAIL") for line in lines)
  assert any(line.startswith("performer") and line.endswith("not measured") for line in lines)


def test_decode_benchmark_defaults_are_the_registry_decoders():
  from attn.layers import registry
  from experiments.benchmarks import decode as decode_bench

  names = decode_bench.default_mechanisms()
  assert names == [n for n, m in registry.mechanisms().items() if m.decoding and m.causal]
  assert {"softmax", "local", "chunked", "linear", "performer", "gated_deltanet", "mla",
          "gated", "differential"} <= set(names)
  assert not {"linformer", "bigbird", "longformer", "sigmoid"} & set(names)
  with pytest.raises(ValueError, match="linformer"):
    decode_bench.benchmark([8], ["linformer"], rounds=1, steps=1, tolerance=0.1, d_model=16,
                           num_heads=2, num_layers=1)


def test_decode_benchmark_times_prefilled_caches_and_checks_flatness():
  """Tiny sizes end to end: the KV cache holds C + headroom slots of keys and values per
  layer, the recurrent states do not grow with C, and the prefilled cache is what the step
  continues from (index C). The flatness verdict follows max / min, for every recurrent
  mechanism."""
  from experiments.benchmarks import decode as decode_bench

  sizes = dict(d_model=16, num_heads=2, num_layers=1)
  rows = decode_bench.time_all([8, 16], ["softmax", "gated_deltanet"], rounds=2, steps=2,
                               **sizes)
  by = {(r["mechanism"], r["context"]): r for r in rows}
  assert len(by) == 4 and all(r["ms_per_token"] > 0 and len(r["ms_samples"]) == 2 for r in rows)
  headroom = 2 * 4 + 8
  for context in (8, 16):  # k and v: [B=1, C + headroom, K=2, H=8] float32, plus the index
    assert by[("softmax", context)]["cache_bytes"] == 2 * (context + headroom) * 16 * 4 + 4
  assert by[("gated_deltanet", 8)]["cache_bytes"] == by[("gated_deltanet", 16)]["cache_bytes"]
  # linear's state: S [1, 2, 8, 8] + z [1, 2, 8] + key_max [1, 2] float32 + length int32.
  model = decode_bench.model_config("linear", 8, headroom=4, **sizes)
  assert decode_bench.cache_bytes(decode_bench.cache_shapes(model)) == (128 + 16 + 2) * 4 + 4
  decoder = decode_bench.build(model).clone(decode=True)
  cache = decode_bench.filled_cache(decoder, 1, model.max_len, 8)
  lengths = [x for x in jax.tree.leaves(cache) if x.dtype == jnp.int32]
  assert lengths and all(int(x) == 8 for x in lengths)

  fake = [{"mechanism": m, "context": c, "ms_per_token": t}
          for m, c, t in [("linear", 1024, 1.0), ("linear", 16384, 1.08),
                          ("performer", 1024, 1.0), ("performer", 16384, 1.2),
                          ("gated_deltanet", 1024, 1.0), ("gated_deltanet", 16384, 1.11),
                          ("mla", 1024, 0.5), ("mla", 16384, 2.0),
                          ("softmax", 1024, 0.9), ("softmax", 16384, 3.0)]]
  verdicts = decode_bench.check_targets(fake, 0.10)
  assert verdicts["linear: ms/token max/min, C 1024-16384"]["met"]
  assert not verdicts["performer: ms/token max/min, C 1024-16384"]["met"]
  assert verdicts["gated_deltanet: ms/token max/min, C 1024-16384"]["ratio"] == pytest.approx(
      1.11)
  assert not verdicts["gated_deltanet: ms/token max/min, C 1024-16384"]["met"]
  assert not any(k.startswith(("mla", "softmax")) for k in verdicts)
  assert verdicts["linear: softmax slower from C"]["context"] == 16384


def test_decode_benchmark_runs_its_steps_on_the_device_in_one_loop():
  """One timed call runs `steps` greedy steps (the KV cache index moves by exactly that many),
  so the clock measures back-to-back device steps, not one step and a host round trip."""
  from experiments.benchmarks import decode as decode_bench

  run, cache = decode_bench.stepper("softmax", 8, batch=1, headroom=10, steps=3, d_model=16,
                                    num_heads=2, num_layers=1)
  indices = lambda c: [int(x) for x in jax.tree.leaves(c) if x.dtype == jnp.int32]
  assert indices(cache) == [8]
  token, cache = run(cache, *decode_bench._inputs(1, 8))
  assert token.shape == (1, 1) and indices(cache) == [11]
  token, cache = run(cache, token, jnp.full((1, 1), 11, jnp.int32))
  assert indices(cache) == [14]


def test_decode_benchmark_compares_mla_cache_bytes_with_mha_and_gqa():
  """Measured from the real caches: MHA 2 N H, GQA 2 K H, MLA (kv_lora_rank + rope_head_dim)
  float32 values per token and layer (DeepSeek-V2's accounting)."""
  from experiments.benchmarks import decode as decode_bench

  caches = decode_bench.compare_caches(gqa_kv_heads=2, d_model=256, num_heads=4, num_layers=2)
  per = caches["bytes_per_token_per_layer"]
  assert per == {"mha": 2 * 4 * 64 * 4, "gqa": 2 * 2 * 64 * 4, "mla": (64 + 16) * 4}
  assert caches["matches_formulas"]
  assert caches["mla_over_mha"] == pytest.approx(80 / 512)
  assert caches["mla_over_gqa"] == pytest.approx(80 / 256)
