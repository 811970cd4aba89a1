"""Hybrid stacks (`model.attention_pattern`): validation, mixed caches in decoding, the CLI."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from attn import decode
from attn.errors import ConfigError
from attn.models import ModelConfig, build
from tests.test_decode import SMALL, _naive_greedy

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# One layer of each new mechanism: a recurrent state, a latent cache and two KV caches.
HYBRID = ("gated_deltanet", "mla", "differential", "gated")


@pytest.mark.slow  # ~1 CPU-minute: four different layers, compiled for several lengths
def test_mixed_caches_decode_like_the_full_forward_and_greedy_like_no_cache():
  config = ModelConfig(kind="lm", **(SMALL | dict(num_layers=4, position="rope")),
                       attention_pattern=HYBRID,
                       attention_options={"chunk_size": 4, "kv_lora_rank": 8, "rope_head_dim": 4})
  model = build(config)
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, 30, size=(2, 9)), jnp.int32)
  params = model.init(jax.random.key(0), tokens)["params"]
  assert [params["decoder"][f"layer_{i}"]["self_attention"].get("A_log") is not None
          for i in range(4)] == [True, False, False, False]
  full = jax.jit(model.apply)({"params": params}, tokens)
  decoder = model.clone(decode=True)
  cache = decoder.init(jax.random.key(0), jnp.zeros((2, SMALL["max_len"]), jnp.int32))["cache"]
  step = jax.jit(lambda cache, x, pos: decoder.apply({"params": params, "cache": cache}, x,
                                                     positions=pos, mutable=["cache"]))
  outputs = []
  for start, stop in [(0, 3)] + [(t, t + 1) for t in range(3, 9)]:
    logits, state = step(cache, tokens[:, start:stop],
                         jnp.broadcast_to(jnp.arange(start, stop), (2, stop - start)))
    cache = state["cache"]
    outputs.append(logits)
  np.testing.assert_allclose(jnp.concatenate(outputs, axis=1), full, atol=5e-5, rtol=5e-5)
  prompt = tokens[:, :5]
  np.testing.assert_array_equal(decode.generate(model, params, prompt, max_new_tokens=3),
                                _naive_greedy(model, params, prompt, 3))


@pytest.mark.parametrize("overrides, message", [
    (dict(num_layers=3, attention_pattern=("gated_deltanet", "gated")), "not a multiple"),
    (dict(attention_pattern=("gated_deltanet", "gated"), scan_layers=True), "scan_layers"),
    (dict(attention_pattern=("gated", "nope")), "attention_pattern='nope' is unknown"),
    (dict(attention_pattern=("gated",), attention_options={"window": 3}), "window"),
    (dict(attention="local", attention_pattern=("gated",)), "both set"),
    (dict(kind="classifier", attention_pattern=("softmax", "gated_deltanet")), "bidirectional"),
    (dict(attention="differential", num_heads=3, d_model=12), "pairs the heads"),
    (dict(attention="differential", scan_layers=True), "lambda_init"),
    (dict(attention="mla", attention_options={"rope_head_dim": 3}), "even rope_head_dim"),
])
def test_invalid_patterns_and_options_are_config_errors(overrides, message):
  values = dict(kind="lm", num_layers=2) | overrides
  with pytest.raises(ConfigError, match=message):
    ModelConfig(**values)


def test_options_reach_only_the_mechanisms_that_have_them():
  config = ModelConfig(kind="lm", num_layers=4, attention_pattern=(
      "local", "local", "local", "softmax"), attention_options={"window": 3})
  assert [config.layer_attention(i) for i in range(4)] == ["local"] * 3 + ["softmax"]
  assert config.mechanisms == ("local", "softmax")
  assert dict(config.attention_options) == {"window": 3}


@pytest.mark.parametrize("form", ["gated_deltanet,gated_deltanet,gated_deltanet,gated",
                                  "('gated_deltanet', 'gated_deltanet', 'gated_deltanet', "
                                  "'gated')"])
def test_both_command_line_forms_parse_to_the_pattern(form):
  argv = ["main", "--config", os.path.join(REPO, "experiments/default.py"),
          f"--config.model.attention_pattern={form}"]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  config = ModelConfig.from_config(values.config.model)
  assert config.attention_pattern == ("gated_deltanet",) * 3 + ("gated",)


@pytest.mark.slow
def test_hybrid_pattern_trains_and_samples_through_experiments_main(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.main", "--config", "experiments/default.py:runlocal",
       "--workdir", str(tmp_path), "--config.train.progress_bar=False",
       "--config.model.attention_pattern=gated_deltanet,gated"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["config"]["model"]["attention_pattern"] == ["gated_deltanet,gated"]  # as typed
  assert summary["sample"]
