"""launch.tpu_vm and launch.gpu: the exact commands that --dry_run prints (no gcloud needed)."""

import os
import shlex
import subprocess
import sys

import pytest

from launch import gpu, sweep, tpu_vm

VM = ["--name", "attn-v5e", "--zone", "us-west4-a", "--project", "proj"]
SCOPE = "--zone=us-west4-a --project=proj"


def _dry(main, argv, capsys):
  main([*argv, "--dry_run"])
  return capsys.readouterr().out.strip().splitlines()


def test_create_on_demand_spot_and_queued(capsys):
  """The dry run shows the describe that create runs first and what each state leads to
  (test_create_recreates_a_preempted_spot_node runs that logic)."""
  base = ["create", *VM, "--accelerator", "v4-8", "--version", "tpu-ubuntu2204-base"]
  assert _dry(tpu_vm.main, base, capsys) == [
    f"gcloud compute tpus tpu-vm describe attn-v5e {SCOPE} '--format=value(state)'",
    f"# PREEMPTED or TERMINATED (a preemption): gcloud compute tpus tpu-vm delete attn-v5e {SCOPE}"
    " --quiet, then create; no such node: create; any other state: the node is up, no create",
    f"gcloud compute tpus tpu-vm create attn-v5e {SCOPE} --accelerator-type=v4-8 "
    "--version=tpu-ubuntu2204-base"]
  assert _dry(tpu_vm.main, [*base, "--spot"], capsys)[2].endswith(" --spot")
  assert _dry(tpu_vm.main, [*base, "--queued", "--spot"], capsys) == [
    f"gcloud compute tpus queued-resources describe attn-v5e {SCOPE} "
    "'--format=value(state.state)'",
    "# SUSPENDED or FAILED (a preemption): gcloud compute tpus queued-resources delete attn-v5e "
    f"{SCOPE} --force --quiet, then create; no such node: create; any other state: the node is "
    "up, no create",
    f"gcloud compute tpus queued-resources create attn-v5e --node-id=attn-v5e {SCOPE} "
    "--accelerator-type=v4-8 --runtime-version=tpu-ubuntu2204-base --spot",
    "# then the describe above every 30 s until ACTIVE (SUSPENDED or FAILED: stop)"]


def test_setup_copy_and_git(capsys):
  lines = _dry(tpu_vm.main, ["setup", *VM], capsys)
  scp, ssh = (shlex.split(line) for line in lines)
  assert scp[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", scp[5]]
  assert scp[5].endswith("attn-src.tar.gz")
  assert scp[6:] == ["attn-v5e:attn-src.tar.gz", "--zone=us-west4-a", "--project=proj",
                     "--worker=all"]
  assert ssh[:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "attn-v5e",
                     "--zone=us-west4-a", "--project=proj", "--worker=all"]
  assert ssh[9] == ("--command=set -e; mkdir -p ~/attn && tar xzf ~/attn-src.tar.gz -C ~/attn "
                    f"&& {tpu_vm.install_script()}")
  (line,) = _dry(tpu_vm.main, ["setup", *VM, "--repo", "https://x/attn.git", "--ref", "v1"],
                 capsys)
  script = shlex.split(line)[-1]
  assert script == ("--command=set -e; " + tpu_vm.checkout_script("https://x/attn.git", "v1") +
                    " && " + tpu_vm.install_script())
  assert "git clone -q https://x/attn.git ~/attn" in script


def test_install_gets_python_311_before_the_venv():
  """TPU images have Python 3.10: uv installs 3.11, an older .venv is replaced, the lock file's
  pins (when the tree has requirements/tpu.txt) go in, then the project without re-resolving."""
  steps = tpu_vm.install_script().split(" && ")
  assert steps[0].endswith("cd ~/attn")
  assert steps[1] == "uv python install -q 3.11"
  assert steps[2] == ("{ .venv/bin/python -c 'import sys; assert sys.version_info >= (3, 11)' "
                      "2>/dev/null || uv venv -q --clear --python 3.11 .venv; }")
  assert steps[3] == ("if [ -f requirements/tpu.txt ]; then uv pip install -q --python "
                      ".venv/bin/python -r requirements/tpu.txt")
  assert steps[4] == ("uv pip install -q --python .venv/bin/python --no-deps -e .; else uv pip "
                      "install -q --python .venv/bin/python -e '.[tpu]'; fi")
  assert "python3 -m venv" not in tpu_vm.install_script()


def _git(cwd, *argv):
  return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *argv], cwd=cwd,
                        check=True, capture_output=True, text=True).stdout.strip()


def test_ref_moves_an_existing_clone(tmp_path):
  """Setup twice with --ref main after origin moved on: the clone is at origin's new main (a
  plain `git checkout main` would stay on the old local branch); tags check out detached."""
  origin = tmp_path / "origin"
  origin.mkdir()
  _git(origin, "init", "-q", "-b", "main")
  (origin / "f").write_text("1")
  _git(origin, "add", "f")
  _git(origin, "commit", "-q", "-m", "one")
  _git(origin, "tag", "v1")
  clone = str(tmp_path / "attn")

  def setup(ref):
    subprocess.run(["bash", "-c", "set -e; " + tpu_vm.checkout_script(str(origin), ref, clone)],
                   check=True, capture_output=True)
    return _git(clone, "rev-parse", "HEAD")

  first = setup("main")
  (origin / "f").write_text("2")
  _git(origin, "commit", "-q", "-am", "two")
  assert first != setup("main") == _git(origin, "rev-parse", "main")
  assert _git(clone, "branch", "--show-current") == "main"
  assert setup("v1") == first
  assert _git(clone, "branch", "--show-current") == ""  # Detached at the tag.
  assert setup("main") == _git(origin, "rev-parse", "main")


def _fake_gcloud(monkeypatch, state):
  """subprocess.run that answers `describe` with `state` (None: no such node) and records all."""
  calls = []

  def run(cmd, **kwargs):
    calls.append(cmd)
    if "describe" in cmd:
      ok = state is not None
      return subprocess.CompletedProcess(cmd, 0 if ok else 1, stdout=f"{state}\n" if ok else "",
                                         stderr="" if ok else "NOT_FOUND")
    return subprocess.CompletedProcess(cmd, 0)

  monkeypatch.setattr(tpu_vm.subprocess, "run", run)
  return calls


def test_create_recreates_a_preempted_spot_node(monkeypatch, capsys):
  argv = ["create", *VM, "--spot"]
  create = tpu_vm.create_commands(tpu_vm.parse_args(argv))[0]
  delete = ["gcloud", "compute", "tpus", "tpu-vm", "delete", "attn-v5e", "--zone=us-west4-a",
            "--project=proj", "--quiet"]
  calls = _fake_gcloud(monkeypatch, "PREEMPTED")
  tpu_vm.main(argv)
  assert [c[4] for c in calls] == ["describe", "delete", "create"]
  assert calls[1:] == [delete, create]
  assert "attn-v5e is PREEMPTED; deleting and creating it again." in capsys.readouterr().out
  calls = _fake_gcloud(monkeypatch, "READY")
  tpu_vm.main(argv)
  assert [c[4] for c in calls] == ["describe"]
  calls = _fake_gcloud(monkeypatch, None)
  tpu_vm.main(argv)
  assert calls[1:] == [create]


def test_queued_suspended_is_recreated_and_waited_for(monkeypatch):
  states = iter(["SUSPENDED", "WAITING_FOR_RESOURCES", "ACTIVE"])
  calls = []

  def run(cmd, **kwargs):
    calls.append(cmd[3:5])
    out = next(states) if "describe" in cmd else ""
    return subprocess.CompletedProcess(cmd, 0, stdout=out, stderr="")

  monkeypatch.setattr(tpu_vm.subprocess, "run", run)
  monkeypatch.setattr(tpu_vm.time, "sleep", lambda s: None)
  tpu_vm.main(["create", *VM, "--queued", "--spot"])
  assert calls == [["queued-resources", "describe"], ["queued-resources", "delete"],
                   ["queued-resources", "create"], ["queued-resources", "describe"],
                   ["queued-resources", "describe"]]


def test_run_on_all_workers_with_safe_quoting(capsys):
  weird = 'train.sample_prompt=a b; rm -rf x "q"'
  lines = _dry(tpu_vm.main, ["run", *VM, "--config", "experiments/lm.py:size=base",
                             "--workdir", "/mnt/runs/lm", "--set", weird], capsys)
  start, follow = (shlex.split(line) for line in lines)
  assert start[:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "attn-v5e",
                       "--zone=us-west4-a", "--project=proj", "--worker=all"]
  script = start[9].removeprefix("--command=")
  assert script.startswith("mkdir -p ~/attn_logs && cd ~/attn && if [ -f ~/attn_logs/lm.pid ]")
  # The remote shell sees the argv quoted: splitting the nohup part gives it back exactly.
  launched = script.split("setsid nohup ", 1)[1].split(" >> ~/attn_logs/lm.log")[0]
  assert shlex.split(launched) == [
    ".venv/bin/python", "-m", "experiments.main", "--config", "experiments/lm.py:size=base",
    "--workdir", "/mnt/runs/lm", "--config.train.progress_bar=False",
    '--config.train.sample_prompt=a b; rm -rf x "q"']
  assert follow == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "attn-v5e", "--zone=us-west4-a",
                    "--project=proj", "--worker=0", "--command=tail -n 200 -F ~/attn_logs/lm.log"]


def test_run_a_sweep_point(capsys):
  point = "norm=rmsnorm,place=post,warmup=False,lr=0.001,seed=1"
  lines = _dry(tpu_vm.main, ["run", *VM, "--config", "experiments/norm_ablation.py",
                             "--workdir", "/mnt/runs/norm", "--seeds", "2", "--no_follow",
                             "--sweep_point", point], capsys)
  (start,) = lines
  script = shlex.split(start)[-1]
  launched = script.split("setsid nohup ", 1)[1].split(" >> ")[0]
  assert shlex.split(launched) == [
    ".venv/bin/python", "-m", "experiments.main", "--config",
    "experiments/norm_ablation.py:norm=rmsnorm,place=post,warmup=False,lr=0.001",
    "--workdir", "/mnt/runs/norm/norm=rmsnorm,place=post,warmup=False,lr=0.001,seed=1",
    "--config.train.progress_bar=False", "--config.seed=1"]


def test_sweep_logs_stop_delete(capsys):
  (start, _) = _dry(tpu_vm.main, ["sweep", *VM, "--config", "experiments/mqar.py",
                                  "--workdir", "runs/mqar", "--parallel", "4", "--seeds", "2"],
                    capsys)
  assert "--worker=0" in shlex.split(start)
  assert (".venv/bin/python -m launch.sweep --config experiments/mqar.py --workdir runs/mqar "
          "--parallel 4 --seeds 2") in start
  assert _dry(tpu_vm.main, ["logs", *VM, "--run", "lm", "--worker", "3"], capsys) == [
    f"gcloud compute tpus tpu-vm ssh attn-v5e {SCOPE} --worker=3 "
    "'--command=tail -n 200 -F ~/attn_logs/lm.log'"]
  assert _dry(tpu_vm.main, ["stop", *VM], capsys) == [
    f"gcloud compute tpus tpu-vm stop attn-v5e {SCOPE}"]
  assert _dry(tpu_vm.main, ["delete", *VM], capsys) == [
    f"gcloud compute tpus tpu-vm delete attn-v5e {SCOPE} --quiet"]
  assert _dry(tpu_vm.main, ["delete", *VM, "--queued"], capsys) == [
    f"gcloud compute tpus queued-resources delete attn-v5e {SCOPE} --force --quiet"]


def test_up_is_create_setup_run_follow(capsys):
  lines = _dry(tpu_vm.main, ["up", *VM, "--spot", "--config", "experiments/lm.py",
                             "--workdir", "/mnt/runs/lm"], capsys)
  assert [shlex.split(line)[3:5] for line in lines if not line.startswith("#")] == [
    ["tpu-vm", "describe"], ["tpu-vm", "create"], ["tpu-vm", "scp"], ["tpu-vm", "ssh"],
    ["tpu-vm", "ssh"], ["tpu-vm", "ssh"]]


def test_a_multi_host_slice_refuses_a_local_workdir_and_a_sweep(capsys):
  """Each worker would write its own /home/...: refused before any command, dry run or not.
  So is `sweep` (worker 0 alone cannot start a multi-host run)."""
  for command in ("up", "run"):
    argv = [command, *VM, "--accelerator", "v4-16", "--config", "experiments/lm.py"]
    with pytest.raises(SystemExit) as info:
      tpu_vm.main([*argv, "--workdir", "/home/me/runs/lm", "--dry_run"])
    assert info.value.code == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert ("--workdir /home/me/runs/lm is a path on each worker, but v4-16 is a multi-host "
            "slice") in out.err and "Use a gs:// workdir" in out.err
    assert "gs://B/runs/lm" in _dry(tpu_vm.main, [*argv, "--workdir", "gs://B/runs/lm"],
                                    capsys)[-2]
    assert _dry(tpu_vm.main, [*argv, "--workdir", "/mnt/nfs/lm", "--shared_workdir"], capsys)
  # A sweep runs on worker 0 alone: refused on a multi-host slice, whatever the workdir.
  sweep_argv = ["sweep", *VM, "--config", "experiments/lm.py", "--workdir", "gs://B/s", "--dry_run"]
  with pytest.raises(SystemExit) as info:
    tpu_vm.main([*sweep_argv, "--accelerator", "v4-16"])
  err = capsys.readouterr().err
  assert info.value.code == 2 and "v4-16 is a multi-host slice" in err
  assert "`run --sweep_point NAME`" in err
  assert _dry(tpu_vm.main, [*sweep_argv, "--accelerator", "v4-8"], capsys)
  # One run per chip: a v4-8 has 4 chips (its name counts TensorCores), a v5litepod-8 has 8.
  with pytest.raises(SystemExit):
    tpu_vm.main([*sweep_argv, "--accelerator", "v4-8", "--parallel", "8"])
  assert "--parallel 8: v4-8 has 4 TPU chip(s)" in capsys.readouterr().err
  assert _dry(tpu_vm.main, [*sweep_argv, "--accelerator", "v4-8", "--parallel", "4"], capsys)
  assert _dry(tpu_vm.main, [*sweep_argv, "--accelerator", "v5litepod-8", "--parallel", "8"],
              capsys)
  assert [tpu_vm.host_chips(a) for a in ("v4-8", "v5p-8", "v3-8", "v5litepod-4", "v6e-8",
                                         "v4-16", "custom")] == [4, 4, 4, 4, 8, None, None]
  assert [tpu_vm.multi_host(a) for a in ("v4-8", "v4-16", "v5litepod-8", "v5litepod-16",
                                          "v5p-8", "v6e-256", "v3-32", "custom")] == [
    False, True, False, True, False, True, True, False]


def test_pack_tree_takes_what_git_sees(tmp_path):
  path = str(tmp_path / "src.tar.gz")
  count = tpu_vm.pack_tree(path)
  import tarfile

  names = tarfile.open(path).getnames()
  assert count == len(names) > 10
  assert "launch/tpu_vm.py" in names and "pyproject.toml" in names
  assert not any(n.startswith((".venv/", "runs/")) for n in names)


def test_sbatch_script_and_command(capsys):
  lines = _dry(gpu.main, ["sbatch", "--nodes", "4", "--gpus_per_node", "8", "--partition", "a100",
                          "--time", "12:00:00", "--config", "experiments/lm.py:size=base",
                          "--workdir", "/shared/runs/lm", "--set", "train.batch_size=512"], capsys)
  assert lines[0] == "# /shared/runs/lm/job.sbatch"
  assert lines[-1] == "sbatch /shared/runs/lm/job.sbatch"
  script = [line for line in lines[1:-1] if line]
  for expected in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                   "#SBATCH --cpus-per-task=8",
                   "#SBATCH --time=12:00:00", "#SBATCH --partition=a100", "#SBATCH --requeue",
                   "#SBATCH --signal=TERM@300", "#SBATCH --output=/shared/runs/lm/slurm-%j.out",
                   f"cd {sweep.REPO}"):
    assert expected in script
  assert script[-1] == ("srun --kill-on-bad-exit=1 .venv/bin/python -m experiments.main "
                        "--config experiments/lm.py:size=base --workdir /shared/runs/lm "
                        "--config.train.progress_bar=False --config.train.batch_size=512")


def test_sbatch_with_a_bucket_workdir_keeps_slurm_files_on_the_cluster(capsys):
  """SLURM opens neither a gs:// script nor a gs:// --output: they go to <checkout>/slurm/<run>
  (or --job_dir), and only the training workdir is the bucket."""
  argv = ["sbatch", "--config", "experiments/lm.py", "--workdir", "gs://B/runs/lm/"]
  lines = [line for line in _dry(gpu.main, argv, capsys) if line]
  job = os.path.join(sweep.REPO, "slurm", "lm")
  assert lines[0] == f"# {job}/job.sbatch"
  assert lines[-1] == f"sbatch {job}/job.sbatch"
  assert f"#SBATCH --output={job}/slurm-%j.out" in lines
  assert lines[-2].endswith("--workdir gs://B/runs/lm/ --config.train.progress_bar=False")
  assert not any("gs://" in line for line in lines[:-2])
  lines = _dry(gpu.main, [*argv, "--job_dir", "/shared/jobs/lm"], capsys)
  assert (lines[0], lines[-1]) == ("# /shared/jobs/lm/job.sbatch",
                                   "sbatch /shared/jobs/lm/job.sbatch")
  assert "#SBATCH --output=/shared/jobs/lm/slurm-%j.out" in lines


def test_sbatch_refuses_a_missing_interpreter(tmp_path, monkeypatch, capsys):
  """Without the checkout's .venv the job would fail on every node after waiting in the queue:
  refused before anything is written, naming `make venv LOCK=cuda` and --python."""
  calls = []
  monkeypatch.setattr(gpu.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or
                      subprocess.CompletedProcess(cmd, 0))
  base = ["sbatch", "--config", "experiments/lm.py", "--workdir", str(tmp_path / "w")]
  assert gpu.main([*base, "--python", "no/such/python"]) == 2
  err = capsys.readouterr().err
  assert f"--python: {sweep.REPO}/no/such/python does not exist" in err
  assert "make venv LOCK=cuda" in err and calls == [] and not (tmp_path / "w").exists()
  assert gpu.main([*base, "--python", sys.executable]) == 0
  assert calls == [["sbatch", str(tmp_path / "w" / "job.sbatch")]]
  assert shlex.split((tmp_path / "w" / "job.sbatch").read_text().splitlines()[-1])[2] == (
    sys.executable)


def test_local_processes_get_the_coordinator_variables(capsys):
  lines = _dry(gpu.main, ["local", "--processes", "2", "--port", "23456",
                          "--devices_per_process", "2", "--config",
                          "experiments/default.py:runlocal", "--workdir", "runs/two"], capsys)
  assert [shlex.split(line) for line in lines] == [
    ["JAX_COORDINATOR_ADDRESS=127.0.0.1:23456", "JAX_NUM_PROCESSES=2", f"JAX_PROCESS_ID={i}",
     "XLA_FLAGS=--xla_force_host_platform_device_count=2", gpu.sys.executable, "-m",
     "experiments.main", "--config", "experiments/default.py:runlocal", "--workdir", "runs/two"]
    for i in range(2)]


def test_dry_runs_never_call_gcloud(monkeypatch, capsys):
  def refuse(*args, **kwargs):
    raise AssertionError(f"subprocess called: {args}")

  monkeypatch.setattr(subprocess, "run", refuse)
  monkeypatch.setattr(subprocess, "Popen", refuse)
  _dry(tpu_vm.main, ["up", *VM, "--queued", "--config", "experiments/lm.py", "--workdir", "w"],
       capsys)
  _dry(gpu.main, ["sbatch", "--config", "experiments/lm.py", "--workdir", "w"], capsys)


def test_install_script_runs(tmp_path):
  """The setup script under bash with a fake `uv` on PATH: a 3.10 .venv is replaced, a good one
  kept; the lock file, when present, is what gets installed."""
  home, attn, bin_ = tmp_path / "home", tmp_path / "home" / "attn", tmp_path / "bin"
  for d in (attn / ".venv" / "bin", bin_):
    d.mkdir(parents=True)
  old = attn / ".venv" / "bin" / "python"
  old.write_text("#!/bin/sh\nexit 1\n")  # What the image's Python 3.10 answers to the check.
  old.chmod(0o755)
  log = tmp_path / "uv.log"
  (bin_ / "uv").write_text(
    f'#!/bin/bash\necho "$*" >> {log}\n'
    f'if [ "$1" = venv ]; then ln -sf {sys.executable} .venv/bin/python; fi\n')
  (bin_ / "uv").chmod(0o755)

  def setup():
    log.write_text("")
    subprocess.run(["bash", "-c", "set -e; " + tpu_vm.install_script()], check=True,
                   env={"HOME": str(home), "PATH": f"{bin_}:/usr/bin:/bin"})
    return log.read_text().splitlines()

  py = "--python .venv/bin/python"
  assert setup() == ["python install -q 3.11", "venv -q --clear --python 3.11 .venv",
                     f"pip install -q {py} -e .[tpu]"]
  (attn / "requirements").mkdir()
  (attn / "requirements" / "tpu.txt").write_text("jax==0.10.0\n")
  assert setup() == ["python install -q 3.11", f"pip install -q {py} -r requirements/tpu.txt",
                     f"pip install -q {py} --no-deps -e ."]
