"""Multi-host on one machine: 2 processes x 2 CPU devices (gloo collectives) train exactly like
1 process x 4 devices (the global batches do not depend on the process count), with the workdir
on local disk or in a bucket (both processes write their checkpoint shards there; tests/gcs.py's
emulator), and a checkpoint of either resumes on the other."""

import json
import os
import shutil
import signal
import socket

import numpy as np
import pytest

from attn import storage
from attn.train.checkpoint import Checkpointer
from tests.train.conftest import lock_holder, losses, run_child, start_child

OVERRIDES = {"model.dropout_rate": 0.0, "train.num_steps": 4, "train.eval_every": 0,
             "train.checkpoint_every": 2}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(workdir: str, data_dir: str, processes: int, **kwargs) -> list:
  """The processes of one multi-process launch of the tiny LM run on 4 CPU devices."""
  port = _free_port()
  procs = []
  for pid in range(processes):
    env = {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": str(processes),
           "JAX_PROCESS_ID": str(pid)}
    procs.append(start_child(workdir, {"data_dir": data_dir, **OVERRIDES},
                             devices=4 // processes, extra_env=env, **kwargs))
  return procs


def _train(workdir: str, data_dir: str, processes: int) -> None:
  """The tiny LM run on 4 CPU devices: 1 process x 4 or 2 processes x 2."""
  if processes == 1:
    proc = run_child(workdir, {"data_dir": data_dir, **OVERRIDES}, devices=4)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return
  procs = _start(workdir, data_dir, processes)
  outs = [p.communicate(timeout=300) for p in procs]
  for p in procs:
    assert p.returncode == 0, "\n---\n".join(err[-3000:] for _, err in outs)


def _sha(workdir: str) -> str:
  return json.loads(storage.read_text(storage.join(workdir, "summary.json")))["params_sha256"]


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory) -> dict[int, str]:
  """process count -> local workdir of the uninterrupted 4-step run (checkpoints at 2 and 4)."""
  root = tmp_path_factory.mktemp("multihost")
  workdirs = {p: str(root / f"p{p}") for p in (1, 2)}
  for processes, workdir in workdirs.items():
    _train(workdir, data_dir, processes)
  return workdirs


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "gcs"])
def test_two_processes_match_one_process(runs, data_dir, where, request):
  multi = runs[2]
  if where == "gcs":
    multi = request.getfixturevalue("gcs").url("m")
    _train(multi, data_dir, 2)
  one, two = losses(runs[1]), losses(multi)
  assert sorted(one) == [1, 2, 3, 4]
  np.testing.assert_allclose([two[s] for s in sorted(one)], [one[s] for s in sorted(one)],
                             rtol=1e-6)
  summary = json.loads(storage.read_text(storage.join(multi, "summary.json")))
  assert summary["processes"] == 2 and summary["step"] == 4
  assert Checkpointer(multi, read_only=True).all_steps() == [2, 4]


@pytest.mark.slow
@pytest.mark.parametrize("saved,resumed", [(2, 1), (1, 2)])
def test_checkpoint_resumes_with_another_process_count(runs, data_dir, tmp_path, saved, resumed):
  """The step-2 checkpoint of a run on `saved` processes, resumed on `resumed` processes,
  continues with the same batches: steps 3 and 4 match the uninterrupted runs."""
  workdir = str(tmp_path / "run")
  shutil.copytree(runs[saved], workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
  os.remove(os.path.join(workdir, "summary.json"))
  _train(workdir, data_dir, resumed)
  got = losses(workdir)
  assert sorted(got) == [1, 2, 3, 4]
  for reference in runs.values():
    want = losses(reference)
    np.testing.assert_allclose([got[s] for s in (3, 4)], [want[s] for s in (3, 4)], rtol=1e-6)
  if _sha(runs[1]) == _sha(runs[2]):  # Bitwise across topologies whenever the runs are.
    assert _sha(workdir) == _sha(runs[1])


@pytest.mark.slow
def test_every_process_of_a_launch_on_a_held_workdir_stops_naming_the_holder(data_dir, tmp_path):
  """Process 0 tries the lock; the others get its outcome (the holder's name) from it."""
  workdir = str(tmp_path / "held")
  holder = lock_holder(workdir)
  try:
    procs = _start(workdir, data_dir, 2)
    outs = [p.communicate(timeout=300) for p in procs]
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  for p, (_, err) in zip(procs, outs, strict=True):
    assert p.returncode == 1, err[-3000:]
    assert f"{workdir} is in use by pid {holder.pid} on host" in err, err[-3000:]
  assert "(process 0) " in outs[1][1]
  assert os.listdir(workdir) == ["lock.json"]  # Nothing else read or written.


@pytest.mark.slow
def test_a_process_40s_late_to_the_first_step_does_not_fail_the_run(runs, data_dir, tmp_path):
  """On a loaded machine one process may reach the first step long after the other (a slower
  compile). gloo gives up connecting after 30 s ("Gloo context initialization failed"), so the
  processes connect right after jax.distributed.initialize instead; the late one is waited for."""
  workdir = str(tmp_path / "late")
  procs = _start(workdir, data_dir, 2, mode="late_first_step", at=40)
  outs = [p.communicate(timeout=400) for p in procs]
  for p in procs:
    assert p.returncode == 0, "\n---\n".join(err[-3000:] for _, err in outs)
  assert losses(workdir) == losses(runs[2])  # The same run, only later.
