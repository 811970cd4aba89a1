"""End to end through the command line: the default experiment shrunk by `runlocal` trains a
few steps, prints its report, then a longer relaunch resumes from the checkpoint."""

import json
import os
import subprocess
import sys

import jax

from tests.train.conftest import CACHE_DIR, REPO


def _main(workdir: str, data_dir: str, *flags: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=CACHE_DIR,
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  cmd = [sys.executable, "-m", "experiments.main", "--config",
         "experiments/default.py:runlocal", "--workdir", workdir,
         f"--config.data.data_dir={data_dir}", *flags]
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_default_experiment_trains_reports_and_resumes(data_dir, tmp_path):
  workdir = str(tmp_path / "default")
  first = _main(workdir, data_dir)
  assert first.returncode == 0, first.stderr[-3000:]
  assert "eval: loss" in first.stdout and "sample:" in first.stdout
  for name in ("summary.json", "metrics.jsonl", "tensorboard", "checkpoints"):
    assert os.path.join(workdir, name) in first.stdout
    assert os.path.exists(os.path.join(workdir, name))
  assert any(n.startswith("events.out.tfevents") for n in os.listdir(f"{workdir}/tensorboard"))
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  assert summary["step"] == 4
  for key in ("metrics", "train_loss", "tokens_per_second", "mfu", "params_sha256", "config"):
    assert summary[key] is not None, key
  assert 0 < summary["mfu"] < 1 and "cpu: measured" in summary["mfu_basis"]
  assert summary["provenance"]["versions"]["jax"] == jax.__version__
  # Untrained bytes: about ln(259) = 5.56 nats; a few steps already do better than uniform.
  assert 3.0 < summary["metrics"]["loss"] < 5.6
  assert summary["metrics"]["bits_per_byte"] > 0 and isinstance(summary["sample"], str)

  # More steps stretch the schedule (decay_steps follows num_steps): refused, then explicit.
  more = ("--config.train.num_steps=6", "--config.train.checkpoint_every=6",
          "--config.train.eval_every=6")
  refused = _main(workdir, data_dir, *more)
  assert refused.returncode == 1 and "optim.decay_steps: 4 -> 6" in refused.stderr
  longer = _main(workdir, data_dir, *more, "--allow_config_change")
  assert longer.returncode == 0, longer.stderr[-3000:]
  assert "resuming at step 4" in longer.stderr
  with open(os.path.join(workdir, "summary.json")) as f:
    resumed = json.load(f)
  assert resumed["step"] == 6 and resumed["steps_this_run"] == 2
  (change,) = resumed["config_changes"]
  assert change["step"] == 4 and change["changes"]["optim.decay_steps"] == [4, 6]
  steps = [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))
           if json.loads(line)["split"] == "train"]
  assert steps == [1, 2, 3, 4, 5, 6]


def test_bad_override_exits_with_a_message(data_dir, tmp_path):
  proc = _main(str(tmp_path / "bad"), data_dir, "--config.mesh.data=3")
  assert proc.returncode == 1
  assert "Config error: config.mesh" in proc.stderr
  assert "Traceback" not in proc.stderr
  # An override of a field the config lacks, and a config file that is not there: one line each.
  proc = _main(str(tmp_path / "bad"), data_dir, "--config.model.nrom=rmsnorm")
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert proc.stderr.strip() == ("Config error: --config.model.nrom names no field of the "
                                 'config (did you mean "norm"?).')
  proc = _main(str(tmp_path / "bad"), data_dir, "--config=experiments/nope.py")
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert proc.stderr.startswith("Config error: --config could not be loaded:")
  assert "No such file or directory: 'experiments/nope.py'" in proc.stderr
