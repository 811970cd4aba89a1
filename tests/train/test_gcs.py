"""Runs whose workdir and data_dir are gs:// URLs, against a local GCS emulator (tests/gcs.py):
the run files and checkpoints land in the bucket (nothing on local disk), a kill -9 resumes
bitwise, a notebook-style CPU process opens the checkpoint, the command line and a sweep work."""

import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn import data, storage
from attn.train import checkpoint, metrics
from tests.train.conftest import CACHE_DIR, REPO, losses, run_child, start_child


@pytest.fixture(scope="module")
def bucket_data(gcs, data_dir) -> str:
  """The embedded pystdlib/small corpus, prepared locally and copied to gs://.../tfds."""
  data.get_builder("pystdlib/small", data_dir)
  url = gcs.url("tfds")
  gcs.filesystem().put(data_dir.rstrip("/") + "/", url.removeprefix("gs://") + "/",
                       recursive=True)
  return url


def _summary(workdir: str) -> dict:
  return json.loads(storage.read_text(storage.join(workdir, "summary.json")))


def test_run_files_and_checkpoints_go_to_the_bucket(gcs, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # abspath("gs://...") would write into ./gs:/ here.
  workdir = gcs.url("run")
  writer = metrics.MetricWriter(workdir, total_steps=3, progress_bar=False)
  for step in (1, 2, 3):
    writer.write(step, "train", {"loss": 1.0 / step})
  writer.close()
  # A resume at step 2 drops the later lines (the object is rewritten: no append on GCS).
  metrics.MetricWriter(workdir, total_steps=3, initial_step=2, progress_bar=False).close()
  assert [r["step"] for r in metrics.read_jsonl(storage.join(workdir, "metrics.jsonl"))] == [1, 2]
  events = storage.listdir(storage.join(workdir, "tensorboard"))
  assert events and all(n.startswith("events.out.tfevents") for n in events)

  params = {"dense": {"kernel": jnp.arange(12.0).reshape(3, 4), "bias": jnp.ones(4)}}
  ckpt = checkpoint.Checkpointer(workdir, keep=1)
  assert ckpt.directory == storage.join(workdir, "checkpoints")
  ckpt.save(5, {"params": params, "step": jnp.int32(5)})
  ckpt.close()
  restored = checkpoint.load_params(workdir)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(restored), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert storage.exists(storage.join(workdir, "checkpoints", "5", "commit_success.txt"))
  assert os.listdir(tmp_path) == []  # Nothing written on local disk.


@pytest.mark.slow
def test_kill9_resume_on_gcs_is_bitwise_and_opens_on_one_cpu(gcs, bucket_data):
  overrides = {"data_dir": bucket_data}
  straight = gcs.url("straight")
  proc = run_child(straight, overrides, timeout=400)
  assert proc.returncode == 0, proc.stderr[-3000:]

  workdir = gcs.url("killed")
  proc = run_child(workdir, overrides, mode="kill_after_checkpoint", at=3, timeout=400)
  assert proc.returncode == -9, proc.stderr[-3000:]
  assert not storage.exists(storage.join(workdir, "summary.json"))
  proc = run_child(workdir, overrides, timeout=400)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resuming at step 3" in proc.stderr
  assert losses(workdir) == losses(straight)  # Exactly equal floats.
  assert _summary(workdir)["params_sha256"] == _summary(straight)["params_sha256"]

  # A notebook on one CPU device opens the 8-device checkpoint straight from the bucket.
  proc = run_child(workdir, {}, mode="load", devices=1, timeout=400)
  assert proc.returncode == 0, proc.stderr[-3000:]
  loaded = json.loads(proc.stdout.split("LOADED", 1)[1].splitlines()[0])
  assert loaded["devices"] == 1 and loaded["sha"] == _summary(straight)["params_sha256"]


def _objects(gcs, url: str) -> dict[str, tuple[int, str]]:
  """path -> (size, generation) of every object under `url` but the lease (renewed meanwhile)."""
  found = gcs.filesystem().find(url.removeprefix("gs://"), detail=True)
  return {k: (v["size"], v["generation"]) for k, v in found.items()
          if not k.endswith("/lock.json")}


@pytest.mark.slow
def test_held_bucket_workdir_refuses_a_second_launch_and_a_killed_holder_is_taken_over(
    gcs, bucket_data):
  """One writer per gs:// workdir: a launch while another run holds its lease exits at once
  naming the holder and writes nothing; after the holder's kill -9 the next launch takes the
  lease over (same host, pid gone) and resumes from the holder's checkpoint."""
  workdir, overrides = gcs.url("held"), {"data_dir": bucket_data}
  holder = start_child(workdir, overrides, mode="hold_after_checkpoint", at=3)
  try:
    for line in holder.stdout:
      if line.strip() == "HOLDING":
        break
    else:
      pytest.fail(f"the holder ended: {holder.wait()} {holder.stderr.read()[-3000:]}")
    before = _objects(gcs, workdir)
    cmd = [sys.executable, "-m", "experiments.main", "--config",
           "experiments/default.py:runlocal", "--workdir", workdir,
           f"--config.data.data_dir={bucket_data}"]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=_env(gcs), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"{workdir} is in use by pid {holder.pid} on host" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - start < 60  # At once: imports only, no data, no compile.
    assert _objects(gcs, workdir) == before  # Nothing read-modified or written.
  finally:
    holder.kill()
    holder.wait()
  proc = run_child(workdir, overrides, timeout=400)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (f"took over the lock of pid {holder.pid} on host" in proc.stderr
          and f"pid {holder.pid} no longer exists on this host" in proc.stderr), proc.stderr[-3000:]
  assert "resuming at step 3" in proc.stderr
  assert _summary(workdir)["step"] == 6
  assert not storage.exists(storage.join(workdir, "lock.json"))  # Released at the end.


def _env(gcs) -> dict[str, str]:
  return dict(os.environ, **gcs.env, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=CACHE_DIR,
              XLA_FLAGS="--xla_force_host_platform_device_count=8")


@pytest.mark.slow
def test_command_line_writes_everything_to_the_bucket(gcs, bucket_data, tmp_path):
  workdir = gcs.url("cli")
  cmd = [sys.executable, "-m", "experiments.main", "--config", "experiments/default.py:runlocal",
         "--workdir", workdir, f"--config.data.data_dir={bucket_data}"]
  proc = subprocess.run(cmd, cwd=REPO, env=_env(gcs), capture_output=True, text=True,
                        timeout=400)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name in ("summary.json", "metrics.jsonl", "tensorboard", "checkpoints", "attention.png"):
    assert f"  {workdir}/{name}" in proc.stdout, name
  assert storage.read_bytes(storage.join(workdir, "attention.png"))[:4] == b"\x89PNG"
  assert _summary(workdir)["step"] == 4
  assert not os.path.exists(os.path.join(REPO, "gs:"))


@pytest.mark.slow
def test_sweep_over_a_bucket_workdir_with_its_report(gcs, bucket_data):
  root = gcs.url("sweep")
  fixture = os.path.join(REPO, "tests", "launch", "sweep_fixture.py")
  cmd = [sys.executable, "-m", "launch.sweep", "--config", fixture, "--workdir", root,
         "--filter", "norm=(layernorm|rmsnorm)", "--parallel", "2",
         "--set", f"data.data_dir={bucket_data}"]
  env = dict(_env(gcs), XLA_FLAGS="")
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  table = storage.read_text(storage.join(root, "results.md"))
  assert "| `norm=layernorm`" in table and "| `norm=rmsnorm`" in table
  assert "Runs: 2 done" in table
  csv_text = storage.read_text(storage.join(root, "results.csv"))
  assert csv_text.count(",done,4,") == 2
  for name in ("norm=layernorm", "norm=rmsnorm"):
    assert "=== " in storage.read_text(storage.join(root, name, "log.txt"))
  assert storage.read_bytes(storage.join(root, "final_loss.png"))[:4] == b"\x89PNG"
