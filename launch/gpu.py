"""Multi-host GPU runs: a SLURM batch script, or N local processes through the same entry point.

    python -m launch.gpu sbatch --nodes 2 --gpus_per_node 8 --partition gpu --time 24:00:00 \
        --config experiments/lm.py:size=base --workdir /shared/runs/lm [--set k=v] [--dry_run]
    python -m launch.gpu local --processes 2 --config experiments/default.py:runlocal \
        --workdir runs/two_procs [--devices_per_process 1] [--dry_run]

Every process runs the same `python -m experiments.main ...`; `attn.train.distributed` calls
`jax.distributed.initialize` from what the launcher provides:
- under SLURM, `sbatch` asks for one task per GPU (`--ntasks-per-node` = `--gpus-per-node`,
  every task seeing all of its node's GPUs): a 2 x 8 job is 16 processes of one GPU each, and
  JAX reads the job's SLURM_* variables by itself (task SLURM_LOCALID drives GPU SLURM_LOCALID).
  `sbatch` writes `<job_dir>/job.sbatch` and submits it (SLURM writes `slurm-<job>.out` there);
  the job directory is the workdir, or for a gs:// workdir `<checkout>/slurm/<run>`: SLURM
  opens only files on the cluster's filesystems;
- any other launcher sets JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES
  and JAX_PROCESS_ID in each process's environment. `local` does that on one machine (CPU
  processes exchange arrays with gloo): the multi-host code path without a cluster. The same
  variables in a hand-written sbatch script look like this:

      #SBATCH --nodes=2 --ntasks-per-node=1 --gpus-per-node=8  # one process drives 8 GPUs
      head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
      srun bash -c "JAX_COORDINATOR_ADDRESS=$head:12355 JAX_NUM_PROCESSES=\\$SLURM_NTASKS \\
          JAX_PROCESS_ID=\\$SLURM_PROCID exec .venv/bin/python -m experiments.main \\
          --config experiments/lm.py:size=base --workdir /shared/runs/lm"

The checkout (and its .venv, or the interpreter `--python` names) must be on a filesystem every
node sees, and so must the workdir, unless it is gs://. The script asks SLURM for SIGTERM five
minutes before the time limit (the trainer checkpoints and exits) and is requeued after a
preemption; submitting the same script again resumes from the workdir.
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import subprocess
import sys
from collections.abc import Sequence

from attn import storage
from launch import run_configs, sweep

ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def job_dir(args: argparse.Namespace) -> str:
  """Where the job script, SLURM's output and local processes' logs go: --job_dir, else the
  workdir, else (a gs:// workdir, which neither SLURM nor a shell redirect can open)
  <checkout>/slurm/<the workdir's last component>."""
  if args.job_dir:
    return args.job_dir
  if not storage.is_url(args.workdir):
    return args.workdir
  return os.path.join(sweep.REPO, "slurm", args.workdir.rstrip("/").rsplit("/", 1)[-1])


def main_argv(args: argparse.Namespace, python: str, quiet: Sequence[str] = ()) -> list[str]:
  """experiments.main with the experiment path relative to the repository (the job's cwd)."""
  path, arg = sweep.split_spec(args.config)
  full = os.path.abspath(path)
  if full.startswith(sweep.REPO + os.sep):
    path = os.path.relpath(full, sweep.REPO)
  return [python, "-m", "experiments.main", "--config", path + (f":{arg}" if arg else ""),
          "--workdir", args.workdir, *quiet, *(f"--config.{s}" for s in args.set)]


def sbatch_script(args: argparse.Namespace) -> str:
  """The batch script: one task per GPU, SIGTERM before the time limit.

  One task per node with 8 GPUs would train on one GPU per node: under SLURM, JAX gives each
  process the GPU of its SLURM_LOCALID (attn.train.distributed keeps all of them for such a
  hand-written script; the launcher uses JAX's default layout)."""
  lines = ["#!/bin/bash",
           f"#SBATCH --job-name={args.job_name}",
           f"#SBATCH --nodes={args.nodes}",
           f"#SBATCH --ntasks-per-node={args.gpus_per_node}",
           f"#SBATCH --gpus-per-node={args.gpus_per_node}",
           f"#SBATCH --cpus-per-task={args.cpus_per_task}",
           f"#SBATCH --time={args.time}",
           f"#SBATCH --output={os.path.join(job_dir(args), 'slurm-%j.out')}",
           "#SBATCH --open-mode=append",
           "#SBATCH --requeue",
           "#SBATCH --signal=TERM@300"]
  if args.partition:
    lines.append(f"#SBATCH --partition={args.partition}")
  if args.account:
    lines.append(f"#SBATCH --account={args.account}")
  # The log is a file: one line per logged step instead of a progress bar's carriage returns.
  quiet = [f"--config.{s}" for s in run_configs.QUIET]
  srun = ["srun", "--kill-on-bad-exit=1", *main_argv(args, args.python, quiet)]
  lines += ["# JAX detects the SLURM job (attn.train.distributed): every task runs the same",
            "# command, drives the GPU of its SLURM_LOCALID, and process 0 coordinates.",
            "set -euo pipefail",
            f"cd {shlex.quote(sweep.REPO)}",
            shlex.join(srun), ""]
  return "\n".join(lines)


def sbatch_commands(args: argparse.Namespace) -> tuple[str, str, list[str]]:
  """(script path, script text, the sbatch command)."""
  path = os.path.join(job_dir(args), "job.sbatch")
  return path, sbatch_script(args), ["sbatch", path]


def local_processes(args: argparse.Namespace, port: int) -> list[tuple[dict[str, str], list[str]]]:
  """(extra environment, argv) of each local process."""
  argv = main_argv(args, sys.executable)
  out = []
  for pid in range(args.processes):
    env = {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
           "JAX_NUM_PROCESSES": str(args.processes), "JAX_PROCESS_ID": str(pid)}
    if args.devices_per_process:  # Simulated CPU devices per process (tests, laptops).
      env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices_per_process}"
    if args.gpus_per_process:  # Split one multi-GPU machine between the processes.
      first = pid * args.gpus_per_process
      env["CUDA_VISIBLE_DEVICES"] = ",".join(str(first + i) for i in range(args.gpus_per_process))
    out.append((env, argv))
  return out


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_local(args: argparse.Namespace, port: int) -> int:
  """Starts every process, streams process 0, and stops the rest as soon as one fails (a
  survivor would otherwise wait for its dead peer until the heartbeat timeout)."""
  logs = job_dir(args)
  os.makedirs(logs, exist_ok=True)
  procs = []
  for env, argv in local_processes(args, port):
    pid = int(env["JAX_PROCESS_ID"])
    out = None if pid == 0 else open(  # noqa: SIM115 (closed below)
      os.path.join(logs, f"process_{pid}.log"), "a")
    procs.append((subprocess.Popen(argv, cwd=sweep.REPO, env={**os.environ, **env}, stdout=out,
                                   stderr=subprocess.STDOUT if out else None), out))
  status = 0
  try:
    pending = [p for p, _ in procs]
    while pending:
      for proc in list(pending):
        try:
          code = proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
          continue
        pending.remove(proc)
        if code != 0 and not status:
          status = code
          for other in pending:
            other.terminate()
  finally:
    for proc, out in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
      if out is not None:
        out.close()
  return status


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m launch.gpu", description=__doc__.split("\n")[0])
  parser.add_argument("command", choices=("sbatch", "local"))
  parser.add_argument("--config", required=True, help="experiment file[:arg]")
  parser.add_argument("--workdir", required=True, help="shared by all processes (or gs://)")
  parser.add_argument("--job_dir", default=None,
                      help="job script, SLURM output, process logs (default: the workdir; for a "
                      "gs:// workdir, <checkout>/slurm/<run>)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="a --config.KEY=VALUE override")
  parser.add_argument("--dry_run", action="store_true", help="print, do not submit or start")
  slurm = parser.add_argument_group("sbatch")
  slurm.add_argument("--nodes", type=int, default=2)
  slurm.add_argument("--gpus_per_node", type=int, default=8)
  slurm.add_argument("--cpus_per_task", type=int, default=8, help="per task, i.e. per GPU")
  slurm.add_argument("--time", default="24:00:00")
  slurm.add_argument("--partition", default=None)
  slurm.add_argument("--account", default=None)
  slurm.add_argument("--job_name", default="attn")
  slurm.add_argument("--python", default=".venv/bin/python",
                     help="the nodes' interpreter, relative to the checkout or absolute "
                     "(default: the checkout's .venv, as `make venv LOCK=cuda` makes it)")
  local = parser.add_argument_group("local")
  local.add_argument("--processes", type=int, default=2)
  local.add_argument("--devices_per_process", type=int, default=0,
                     help="simulated CPU devices per process (0 = JAX's default)")
  local.add_argument("--gpus_per_process", type=int, default=0,
                     help="split this machine's GPUs (CUDA_VISIBLE_DEVICES) between processes")
  local.add_argument("--port", type=int, default=0, help="coordinator port (0 = a free one)")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args.command == "sbatch":
    path, script, cmd = sbatch_commands(args)
    if args.dry_run:
      print(f"# {path}\n{script}\n{shlex.join(cmd)}")
      return 0
    python = args.python if "/" not in args.python else os.path.join(sweep.REPO, args.python)
    if "/" in args.python and not os.access(python, os.X_OK):
      print(f"--python: {python} does not exist (the job would fail on the nodes). Make it "
            "with `make venv LOCK=cuda` in the checkout, or pass --python (e.g. python3 for "
            "an environment that `pip install -e \".[cuda]\"` installed into).", file=sys.stderr)
      return 2
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      f.write(script)
    return subprocess.run(cmd).returncode
  port = args.port or free_port()
  if args.dry_run:
    for env, argv in local_processes(args, port):
      print(shlex.join([f"{k}={v}" for k, v in env.items()] + argv))
    return 0
  return run_local(args, port)


if __name__ == "__main__":
  sys.exit(main())
