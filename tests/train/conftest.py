"""Shared fixtures: a tiny LM config on the embedded pystdlib corpus, and a child-process runner."""

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import pytest

from attn import train

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Every training test compiles the same few tiny programs for 8 devices (~3 s each on 2 cores);
# XLA's persistent cache, shared with the child processes, compiles each one once.
CACHE_DIR = os.path.join(tempfile.gettempdir(), f"attn-tests-jax-cache-{os.getuid()}")
jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
  """A TFDS data dir for this pytest worker (the corpus is prepared once, in about a second)."""
  return str(tmp_path_factory.mktemp("tfds"))


def tiny_config(data_dir: str, **overrides: Any) -> ml_collections.ConfigDict:
  """A seconds-long LM run: d_model 32, 2 layers, 32 bytes x 8 rows, every step logged."""
  config = train.default_config()
  config.data.name = "pystdlib/small"
  config.data.data_dir = data_dir
  config.data.seq_len = 32
  config.model.update(kind="lm", vocab_size=259, d_model=32, num_layers=2, num_heads=2,
                      mlp_dim=64, max_len=32, dropout_rate=0.1)
  config.optim.update(learning_rate=3e-3, warmup_steps=2)
  config.train.update(num_steps=6, batch_size=8, eval_every=3, eval_steps=2, checkpoint_every=3,
                      log_every=1, progress_bar=False, sample_tokens=0, keep_checkpoints=5)
  for key, value in overrides.items():
    section, _, field = key.partition(".")
    if field:
      config[section][field] = value
    else:
      config[key] = value
  return config


@pytest.fixture
def make_config(data_dir: str) -> Callable[..., ml_collections.ConfigDict]:
  """`make_config(**{"train.num_steps": 4, ...})` -> a tiny config."""
  return lambda **overrides: tiny_config(data_dir, **overrides)


def start_child(workdir: str, overrides: dict[str, Any], *, mode: str = "run", at: int = 0,
                devices: int = 8, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
  """Starts tests/train/child.py in a fresh process (so it can be killed or signalled)."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_COMPILATION_CACHE_DIR"] = CACHE_DIR
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  env.update(extra_env or {})
  cmd = [sys.executable, "-m", "tests.train.child", "--workdir", workdir, "--mode", mode,
         "--at", str(at), "--overrides", json.dumps(overrides)]
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def run_child(workdir: str, overrides: dict[str, Any], *, timeout: float = 240,
              **kwargs: Any) -> subprocess.CompletedProcess:
  """Runs tests/train/child.py to the end; see start_child."""
  proc = start_child(workdir, overrides, **kwargs)
  out, err = proc.communicate(timeout=timeout)
  return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def lock_holder(workdir: str) -> subprocess.Popen:
  """Another process that takes `workdir`'s LocalLock and sleeps (the test kills it)."""
  code = ("import sys, time; from attn.train.workdir_lock import LocalLock; "
          "LocalLock(sys.argv[1]).acquire(); print('HELD', flush=True); time.sleep(600)")
  proc = subprocess.Popen([sys.executable, "-c", code, workdir], cwd=REPO, text=True,
                          stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": REPO})
  assert proc.stdout.readline().strip() == "HELD"
  return proc


def losses(workdir: str) -> dict[int, float]:
  """step -> train loss from metrics.jsonl."""
  from attn.train.metrics import read_jsonl

  return {r["step"]: r["loss"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
          if r["split"] == "train"}
