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
    def run(x):
      calls[name] += 1
      clock[0] += seconds
      return x
    return run

  times = attn_bench.time_interleaved(
      {"short": executable("short", 2**-10), "long": executable("long", 2**-4)},
      (jnp.zeros(2),), min_reps=3, min_seconds=0.0)
  assert times == {"short": 2**-10, "long": 2**-4}
  per_sample = math.ceil(attn_bench.SAMPLE_SECONDS / 2**-10)
  assert per_sample > 1
  assert calls == {"short": 2 + 3 * per_sample, "long": 2 + 3}  # 2 warm-up calls each


def test_decode_benchmark_times_prefilled_caches_and_checks_flatness():
  """Tiny sizes end to end: the KV cache holds C + headroom slots of keys and values per
  layer, the recurrent states do not grow with C, and the prefilled cache is what the step
  continues from (index C). The flatness verdict follows max / min."""
  from experiments.benchmarks import decode as decode_bench

  sizes = dict(d_model=16, num_heads=2, num_layers=1)
  rows = decode_bench.time_all([8, 16], ["softmax", "linear"], rounds=2, steps=2, **sizes)
  by = {(r["mechanism"], r["context"]): r for r in rows}
  assert len(by) == 4 and all(r["ms_per_token"] > 0 and len(r["ms_samples"]) == 2 for r in rows)
  headroom = 2 * 3 + 8
  for context in (8, 16):  # k and v: [B=1, C + headroom, K=2, H=8] float32, plus the index
    assert by[("softmax", context)]["cache_bytes"] == 2 * (context + headroom) * 16 * 4 + 4
  # linear: S [1, 2, 8, 8] + z [1, 2, 8] + key_max [1, 2] float32 + length int32.
  assert by[("linear", 8)]["cache_bytes"] == by[("linear", 16)]["cache_bytes"] == (
      (128 + 16 + 2) * 4 + 4)
  model = decode_bench.model_config("linear", 8, headroom=4, **sizes)
  decoder = decode_bench.build(model).clone(decode=True)
  cache = decode_bench.filled_cache(decoder, 1, model.max_len, 8)
  lengths = [x for x in jax.tree.leaves(cache) if x.dtype == jnp.int32]
  assert lengths and all(int(x) == 8 for x in lengths)

  fake = [{"mechanism": m, "context": c, "ms_per_token": t}
          for m, c, t in [("linear", 1024, 1.0), ("linear", 16384, 1.08),
                          ("performer", 1024, 1.0), ("performer", 16384, 1.2),
                          ("softmax", 1024, 0.9), ("softmax", 16384, 3.0)]]
  verdicts = decode_bench.check_targets(fake, 0.10)
  assert verdicts["linear: ms/token max/min, C 1024-16384"]["met"]
  assert not verdicts["performer: ms/token max/min, C 1024-16384"]["met"]
  assert verdicts["linear: softmax slower from C"]["context"] == 16384
