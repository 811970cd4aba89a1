"""Fault injection against real (tiny) runs: two launches on one workdir, a changed config,
damaged checkpoints / metrics / summary, bad sweep arguments, Ctrl-C and SIGTERM.

Each scenario checks the exit status or exception, that the message names the file or field,
that nothing was deleted, and, where a good step exists, that the resumed run's parameters hash
to exactly the straight run's. The README's "What happens when things go wrong" table is these
tests.
"""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from attn import train
from attn.train import config_identity
from launch import report, run_configs, sweep
from tests.train.conftest import REPO, lock_holder, losses, run_child, tiny_config


@pytest.fixture(scope="module")
def straight(data_dir: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
  """6 steps straight (checkpoints at 3 and 6): the workdir, its losses and parameter hash."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  train.train_and_evaluate(tiny_config(data_dir), workdir)
  return {"workdir": workdir, "losses": losses(workdir), "sha": _summary(workdir)["params_sha256"]}


def _summary(workdir: str) -> dict:
  with open(os.path.join(workdir, "summary.json")) as f:
    return json.load(f)


def _files(root: str) -> dict[str, int]:
  """Relative path -> size of every file under root."""
  return {os.path.relpath(os.path.join(d, n), root): os.path.getsize(os.path.join(d, n))
          for d, _, names in os.walk(root) for n in names}


def _unfinished_copy(straight: dict, tmp_path, *, keep_last: bool = True) -> str:
  """The straight run's workdir without its summary (so a relaunch must compute again)."""
  workdir = str(tmp_path / "run")
  shutil.copytree(straight["workdir"], workdir)
  os.remove(os.path.join(workdir, "summary.json"))
  if not keep_last:  # As if killed after the checkpoint of step 3.
    shutil.rmtree(os.path.join(workdir, "checkpoints", "6"))
  return workdir


# -- damaged checkpoints ------------------------------------------------------------------------
def _flip(step_dir: str) -> str:
  for path in glob.glob(f"{step_dir}/state/**/d/*", recursive=True):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x10
    open(path, "wb").write(data)
  return f"{step_dir}/state"


def _truncate(step_dir: str) -> str:
  for path in glob.glob(f"{step_dir}/state/**/d/*", recursive=True):
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])
  return f"{step_dir}/state"


def _garbage_metadata(step_dir: str) -> str:
  with open(f"{step_dir}/state/_METADATA", "w") as f:
    f.write("\x00garbage{")
  return f"{step_dir}/state/_METADATA: JSONDecodeError"


def _empty_manifest(step_dir: str) -> str:
  open(f"{step_dir}/state/manifest.ocdbt", "w").close()
  return "manifest.ocdbt"


def _missing_item(step_dir: str) -> str:
  shutil.rmtree(f"{step_dir}/data")
  return f"{step_dir}/data/process_0-of-1.json: FileNotFoundError"


def _edited_data_state(step_dir: str) -> str:
  path = f"{step_dir}/data/process_0-of-1.json"
  state = json.load(open(path))
  state["counter"] += 8  # Valid JSON, a plausible position: only the checksum can tell.
  json.dump(state, open(path, "w"))
  return f"{path}: ValueError: the data iterator state does not match its recorded SHA-256"


@pytest.mark.parametrize("damage", [
  _flip, _garbage_metadata, _missing_item,
  pytest.param(_truncate, marks=pytest.mark.slow),
  pytest.param(_empty_manifest, marks=pytest.mark.slow),
  pytest.param(_edited_data_state, marks=pytest.mark.slow),
])
def test_damaged_latest_step_is_moved_aside_and_the_run_resumes_from_the_previous(
    straight, data_dir, tmp_path, capfd, damage):
  workdir = _unfinished_copy(straight, tmp_path)
  step_dir = os.path.join(workdir, "checkpoints", "6")
  names = damage(step_dir)
  damaged = _files(step_dir)
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write('{"step": 7, "split": "tr')  # And a torn last line, as a kill mid-write leaves.
  train.train_and_evaluate(tiny_config(data_dir), workdir)
  err = capfd.readouterr().err
  assert f"Checkpoint step 6 in {workdir}/checkpoints cannot be used: " in err
  assert names in err
  assert f"moved to {workdir}/checkpoints/corrupt-6 (nothing was deleted" in err
  assert _files(os.path.join(workdir, "checkpoints", "corrupt-6")) == damaged  # Every byte kept.
  assert "resuming at step 3" in err
  assert _summary(workdir)["params_sha256"] == straight["sha"]
  assert losses(workdir) == straight["losses"]  # Steps 4-6 again, the torn line dropped.
  assert "metrics.jsonl: dropped 1 damaged line(s)" in err


def test_damaged_summary_is_recomputed_and_reported_not_a_crash(straight, data_dir, tmp_path,
                                                                 capfd):
  workdir = str(tmp_path / "sweep" / "run")
  shutil.copytree(straight["workdir"], workdir)
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    f.write('{"step": 6, "metr')
  with open(tmp_path / "sweep" / "sweep.json", "w") as f:
    json.dump({"config": "x.py", "metric": "loss",
               "runs": [{"name": "run", "variant": "run", "seed": 0, "overrides": {}}]}, f)
  (result,) = report.collect(str(tmp_path / "sweep"))
  assert result.status == "failed" and "summary.json is damaged (JSONDecodeError" in result.error
  assert sweep.status(workdir) == "interrupted"  # Not "done": a relaunch recomputes it.
  train.train_and_evaluate(tiny_config(data_dir), workdir)
  assert "summary.json is damaged (JSONDecodeError" in capfd.readouterr().err
  assert _summary(workdir)["params_sha256"] == straight["sha"]
  assert report.collect(str(tmp_path / "sweep"))[0].status == "done"


def _main(workdir: str, data_dir: str, *flags: str) -> subprocess.CompletedProcess:
  """`python -m experiments.main --config experiments/default.py:runlocal` on workdir."""
  argv = [sys.executable, "-m", "experiments.main", "--config", "experiments/default.py:runlocal",
          "--workdir", workdir, f"--config.data.data_dir={data_dir}", *flags]
  return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120,
                        env={**os.environ, "PYTHONPATH": REPO})


def test_divergence_exits_with_its_own_status_and_sweeps_report_it(data_dir, tmp_path):
  """A diverged run is a result (the setting does not train), not a crash: experiments.main
  exits DIVERGED_EXIT_STATUS and the sweep report marks the failed run as diverged."""
  sweep_dir = tmp_path / "sweep"
  run_dir = str(sweep_dir / "lr=huge")
  proc = _main(run_dir, data_dir, "--config.optim.learning_rate=1e30",
               "--config.optim.warmup_steps=0", "--config.train.log_every=1")
  assert proc.returncode == report.DIVERGED_EXIT_STATUS, proc.stderr[-2000:]
  assert "Diverged: Non-finite loss (nan) or gradient norm (nan) at step " in proc.stderr
  assert "no checkpoint was written. Lower optim.learning_rate" in proc.stderr
  assert "Traceback" not in proc.stderr
  # What launch.sweep records when the child ends (its log, then _finish), read by the report.
  with open(sweep.log_path(run_dir), "w") as f:
    f.write(proc.stderr)
  assert sweep._finish(run_dir, [], proc.returncode, 1.0) == "failed"
  with open(sweep_dir / report.PLAN_FILE, "w") as f:
    json.dump({"runs": [{"name": "lr=huge", "variant": "lr=huge", "overrides": {}}]}, f)
  [result] = report.collect(str(sweep_dir))
  assert result.status == "failed" and result.diverged


# -- one writer ---------------------------------------------------------------------------------
def test_second_launch_exits_at_once_naming_the_holder(straight, data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(straight["workdir"], workdir)
  os.remove(os.path.join(workdir, "summary.json"))
  before = _files(workdir)
  holder = lock_holder(workdir)
  try:
    start = time.monotonic()
    proc = _main(workdir, data_dir)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"{workdir} is in use by pid {holder.pid} on host" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - start < 60  # At once: no data, no compile (imports only).
    assert _files(workdir) == before | {"lock.json": os.path.getsize(f"{workdir}/lock.json")}
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  # kill -9 left its lock behind; the next launch takes it over (pid gone) and finishes.
  train.train_and_evaluate(tiny_config(data_dir), workdir)
  assert _summary(workdir)["params_sha256"] == straight["sha"]
  assert not os.path.exists(os.path.join(workdir, "lock.json"))


# -- config identity ----------------------------------------------------------------------------
def _refused(workdir: str, changed) -> None:
  before = _files(workdir)
  with pytest.raises(config_identity.ConfigChangeError) as info:
    train.train_and_evaluate(changed, workdir)
  message = str(info.value)
  assert "optim.learning_rate: 0.003 -> 0.001" in message
  assert "eval_every" not in message  # Operational: allowed, not part of the refusal.
  assert "another --workdir" in message and "--allow_config_change" in message
  assert _files(workdir) == before


def test_changed_learning_rate_is_refused_with_a_diff(straight, data_dir, tmp_path):
  workdir = _unfinished_copy(straight, tmp_path, keep_last=False)
  _refused(workdir, tiny_config(data_dir, **{"optim.learning_rate": 1e-3, "train.eval_every": 2}))


@pytest.mark.slow  # ~50 s on 2 busy cores: another learning rate is another compiled step.
def test_allowed_config_change_is_recorded_with_its_step(straight, data_dir, tmp_path, capfd):
  workdir = _unfinished_copy(straight, tmp_path, keep_last=False)
  changed = tiny_config(data_dir, **{"optim.learning_rate": 1e-3, "train.eval_every": 2})
  _refused(workdir, changed)
  train.train_and_evaluate(changed, workdir, allow_config_change=True)
  err = capfd.readouterr().err
  assert "resuming at step 3" in err
  assert ("config change from step 3 on, allowed (--allow_config_change): "
          "optim.learning_rate 0.003 -> 0.001, train.eval_every 3 -> 2") in err
  (change,) = config_identity.history(workdir)
  assert change["step"] == 3 and change["kind"] == "allowed"
  assert change["changes"] == {"optim.learning_rate": [0.003, 0.001], "train.eval_every": [3, 2]}
  summary = _summary(workdir)
  assert summary["config_changes"] == [change]
  assert summary["config"]["optim"]["learning_rate"] == 0.001
  assert summary["params_sha256"] != straight["sha"]
  assert losses(workdir)[3] == straight["losses"][3]  # The trained steps are kept as they were.


def test_changed_optimizer_is_a_clear_refusal_not_a_tree_dump(straight, data_dir, tmp_path):
  workdir = _unfinished_copy(straight, tmp_path)
  before = _files(workdir)
  sgd = tiny_config(data_dir, **{"optim.name": "sgd"})
  with pytest.raises(train.ConfigError, match=r'optim.name: "adamw" -> "sgd"'):
    train.train_and_evaluate(sgd, workdir)
  with pytest.raises(train.ConfigError, match=r"holds the state of another optimizer") as info:
    train.train_and_evaluate(sgd, workdir, allow_config_change=True)
  assert len(str(info.value).splitlines()) == 1
  assert _files(workdir) == before


def test_allowed_change_on_a_finished_run_is_refused_not_dropped(straight, data_dir, tmp_path):
  """A finished run has no step left to apply a trajectory change to: exit 1, saying so."""
  from experiments import default

  workdir = str(tmp_path / "run")
  shutil.copytree(straight["workdir"], workdir)
  config = default.get_config("runlocal")  # As if experiments.main had trained it to the end.
  config.data.data_dir = data_dir
  end = config.train.num_steps
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump({"config": config_identity.as_json(config)}, f)
  summary = {**_summary(workdir), "step": end}
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f)
  before = _files(workdir)
  proc = _main(workdir, data_dir, "--config.optim.learning_rate=5e-4", "--allow_config_change")
  assert proc.returncode == 1, proc.stderr[-2000:]
  lr = json.dumps(config.optim.learning_rate)
  assert f"the run finished at step {end} with another config" in proc.stderr
  assert f"optim.learning_rate: {lr} -> 0.0005" in proc.stderr
  assert "The change was not applied" in proc.stderr
  assert f"raise train.num_steps above {end}" in proc.stderr and "another --workdir" in proc.stderr
  assert "nothing to do" not in proc.stdout and "Traceback" not in proc.stderr
  assert _files(workdir) == before  # Nothing recorded: config.json as it was.


def test_raising_num_steps_on_a_finished_run(straight, data_dir, tmp_path, capfd):
  workdir = str(tmp_path / "run")
  shutil.copytree(straight["workdir"], workdir)
  longer = tiny_config(data_dir, **{"train.num_steps": 8})
  with pytest.raises(config_identity.ConfigChangeError) as info:
    train.train_and_evaluate(longer, workdir)
  # Warmup to the 3e-3 peak at step 1, cosine to 0 at the last step: at step 6 the 6-step
  # schedule has ended (0); over 8 steps (last = 7) it is 3e-3 * (1 + cos(pi * 5 / 6)) / 2.
  stretched = 3e-3 * (1 + np.cos(np.pi * 5 / 6)) / 2
  assert f"learning rate at step 6 jumps from 0 to {stretched:.4g}" in str(info.value)
  assert "--config.optim.decay_steps=6" in str(info.value)
  kept = tiny_config(data_dir, **{"train.num_steps": 8, "optim.decay_steps": 6})
  result = train.train_and_evaluate(kept, workdir)  # Same schedule, two more steps: allowed.
  assert result["step"] == 8
  assert ("config change from step 6 on, operational: train.num_steps 6 -> 8"
          in capfd.readouterr().err)
  (change,) = config_identity.history(workdir)
  assert change == {**change, "step": 6, "kind": "operational",
                    "changes": {"train.num_steps": [6, 8]}}
  assert sorted(losses(workdir)) == list(range(1, 9))


def test_sweep_checks_set_filter_and_changed_configs_before_starting(straight, tmp_path, capsys):
  spec = "experiments/norm_ablation.py:runlocal"
  with pytest.raises(SystemExit):
    sweep.parse_args(["--config", spec, "--workdir", str(tmp_path), "--filter", "norm=(rms"])
  assert "--filter 'norm=(rms' is not a valid regular expression" in capsys.readouterr().err
  root = str(tmp_path / "sweep")
  assert sweep.main(["--config", spec, "--workdir", root, "--set", "train.num_step=5"]) == 2
  assert "'train.num_step' is not a field" in capsys.readouterr().err
  assert sweep.main(["--config", spec, "--workdir", root, "--set", "train.num_steps=x"]) == 2
  assert "'x' is not a valid int for train.num_steps" in capsys.readouterr().err
  # A finished point (what the child would store) and a relaunch that changes its config.
  module, arg = sweep.load_experiment(spec)
  run = sweep.plan(spec, filters=["norm=layernorm"])[0]
  run_dir = run.workdir(root)
  os.makedirs(os.path.join(run_dir, "checkpoints", "10"))
  with open(os.path.join(run_dir, "config.json"), "w") as f:
    json.dump({"config": config_identity.as_json(run_configs.resolved_config(module, arg, run))}, f)
  shutil.copy(os.path.join(straight["workdir"], "summary.json"), run_dir)
  argv = ["--config", spec, "--workdir", root, "--filter", "norm=layernorm"]
  assert sweep.main([*argv, "--set", "optim.learning_rate=0.5"]) == 2
  err = capsys.readouterr().err
  assert f"{run_dir}: the run finished at step 6 with another config" in err
  assert "optim.learning_rate: 0.003 -> 0.5" in err and "nothing was started" in err
  assert sweep.main([*argv, "--set", "optim.learning_rate=0.5", "--allow_config_change"]) == 2
  err = capsys.readouterr().err  # Not reported as done with the new config: refused.
  assert "The change was not applied" in err and "raise train.num_steps above 6" in err
  assert sweep.main([*argv, "--set", "optim.learning_rate=0.5", "--dry_run"]) == 0
  out, err = capsys.readouterr()  # The dry run shows both: not done with this config, refused.
  assert "# norm=layernorm [done with another config]" in out
  assert err.startswith("This launch would be refused:\n") and "nothing was started" in err
  os.rename(os.path.join(run_dir, "summary.json"), os.path.join(tmp_path, "summary.json"))
  assert sweep.main([*argv, "--set", "optim.learning_rate=0.5"]) == 2  # Unfinished: continuable.
  err = capsys.readouterr().err
  assert "1 run(s) already trained with another config" in err and "--allow_config_change" in err
  assert "optim.learning_rate 0.003 -> 0.5" in err
  os.rename(os.path.join(tmp_path, "summary.json"), os.path.join(run_dir, "summary.json"))
  assert not os.path.exists(os.path.join(run_dir, "log.txt"))
  assert sweep.main([*argv, "--set", "train.eval_every=7"]) == 0  # Operational: still done.
  assert "1 finished run(s) skipped; 0 to run." in capsys.readouterr().out


@pytest.mark.parametrize("overrides,match", [
  ({"data.seq_len": 0}, r"config.data.seq_len must be an int >= 1, got 0"),
  ({"data.seq_len": -4}, r"config.data.seq_len must be an int >= 1, got -4"),
  ({"data.seq_len": 64}, r"max_len=32 is shorter than the data's sequences \(64\) set by "
                         r"config.data.seq_len"),
  ({"data.vocab_size": 0}, r"config.data.vocab_size must be an int >= 1"),
])
def test_size_fields_are_config_errors_before_any_io(data_dir, tmp_path, overrides, match):
  with pytest.raises(train.ConfigError, match=match):
    train.train_and_evaluate(tiny_config(data_dir, **overrides), str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


# -- signals ------------------------------------------------------------------------------------
@pytest.mark.slow  # ~40 s: a child run whose eval is interrupted, then the resume.
def test_sigterm_during_a_long_eval_stops_after_the_current_batch(straight, data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  overrides = {"data_dir": data_dir, "train.eval_steps": 20}
  proc = run_child(workdir, overrides, mode="sigterm_in_eval", at=1)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout.split("RESULT", 1)[1]) == {"preempted": True, "step": 3}
  assert "EVAL_BATCHES 1 1" in proc.stdout  # 1 of 20 eval batches, then the save and exit.
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["3"]
  train.train_and_evaluate(tiny_config(data_dir, **{"train.eval_steps": 20}), workdir)
  assert _summary(workdir)["params_sha256"] == straight["sha"]


@pytest.mark.slow  # ~40 s: a CLI run compiled from an empty cache, interrupted.
@pytest.mark.filterwarnings("ignore:os.fork")  # preexec_fn: the child execs at once.
def test_ctrl_c_during_the_first_compile_exits_130_without_a_crash(data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  argv = [sys.executable, "-m", "experiments.main", "--config",
          "experiments/default.py:runlocal", "--workdir", workdir,
          f"--config.data.data_dir={data_dir}", "--config.train.progress_bar=False"]
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cache")}
  env.pop("XLA_FLAGS", None)
  # SIGINT as a terminal's Ctrl-C delivers it (a background shell may have ignored it).
  proc = subprocess.Popen(argv, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  lines = []
  for line in proc.stderr:
    lines.append(line)
    if ": new run;" in line:  # The next thing it does is compile the first step.
      time.sleep(1.0)
      proc.send_signal(signal.SIGINT)
      break
  rest = proc.communicate(timeout=120)[1]
  assert proc.returncode == 130, "".join(lines) + rest
  assert "Interrupted (Ctrl-C): stopped without saving" in rest and "Segmentation" not in rest
  assert not os.path.exists(os.path.join(workdir, "lock.json"))
  assert not glob.glob(os.path.join(REPO, "core*"))


def test_a_sweep_killed_with_sigkill_stops_its_runs_with_a_save(data_dir, tmp_path):
  """kill -9 of launch.sweep (or a closed terminal): its run gets SIGTERM from the kernel, saves
  and exits, so nothing trains on unwatched and the relaunch resumes instead of finding the
  point busy."""
  workdir = str(tmp_path / "sweep")
  run_dir = os.path.join(workdir, "norm=layernorm")
  argv = [sys.executable, "-m", "launch.sweep", "--config", "tests/launch/sweep_fixture.py",
          "--workdir", workdir, "--filter", "norm=layernorm",
          "--set", f"data.data_dir={data_dir}", "--set", "train.num_steps=100000",
          "--set", "train.checkpoint_every=0", "--set", "train.eval_every=0"]
  env = {**os.environ, "PYTHONPATH": REPO}
  env.pop("XLA_FLAGS", None)
  runner = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
  log = os.path.join(run_dir, "log.txt")
  deadline = time.monotonic() + 120
  try:
    while not (os.path.exists(log) and "\nstep " in open(log).read()):  # noqa: SIM115
      assert time.monotonic() < deadline and runner.poll() is None, "the run never trained"
      time.sleep(0.5)
  except AssertionError:
    runner.terminate()  # it stops its run
    raise
  child = json.load(open(os.path.join(run_dir, "lock.json")))["pid"]  # noqa: SIM115
  runner.send_signal(signal.SIGKILL)
  runner.wait()
  deadline = time.monotonic() + 60
  while os.path.exists(f"/proc/{child}") and "zombie" not in open(f"/proc/{child}/status").read():  # noqa: SIM115
    if time.monotonic() > deadline:
      os.kill(child, signal.SIGKILL)
      pytest.fail("the run trains on after its sweep was killed")
    time.sleep(0.5)
  with open(log) as f:
    text = f.read()
  assert "Preempted (SIGTERM): saved step" in text, text[-2000:]
  assert glob.glob(os.path.join(run_dir, "checkpoints", "*"))
  assert not os.path.exists(os.path.join(run_dir, "lock.json"))
