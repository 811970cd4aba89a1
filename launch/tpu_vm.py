"""Cloud TPU VMs: create, set up, run on every worker, follow the logs, stop and delete.

    python -m launch.tpu_vm up --name attn-v5e --zone us-west4-a \
        --accelerator v5litepod-8 --version v2-alpha-tpuv5-lite [--spot | --queued] \
        --config experiments/lm.py:size=base --workdir /home/$USER/runs/lm \
        --set data.data_dir=gs://BUCKET/tensorflow_datasets
    python -m launch.tpu_vm logs   --name attn-v5e --zone us-west4-a --run lm
    python -m launch.tpu_vm delete --name attn-v5e --zone us-west4-a [--queued]

Subcommands: create (on-demand, `--spot`, or `--queued` for a queued resource, waiting until it
is ACTIVE), setup (on all workers: the copied working tree, or `--repo URL --ref REF` cloned
and moved to REF's latest commit; then Python 3.11 from `uv` (TPU images ship 3.10) and
~/attn/.venv with `.[tpu]`, pinned by requirements/tpu.txt when the tree has it), run
(experiments.main on all workers with the same command; `--sweep_point NAME` runs one point of
the experiment's sweep), sweep (launch.sweep on worker 0: single-host slices only, refused on a
multi-host one), logs, stop, delete, and up (create if missing + setup + run). `--dry_run`
prints every gcloud command and runs none (create's `describe`, with what each state leads to
as comments).

Every host runs the same `python -m experiments.main` command; JAX finds its peers on a pod
slice by itself (attn.train.distributed), so nothing here passes ranks. On a multi-host slice the
workdir must be a directory every worker sees (a gs:// bucket path, a gcsfuse mount, or NFS),
since Orbax writes one checkpoint from all hosts. `run` and `up` refuse a local-looking workdir
on a multi-host `--accelerator` unless `--shared_workdir` says it is such a mount.

The same command is always safe to run again: `create` skips a VM that is up, and deletes and
recreates one that a spot preemption left PREEMPTED (a queued resource left SUSPENDED or
FAILED); `run` refuses to start a second copy of a run that is still alive and otherwise resumes
from the workdir. After a spot preemption, run `up` again.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence

from attn import storage
from launch import grid, run_configs, sweep

REMOTE_DIR = "~/attn"  # On every worker; the run's code and .venv live here.
PYTHON = "3.11"  # The project's oldest supported Python; TPU VM images have 3.10.
# States after which a node must be deleted before it can be created again (spot preemption).
DEAD_STATES = {"tpu-vm": ("PREEMPTED", "TERMINATED"), "queued": ("SUSPENDED", "FAILED")}
WAIT_POLL_S = 30.0  # How often a queued resource's state is checked until it is ACTIVE.
LOG_DIR = "~/attn_logs"
SOURCE_TARBALL = "attn-src.tar.gz"


def multi_host(accelerator: str) -> bool:
  """Whether an accelerator type spans several TPU VM hosts: above 8 in its name (TensorCores
  for v2-v4 and v5p, chips for v5litepod / v6e; one host has at most 8 of either), e.g. v4-16,
  v5litepod-16. An unrecognized name counts as single-host."""
  size = accelerator.rpartition("-")[2]
  return size.isdigit() and int(size) > 8


def host_chips(accelerator: str) -> int | None:
  """TPU chips of a single-host accelerator type, or None if unknown: v2-v4 and v5p names count
  TensorCores (two a chip), v5litepod / v5e / v6e names count chips."""
  family, _, size = accelerator.rpartition("-")
  if not size.isdigit() or multi_host(accelerator):
    return None
  if family in ("v2", "v3", "v4", "v5p"):
    return max(int(size) // 2, 1)
  if family in ("v5litepod", "v5e", "v6e"):
    return int(size)
  return None


def _scope(args: argparse.Namespace) -> list[str]:
  """--zone and --project, which every gcloud command takes."""
  out = [f"--zone={args.zone}"]
  if args.project:
    out.append(f"--project={args.project}")
  return out


def create_commands(args: argparse.Namespace) -> list[list[str]]:
  """`tpu-vm create` (on-demand or --spot), or a queued-resource request."""
  if args.queued:
    cmd = ["gcloud", "compute", "tpus", "queued-resources", "create", args.name,
           f"--node-id={args.name}", *_scope(args), f"--accelerator-type={args.accelerator}",
           f"--runtime-version={args.version}"]
  else:
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", "create", args.name, *_scope(args),
           f"--accelerator-type={args.accelerator}", f"--version={args.version}"]
  if args.spot:
    cmd.append("--spot")
  return [cmd]


def create_plan(args: argparse.Namespace, create: list[str]) -> list[str]:
  """What `_create` does, as --dry_run prints it: the describe it runs, then what each answer
  leads to (comments), then the create itself."""
  kind = "queued" if args.queued else "tpu-vm"
  dead = " or ".join(DEAD_STATES[kind])
  lines = [shlex.join(describe_command(args)),
           f"# {dead} (a preemption): {shlex.join(delete_command(args))}, then create; "
           "no such node: create; any other state: the node is up, no create",
           shlex.join(create)]
  if args.queued:
    lines.append(f"# then the describe above every {WAIT_POLL_S:.0f} s until ACTIVE ({dead}: stop)")
  return lines


def describe_command(args: argparse.Namespace) -> list[str]:
  """Prints the VM's (or queued resource's) state; fails if it does not exist."""
  if args.queued:
    return ["gcloud", "compute", "tpus", "queued-resources", "describe", args.name, *_scope(args),
            "--format=value(state.state)"]
  return ["gcloud", "compute", "tpus", "tpu-vm", "describe", args.name, *_scope(args),
          "--format=value(state)"]


def ssh_command(args: argparse.Namespace, script: str, worker: str = "all") -> list[str]:
  """Runs a remote shell script on the workers. The script is one argv element: no local shell
  ever sees it, and every value inside it was quoted with shlex.quote."""
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.name, *_scope(args),
          f"--worker={worker}", f"--command={script}"]


def install_script() -> str:
  """uv (pip --user, else its installer), Python 3.11, then .venv: the lock file's exact pins and
  the project without resolving again when the tree has requirements/tpu.txt (as `make` does),
  else `.[tpu]` resolved by uv. A .venv of an older Python (an
  earlier setup with the image's 3.10) is replaced; a good one is updated in place, so that a run
  still alive on the worker keeps its environment."""
  py = ".venv/bin/python"
  return (f'export PATH="$HOME/.local/bin:$PATH"; '
          "command -v uv >/dev/null || python3 -m pip install -q --user uv "
          "|| curl -LsSf https://astral.sh/uv/install.sh | sh; "
          f"cd {REMOTE_DIR} && uv python install -q {PYTHON} && "
          f"{{ {py} -c 'import sys; assert sys.version_info >= ({PYTHON.replace('.', ', ')})' "
          f"2>/dev/null || uv venv -q --clear --python {PYTHON} .venv; }} && "
          f"if [ -f requirements/tpu.txt ]; then uv pip install -q --python {py} "
          f"-r requirements/tpu.txt && uv pip install -q --python {py} --no-deps -e .; "
          f"else uv pip install -q --python {py} -e '.[tpu]'; fi")


def checkout_script(repo: str, ref: str, path: str = REMOTE_DIR) -> str:
  """Clones `repo` once, then moves `path` to the newest `ref` on every setup: a branch is reset
  to origin's (`--ref main` really gets today's main), a tag or commit is checked out detached."""
  q_ref, remote = shlex.quote(ref), shlex.quote(f"origin/{ref}")
  return (f"if [ ! -d {path}/.git ]; then git clone -q {shlex.quote(repo)} {path}; fi && "
          f"cd {path} && git fetch -q --tags --force origin && "
          f"if git rev-parse -q --verify {remote} >/dev/null; then "
          f"git checkout -q -f -B {q_ref} {remote}; else git checkout -q -f --detach {q_ref}; fi")


def setup_commands(args: argparse.Namespace, tarball: str | None = None) -> list[list[str]]:
  """Code on every worker (scp of a tarball of the tree, or git clone of --repo at --ref), then
  Python 3.11 and the virtualenv (install_script)."""
  install = install_script()
  if args.repo:
    return [ssh_command(args, f"set -e; {checkout_script(args.repo, args.ref)} && {install}")]
  tarball = tarball or os.path.join(tempfile.gettempdir(), SOURCE_TARBALL)
  copy = ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, f"{args.name}:{SOURCE_TARBALL}",
          *_scope(args), "--worker=all"]
  unpack = (f"set -e; mkdir -p {REMOTE_DIR} && tar xzf ~/{SOURCE_TARBALL} -C {REMOTE_DIR} && "
            f"{install}")
  return [copy, ssh_command(args, unpack)]


def pack_tree(path: str, repo: str = sweep.REPO) -> int:
  """Tars the working tree as git sees it (tracked and untracked, minus ignored files such as
  .venv and runs/); returns the number of files."""
  listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                          cwd=repo, check=True, capture_output=True).stdout
  files = [f for f in listed.decode().split("\0") if f and os.path.isfile(os.path.join(repo, f))]
  with tarfile.open(path, "w:gz") as tar:
    for name in files:
      tar.add(os.path.join(repo, name), arcname=name)
  return len(files)


def run_argv(args: argparse.Namespace) -> tuple[str, list[str]]:
  """(run name, the experiments.main argv) of `run`, with the sweep point's overrides if any."""
  spec, point, name = args.config, {}, args.run
  if args.sweep_point:
    runs = {r.name: r for r in sweep.plan(args.config, seeds=args.seeds)}
    if args.sweep_point not in runs:
      raise SystemExit(f"No sweep point {args.sweep_point!r}; points: {', '.join(runs)}.")
    point = runs[args.sweep_point].point
    name = name or args.sweep_point
  workdir = os.path.join(args.workdir, args.sweep_point) if args.sweep_point else args.workdir
  path, arg = sweep.split_spec(spec)
  path = _remote_path(path)
  arg = grid.merge_arg(arg, point)
  argv = [".venv/bin/python", "-m", "experiments.main",
          "--config", path + (f":{arg}" if arg else ""), "--workdir", workdir,
          *(f"--config.{s}" for s in run_configs.QUIET),
          *(f"--config.{k}={sweep.cli_value(v)}" for k, v in grid.config_overrides(point).items()),
          *(f"--config.{s}" for s in args.set)]
  name = name or os.path.splitext(os.path.basename(path))[0]
  return name, argv


def _remote_path(path: str) -> str:
  """An experiment file's path relative to the repository, as the workers' ~/attn has it."""
  full = os.path.abspath(path)
  return os.path.relpath(full, sweep.REPO) if full.startswith(sweep.REPO + os.sep) else path


def background_script(name: str, argv: Sequence[str]) -> str:
  """Starts argv detached on a worker (it outlives the ssh session), unless that run is still
  alive there; output goes to ~/attn_logs/<name>.log."""
  log, pid = f"{LOG_DIR}/{shlex.quote(name)}.log", f"{LOG_DIR}/{shlex.quote(name)}.pid"
  return (f"mkdir -p {LOG_DIR} && cd {REMOTE_DIR} && "
          f"if [ -f {pid} ] && kill -0 $(cat {pid}) 2>/dev/null; then "
          f"echo {shlex.quote(name + ' is still running on')} $(hostname); else "
          f"setsid nohup {shlex.join(argv)} >> {log} 2>&1 < /dev/null & echo $! > {pid}; fi")


def logs_command(args: argparse.Namespace, name: str) -> list[str]:
  """Follows worker 0's log of a run (Ctrl-C stops following, not the run)."""
  log = f"{LOG_DIR}/{shlex.quote(name)}.log"
  return ssh_command(args, f"tail -n 200 -F {log}", worker=str(args.worker))


def commands(args: argparse.Namespace) -> list[list[str]]:
  """Every gcloud command of a subcommand, in order (`up` = create + setup + run)."""
  if args.command == "create":
    return create_commands(args)
  if args.command == "setup":
    return setup_commands(args)
  if args.command in ("run", "up"):
    name, argv = run_argv(args)
    start = [ssh_command(args, background_script(name, argv))]
    follow = [] if args.no_follow else [logs_command(args, name)]
    if args.command == "run":
      return start + follow
    return create_commands(args) + setup_commands(args) + start + follow
  if args.command == "sweep":
    path, arg = sweep.split_spec(args.config)
    config = _remote_path(path) + (f":{arg}" if arg is not None else "")
    argv = [".venv/bin/python", "-m", "launch.sweep", "--config", config,
            "--workdir", args.workdir, "--parallel", str(args.parallel),
            *(["--seeds", str(args.seeds)] if args.seeds else []),
            *(a for f in args.filter for a in ("--filter", f)),
            *(a for s in args.set for a in ("--set", s))]
    name = args.run or "sweep"
    start = [ssh_command(args, background_script(name, argv), worker="0")]
    return start + ([] if args.no_follow else [logs_command(args, name)])
  if args.command == "logs":
    return [logs_command(args, args.run)]
  if args.command == "stop":
    return [["gcloud", "compute", "tpus", "tpu-vm", "stop", args.name, *_scope(args)]]
  if args.command == "delete":
    return [delete_command(args)]
  raise ValueError(f"Unknown subcommand {args.command!r}.")


def delete_command(args: argparse.Namespace) -> list[str]:
  if args.queued:  # --force also deletes the TPU VM the request created.
    return ["gcloud", "compute", "tpus", "queued-resources", "delete", args.name, *_scope(args),
            "--force", "--quiet"]
  return ["gcloud", "compute", "tpus", "tpu-vm", "delete", args.name, *_scope(args), "--quiet"]


def _state(args: argparse.Namespace) -> str | None:
  """The node's (queued resource's) state, e.g. READY, PREEMPTED, ACTIVE; None if it is absent."""
  done = subprocess.run(describe_command(args), capture_output=True, text=True)
  return done.stdout.strip() if done.returncode == 0 else None


def _create(args: argparse.Namespace, cmd: list[str]) -> None:
  """Creates the node unless it is up; a preempted one is deleted first (it cannot restart)."""
  state = _state(args)
  if state in DEAD_STATES["queued" if args.queued else "tpu-vm"]:
    print(f"{args.name} is {state}; deleting and creating it again.", flush=True)
    delete = delete_command(args)
    print("+ " + shlex.join(delete), flush=True)
    subprocess.run(delete, check=True)
  elif state is not None:
    print(f"{args.name} exists ({state}); not creating it.", flush=True)
    return
  print("+ " + shlex.join(cmd), flush=True)
  subprocess.run(cmd, check=True)
  if args.queued:
    _wait_active(args)


def _wait_active(args: argparse.Namespace, poll_s: float = WAIT_POLL_S) -> None:
  """A queued resource is usable once ACTIVE; FAILED or SUSPENDED will not get better."""
  while True:
    state = _state(args)
    print(f"{args.name}: {state}", flush=True)
    if state == "ACTIVE":
      return
    if state is None or state in DEAD_STATES["queued"]:
      raise SystemExit(f"Queued resource {args.name} is {state or 'gone'}; run the same command "
                       "again to delete and recreate it.")
    time.sleep(poll_s)


def execute(args: argparse.Namespace) -> None:
  """Runs the commands; create is skipped when the VM exists, and a queued one is waited for."""
  tarball = None
  if args.command in ("setup", "up") and not args.repo:
    tarball = os.path.join(tempfile.gettempdir(), SOURCE_TARBALL)
    print(f"Packed {pack_tree(tarball)} files into {tarball}.", flush=True)
  creates = create_commands(args) if args.command in ("create", "up") else []
  for cmd in commands(args):
    if cmd in creates:
      _create(args, cmd)
      continue
    print("+ " + shlex.join(cmd), flush=True)
    try:
      subprocess.run(cmd, check=True)
    except KeyboardInterrupt:  # Stops following the log; the run goes on on the VM.
      print("\nStopped following; the run goes on (see `logs`).")
      return


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m launch.tpu_vm",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("command", choices=("create", "setup", "run", "sweep", "up", "logs", "stop",
                                          "delete"))
  parser.add_argument("--name", required=True, help="TPU VM (and queued resource) name")
  parser.add_argument("--zone", required=True)
  parser.add_argument("--project", default=None, help="default: gcloud's configured project")
  parser.add_argument("--accelerator", default="v5litepod-8", help="e.g. v5litepod-8, v4-32")
  parser.add_argument("--version", default="v2-alpha-tpuv5-lite",
                      help="TPU runtime version, e.g. tpu-ubuntu2204-base, v2-alpha-tpuv5-lite")
  parser.add_argument("--spot", action="store_true", help="spot capacity (preemptible)")
  parser.add_argument("--queued", action="store_true", help="request through a queued resource")
  parser.add_argument("--repo", default=None, help="git URL to clone instead of copying the tree")
  parser.add_argument("--ref", default="main",
                      help="with --repo: branch (moved to origin's), tag or commit to check out")
  parser.add_argument("--config", default=None, help="experiment file[:arg] (run / sweep / up)")
  parser.add_argument("--workdir", default=None, help="run directory, as the workers see it")
  parser.add_argument("--shared_workdir", action="store_true",
                      help="a local-looking --workdir is one mount every worker sees (gcsfuse, "
                      "NFS): allowed on multi-host slices")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="a --config.KEY=VALUE override")
  parser.add_argument("--sweep_point", default=None, help="run this point of get_sweep()")
  parser.add_argument("--seeds", type=int, default=None, help="as in launch.sweep")
  parser.add_argument("--filter", action="append", default=[], help="sweep: as in launch.sweep")
  parser.add_argument("--parallel", type=int, default=1, help="sweep: runs at a time")
  parser.add_argument("--run", default=None, help="log name (default: the experiment's name)")
  parser.add_argument("--worker", default="0", help="logs: which worker's log")
  parser.add_argument("--no_follow", action="store_true", help="start the run, do not tail it")
  parser.add_argument("--dry_run", action="store_true", help="print the commands only")
  args = parser.parse_args(argv)
  if args.command in ("run", "sweep", "up") and not (args.config and args.workdir):
    parser.error(f"{args.command} needs --config and --workdir.")
  if (args.command in ("run", "up") and multi_host(args.accelerator) and
      not storage.is_url(args.workdir) and not args.shared_workdir):
    parser.error(
      f"--workdir {args.workdir} is a path on each worker, but {args.accelerator} is a multi-host "
      "slice: every worker would write its own copy and the multi-host checkpoint would fail. "
      "Use a gs:// workdir (--workdir gs://BUCKET/runs/NAME), or, for a gcsfuse / NFS mount "
      "that every worker sees at that path, add --shared_workdir.")
  if args.command == "sweep" and multi_host(args.accelerator):
    parser.error(
      f"sweep runs launch.sweep on worker 0 only, but {args.accelerator} is a multi-host slice: "
      "every run needs all its workers (their TPU runtimes start together), so it would wait "
      "for the others forever. Run the points one at a time on all workers with "
      "`run --sweep_point NAME` (the names: python -m launch.sweep --config FILE --workdir DIR "
      "--dry_run), or sweep on a single-host slice (e.g. --accelerator v5litepod-8).")
  chips = host_chips(args.accelerator)
  if args.command == "sweep" and chips is not None and args.parallel > chips:
    parser.error(f"--parallel {args.parallel}: {args.accelerator} has {chips} TPU chip(s) and a "
                 f"chip serves one run; use --parallel {chips} or less.")
  if args.command == "logs" and not args.run:
    parser.error("logs needs --run (the log name that `run` printed).")
  return args


def main(argv: Sequence[str] | None = None) -> None:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args.dry_run:
    creates = create_commands(args) if args.command in ("create", "up") else []
    for cmd in commands(args):
      print("\n".join(create_plan(args, cmd)) if cmd in creates else shlex.join(cmd))
    return
  execute(args)


if __name__ == "__main__":
  main()
