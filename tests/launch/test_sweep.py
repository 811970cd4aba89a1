"""launch.sweep: argv safety, run states, dry runs, and one real tiny sweep end to end."""

import csv
import json
import os
import shlex
import tempfile
import time

import pytest

from launch import devices, grid, sweep

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sweep_fixture.py")
WEIRD = 'a b; rm -rf x "q" $(echo hi) `id` & | > y'


def test_split_spec():
  assert sweep.split_spec("experiments/lm.py:size=small,runlocal") == (
    "experiments/lm.py", "size=small,runlocal")
  assert sweep.split_spec("experiments/lm.py") == ("experiments/lm.py", None)


def test_child_argv_is_a_list_with_values_intact():
  point = {"arg.norm": "rmsnorm", "train.sample_prompt": WEIRD, "optim.learning_rate": 3e-4,
           "model.use_bias": False, "seed": 1}
  argv = sweep.child_argv(FIXTURE + ":steps=3", "/w/run", point, extra=[f"data.name={WEIRD}"])
  assert argv[1:5] == ["-m", "experiments.main", "--config", f"{FIXTURE}:steps=3,norm=rmsnorm"]
  assert argv[5:7] == ["--workdir", "/w/run"]
  assert argv[7:] == ["--config.train.progress_bar=False", f"--config.train.sample_prompt={WEIRD}",
                      "--config.optim.learning_rate=0.0003", "--config.model.use_bias=False",
                      "--config.seed=1", f"--config.data.name={WEIRD}"]


def test_status_of_run_directories(tmp_path):
  states = {"a": [], "b": ["error.json"], "c": ["checkpoints/"], "d": ["summary.json",
                                                                     "error.json"],
            "e": ["checkpoints/", "summary.json"]}
  for run, files in states.items():
    for name in files:
      path = tmp_path / run / name
      path.parent.mkdir(parents=True, exist_ok=True)
      if name.endswith("/"):
        path.mkdir()
      else:
        path.write_text('{"step": 4, "metrics": {}}' if run == "d" else "{")
  # e: a damaged summary.json is not "done"; the relaunched run recomputes it.
  assert [sweep.status(str(tmp_path / r)) for r in "abcde"] == [
    "pending", "failed", "interrupted", "done", "interrupted"]
  assert sweep.status(str(tmp_path / "missing")) == "pending"


def test_plan_names_filters_and_rejects_typos(tmp_path):
  runs = sweep.plan(FIXTURE, seeds=2)
  assert [r.name for r in runs] == ["norm=layernorm,seed=0", "norm=layernorm,seed=1",
                                    "norm=rmsnorm,seed=0", "norm=rmsnorm,seed=1",
                                    "norm=nonsense,seed=0"]
  assert [r.variant for r in runs] == ["norm=layernorm"] * 2 + ["norm=rmsnorm"] * 2 + [
    "norm=nonsense"]
  assert [r.name for r in sweep.plan(FIXTURE, seeds=2, filters=["rms", "seed=1"])] == [
    "norm=rmsnorm,seed=1"]
  bad = tmp_path / "bad.py"
  bad.write_text(open(FIXTURE).read().replace('"arg.norm": "nonsense"', '"model.nrom": "x"'))
  with pytest.raises(ValueError, match="model.nrom"):
    sweep.plan(str(bad))


def test_dry_run_prints_commands_and_runs_nothing(tmp_path, capsys):
  assert sweep.main(["--config", FIXTURE, "--workdir", str(tmp_path), "--dry_run",
                     "--filter", "layernorm", "--set", f"train.sample_prompt={WEIRD}"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == "# norm=layernorm [pending]"
  assert shlex.split(lines[1])[1:] == [
    "-m", "experiments.main", "--config", f"{FIXTURE}:norm=layernorm",
    "--workdir", str(tmp_path / "norm=layernorm"), "--config.train.progress_bar=False",
    f"--config.train.sample_prompt={WEIRD}"]
  assert os.listdir(tmp_path) == []


def test_a_file_that_is_no_sweep_is_one_line_naming_the_fix(tmp_path, capsys):
  """Exit status 2 and a `Config error:` line, no traceback, before anything is written."""
  argv = ["--workdir", str(tmp_path / "w"), "--dry_run", "--config"]
  assert sweep.main([*argv, "experiments/lm.py"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("Config error: ") and "lm.py has no get_sweep(); it is not a sweep" in err
  assert "python -m experiments.main --config FILE" in err
  assert sweep.main([*argv, str(tmp_path / "nope.py")]) == 2
  assert capsys.readouterr().err == f"Config error: No experiment file {tmp_path / 'nope.py'}.\n"
  for not_python in (tmp_path, "README.md"):
    assert sweep.main([*argv, str(not_python)]) == 2
    assert "is not an experiment file: a .py file with get_config()" in capsys.readouterr().err
  bad = tmp_path / "bad.py"
  bad.write_text(open(FIXTURE).read().replace('"arg.norm": "nonsense"', '"model.nrom": "x"'))
  assert sweep.main([*argv, str(bad)]) == 2
  assert "model.nrom" in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "w")


def test_a_set_is_refused_where_it_overrides_a_swept_field_or_breaks_a_valid_run(tmp_path,
                                                                                 capsys):
  """Checked for every run before any starts (the dry run too): a --set of the field the sweep
  varies would train every point with one value under its own name; one that the trainer would
  refuse for a run whose own config is valid would fail every run after starting it."""
  argv = ["--config", FIXTURE, "--workdir", str(tmp_path / "w"), "--dry_run", "--set"]
  assert sweep.main([*argv, "model.norm=rmsnorm"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("Config error: --set 'model.norm=rmsnorm': the sweep varies model.norm "
                        '("layernorm", "nonsense", "rmsnorm")') and "--filter" in err
  # The nonsense point is refused by the trainer with or without the --set: it fails as that
  # run (the end-to-end test); the valid points name the --set.
  assert sweep.main([*argv, "optim.warmup_steps=100000"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("Config error: --set optim.warmup_steps=100000: config.optim."
                        "warmup_steps (100000) exceeds the decay length") and \
      "(run norm=layernorm)" in err
  assert sweep.main([*argv, "train.eval_every=3"]) == 0  # A valid --set passes.
  assert not os.path.exists(tmp_path / "w")


def test_arguments_are_checked():
  with pytest.raises(SystemExit):
    sweep.parse_args(["--workdir", "w"])  # no --config
  with pytest.raises(SystemExit):
    sweep.parse_args(["--config", FIXTURE, "--workdir", "w", "--set", "no_equals"])


def test_tiny_sweep_end_to_end(tmp_path, monkeypatch, capsys):
  """2 norms x 2 seeds of 4 steps + 1 failing run, 2 at a time; then a rerun skips them."""
  cache = os.path.join(tempfile.gettempdir(), f"attn-tests-jax-cache-{os.getuid()}")
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", cache)
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("XLA_FLAGS", "")  # one device per run, not the tests' eight
  root = tmp_path / "sweep"
  sentinel = tmp_path / "pwned"
  weird = f'a b; touch {sentinel}; rm -rf x "q" $(touch {sentinel})'
  argv = ["--config", FIXTURE, "--workdir", str(root), "--parallel", "2", "--seeds", "2",
          "--set", f"train.sample_prompt={weird}"]

  assert sweep.main(argv) == 1  # one run failed, the others finished
  out = capsys.readouterr().out
  assert "1 run(s) failed" in out and "norm=nonsense,seed=0" in out
  assert not sentinel.exists()

  with open(root / "results.csv") as f:
    rows = {r["name"]: r for r in csv.DictReader(f)}
  assert sorted(rows) == ["norm=layernorm,seed=0", "norm=layernorm,seed=1",
                          "norm=nonsense,seed=0", "norm=rmsnorm,seed=0", "norm=rmsnorm,seed=1"]
  for name, row in rows.items():
    if "nonsense" in name:
      assert row["status"] == "failed"
      assert "nonsense" in row["error"], row["error"]
    else:
      assert row["status"] == "done" and row["step"] == "4"
      assert float(row["loss"]) > 0 and float(row["accuracy"]) >= 0
      with open(root / name / "summary.json") as f:
        config = json.load(f)["config"]
      assert config["train"]["sample_prompt"] == weird  # reached the child intact
      assert config["seed"] == int(name[-1])
      assert config["model"]["norm"] == name.split(",")[0].split("=")[1]
  # Seeds differ, so do the numbers; the table shows mean +- std for both variants.
  assert rows["norm=rmsnorm,seed=0"]["loss"] != rows["norm=rmsnorm,seed=1"]["loss"]
  with open(root / "results.md") as f:
    table = f.read()
  assert "| variant | runs | loss | accuracy |" in table
  assert "| `norm=layernorm`" in table and "| `norm=rmsnorm`" in table
  assert "(best) | 2/2 | **" in table
  assert " ± " in table
  assert "| `norm=nonsense` | 0/1 | - |" in table
  assert "Runs: 4 done, 1 failed." in table
  for png in ("final_loss.png", "curves_loss.png"):
    assert (root / png).read_bytes()[:4] == b"\x89PNG"
  with open(root / "norm=nonsense,seed=0" / "error.json") as f:
    error = json.load(f)
  assert error["returncode"] != 0 and error["argv"][-1] == f"--config.train.sample_prompt={weird}"

  # Rerun of the finished runs: nothing starts, the report is rewritten.
  start = time.monotonic()
  assert sweep.main([*argv, "--filter", "norm=(layernorm|rmsnorm)"]) == 0
  assert time.monotonic() - start < 30
  out = capsys.readouterr().out
  assert "4 finished run(s) skipped; 0 to run." in out
  assert "start" not in out
  with open(root / "norm=layernorm,seed=0" / "log.txt") as f:
    assert f.read().count("=== ") == 1  # launched once
  assert (root / "results.md").read_text().count("(best)") == 1


def test_report_alone_needs_only_the_workdir(tmp_path, capsys):
  runs = [sweep.Run("norm=a,seed=0", {"arg.norm": "a", "seed": 0}, "norm=a")]
  sweep.write_plan(str(tmp_path), FIXTURE, runs, "loss")
  assert sweep.main(["--workdir", str(tmp_path), "--report"]) == 0
  assert "| `norm=a` | 0/1 | - |" in capsys.readouterr().out
  assert (tmp_path / "results.csv").exists()
  assert grid.SEED_KEY == "seed"


def test_parallel_children_share_the_gpus():
  two = ["0", "1"]
  assert [devices.child_env(s, 2, two, {}) for s in range(2)] == [
    {"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}]  # One GPU each, all memory.
  assert devices.child_env(3, 4, two, {}) == {"CUDA_VISIBLE_DEVICES": "1",
                                            "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.450"}
  assert devices.child_env(2, 3, ["7"], {}) == {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.300"}
  mine = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.2"}
  assert devices.child_env(0, 3, ["7"], mine) == {}  # The user's setting is kept.
  assert devices.child_env(0, 1, ["0"], {}) == {}  # One run at a time: JAX's defaults.
  assert devices.child_env(1, 4, [], {}) == {}  # CPU: nothing to split.
  assert devices.visible_gpus({"CUDA_VISIBLE_DEVICES": "2, 3"}) == ["2", "3"]


class _FakeChild:
  """subprocess.Popen's stand-in: records the child's workdir and environment, ends at the
  second poll."""

  started: list = []
  returncode = 0

  def __init__(self, argv, env, **kwargs):
    self.started.append((argv[argv.index("--workdir") + 1], env))
    self.polls = 0

  def poll(self):
    self.polls += 1
    return 0 if self.polls > 1 else None


def _execute(tmp_path, monkeypatch, parallel: int) -> tuple[list, list, list]:
  """execute() with fake processes: (runs, [(workdir, env) of each child], echoed lines)."""
  monkeypatch.setattr(_FakeChild, "started", [])
  monkeypatch.setattr(sweep.subprocess, "Popen", _FakeChild)
  runs = sweep.plan(FIXTURE)
  lines = []
  sweep.execute(FIXTURE, str(tmp_path), runs, parallel=parallel, echo=lines.append)
  return runs, _FakeChild.started, lines


def test_each_child_process_gets_its_gpu(tmp_path, monkeypatch):
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
  monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
  runs, started, lines = _execute(tmp_path, monkeypatch, parallel=2)
  gpus = {os.path.basename(w): env["CUDA_VISIBLE_DEVICES"] for w, env in started}
  assert gpus == {runs[0].name: "4", runs[1].name: "5", runs[2].name: "4"}
  assert all("XLA_PYTHON_CLIENT_MEM_FRACTION" not in env for _, env in started)
  assert lines[0] == f"[1/3] start {runs[0].name} (CUDA_VISIBLE_DEVICES=4)"
  header = (tmp_path / runs[1].name / sweep.LOG_FILE).read_text().splitlines()[0]
  assert '{"CUDA_VISIBLE_DEVICES": "5"} [' in header


def test_parallel_children_on_a_tpu_vm_get_chips_of_their_own():
  four = ["0", "1", "2", "3"]
  pairs = [devices.child_env(s, 2, [], {}, chips=four) for s in range(2)]
  assert pairs[0] == {"TPU_VISIBLE_CHIPS": "0,1", "TPU_CHIPS_PER_PROCESS_BOUNDS": "1,2,1",
                      "TPU_PROCESS_BOUNDS": "1,1,1", "TPU_PROCESS_PORT": "8476",
                      "TPU_PROCESS_ADDRESSES": "localhost:8476", "CLOUD_TPU_TASK_ID": "0",
                      "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
  assert {k: pairs[1][k] for k in ("TPU_VISIBLE_CHIPS", "TPU_PROCESS_PORT")} == {
    "TPU_VISIBLE_CHIPS": "2,3", "TPU_PROCESS_PORT": "8477"}
  # Three runs on four chips: one chip each (the fourth idles); a 2x4 host in halves.
  assert [devices.child_env(s, 3, [], {}, chips=four)["TPU_VISIBLE_CHIPS"] for s in range(3)] == [
    "0", "1", "2"]
  assert devices.child_env(2, 3, [], {}, chips=four)["TPU_CHIPS_PER_PROCESS_BOUNDS"] == "1,1,1"
  half = devices.child_env(1, 2, [], {}, chips=[str(c) for c in range(8)])
  assert (half["TPU_VISIBLE_CHIPS"], half["TPU_CHIPS_PER_PROCESS_BOUNDS"]) == ("4,5,6,7", "2,2,1")
  assert devices.child_env(0, 1, [], {}, chips=four) == {}  # One run: all chips, JAX's defaults.
  assert devices.visible_tpu_chips({"TPU_VISIBLE_CHIPS": "4, 5"}) == ["4", "5"]


def test_each_child_process_on_a_tpu_vm_gets_its_chips(tmp_path, monkeypatch, capsys):
  from jax._src import hardware_utils

  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # No GPUs, even where nvidia-smi finds some.
  monkeypatch.delenv("TPU_VISIBLE_CHIPS", raising=False)
  monkeypatch.setattr(hardware_utils, "num_available_tpu_chips_and_device_id",
                      lambda: (4, hardware_utils.TpuVersion.v4))  # A v4-8 host's PCI bus.
  runs, started, lines = _execute(tmp_path, monkeypatch, parallel=2)
  chips = {os.path.basename(w): (env["TPU_VISIBLE_CHIPS"], env["TPU_PROCESS_PORT"])
           for w, env in started}
  # The third run takes the slot (chips and port) that the first one freed.
  assert chips == {runs[0].name: ("0,1", "8476"), runs[1].name: ("2,3", "8477"),
                   runs[2].name: ("0,1", "8476")}
  assert all(env["TPU_CHIPS_PER_PROCESS_BOUNDS"] == "1,2,1" for _, env in started)
  assert lines[0].startswith(f"[1/3] start {runs[0].name} (TPU_VISIBLE_CHIPS=0,1 ")
  monkeypatch.setattr(_FakeChild, "started", [])
  assert sweep.main(["--config", FIXTURE, "--workdir", str(tmp_path / "x"),
                     "--parallel", "5"]) == 2
  assert _FakeChild.started == []  # Refused before any run started.
  assert ("--parallel 5: this TPU VM has 4 chip(s) (0, 1, 2, 3) and a chip serves one process; "
          "use --parallel 4 or less.") in capsys.readouterr().err


class _ChildMeanwhileRefused(_FakeChild):
  """A child during whose run a second sweep's refused launch left error.json in its folder."""

  def __init__(self, argv, env, **kwargs):
    super().__init__(argv, env, **kwargs)
    with open(os.path.join(self.started[-1][0], sweep.ERROR_FILE), "w") as f:
      json.dump({"returncode": 1, "error": "... is in use by pid 1 ..."}, f)


def test_a_run_in_use_is_not_started_and_nothing_is_written_into_it(tmp_path, monkeypatch,
                                                                    capsys):
  from tests.train.conftest import lock_holder

  busy, free = (str(tmp_path / name) for name in ("norm=layernorm", "norm=rmsnorm"))
  os.makedirs(busy)
  with open(os.path.join(busy, sweep.LOG_FILE), "w") as f:  # The first sweep's child.
    f.write("step 2/4: loss 5.52, tok/s 1.2e+03, eta 2s\n")
  holder = lock_holder(busy)
  monkeypatch.setattr(_FakeChild, "started", [])
  monkeypatch.setattr(sweep.subprocess, "Popen", _ChildMeanwhileRefused)
  try:
    before = {n: os.path.getsize(os.path.join(busy, n)) for n in os.listdir(busy)}
    assert sweep.main(["--config", FIXTURE, "--workdir", str(tmp_path),
                       "--filter", "norm=(layernorm|rmsnorm)"]) == 1
    out = capsys.readouterr().out
    assert f"busy norm=layernorm: in use by pid {holder.pid} on host" in out
    assert "1 run(s) in use by another launch, not started" in out and "loss 5.52" not in out
    assert {n: os.path.getsize(os.path.join(busy, n)) for n in os.listdir(busy)} == before
    assert [w for w, _ in _FakeChild.started] == [free]
    # The run that finished removed the error.json a refused launch left meanwhile.
    assert not os.path.exists(os.path.join(free, sweep.ERROR_FILE))
  finally:
    holder.kill()
    holder.wait()
