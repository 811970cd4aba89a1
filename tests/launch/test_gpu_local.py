"""The multi-host entry point on one machine: `launch.gpu local` starts 2 CPU processes that
set JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, and they train one run."""

import json
import os
import subprocess
import sys

import pytest

from launch import sweep


@pytest.mark.slow
def test_two_local_processes_train_one_run(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  proc = subprocess.run(
    [sys.executable, "-m", "launch.gpu", "local", "--processes", "2", "--devices_per_process", "1",
     "--config", "experiments/default.py:runlocal", "--workdir", str(tmp_path),
     "--set", "train.progress_bar=False", "--set", "train.heartbeat_timeout_s=20"],
    cwd=sweep.REPO, env=env, capture_output=True, text=True, timeout=400)
  log = (tmp_path / "process_1.log").read_text() if (tmp_path / "process_1.log").exists() else ""
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + log[-2000:]
  with open(tmp_path / "summary.json") as f:
    summary = json.load(f)
  assert summary["processes"] == 2 and summary["devices"] == 2
  assert summary["step"] == 4
