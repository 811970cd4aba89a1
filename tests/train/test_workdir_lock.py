"""The workdir lock: a second holder is refused naming the first; stale locks (a killed pid on
this host, an old heartbeat from another host) are taken over; a lost lock is noticed."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from attn.train import workdir_lock
from attn.train.workdir_lock import LocalLock, WorkdirBusyError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _holder_process(workdir: str) -> subprocess.Popen:
  """Another process that takes the lock and sleeps (killed by the test)."""
  code = ("import sys, time; from attn.train.workdir_lock import LocalLock; "
          "LocalLock(sys.argv[1]).acquire(); print('HELD', flush=True); time.sleep(600)")
  proc = subprocess.Popen([sys.executable, "-c", code, workdir], cwd=REPO, text=True,
                          stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": REPO})
  assert proc.stdout.readline().strip() == "HELD"
  return proc


def test_second_holder_is_refused_naming_the_first_then_kill9_is_recovered(tmp_path):
  workdir = str(tmp_path / "run")
  proc = _holder_process(workdir)
  try:
    with pytest.raises(WorkdirBusyError, match=rf"in use by pid {proc.pid} on host"):
      LocalLock(workdir).acquire()
    assert os.path.exists(os.path.join(workdir, "lock.json"))  # Left as it was.
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  lock = LocalLock(workdir)
  lock.acquire()  # The holder is gone: its lock is stale on this host, taken over at once.
  assert f"pid {proc.pid} no longer exists" in lock.took_over
  with open(os.path.join(workdir, "lock.json")) as f:
    assert json.load(f)["pid"] == os.getpid()
  lock.release()
  assert os.listdir(workdir) == []


def _foreign_lock(workdir: str, heartbeat_age: float) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "lock.json"), "w") as f:
    json.dump({"pid": 1, "host": "another-host", "token": "x", "started": "earlier",
               "heartbeat": time.time() - heartbeat_age, "command": "python -m x"}, f)


def test_another_hosts_lock_expires_by_heartbeat(tmp_path):
  workdir = str(tmp_path / "run")
  _foreign_lock(workdir, heartbeat_age=5)
  with pytest.raises(WorkdirBusyError, match=r"pid 1 on host 'another-host'.*heartbeat 5 s ago"):
    LocalLock(workdir, stale_after_s=60).acquire()
  _foreign_lock(workdir, heartbeat_age=61)
  lock = LocalLock(workdir, stale_after_s=60)
  lock.acquire()
  assert "last heartbeat is 61 s old" in lock.took_over
  lock.release()


def test_heartbeat_refreshes_and_a_lost_lock_is_noticed(tmp_path):
  workdir = str(tmp_path / "run")
  lock = LocalLock(workdir, heartbeat_s=0.05)
  lock.acquire()
  path = os.path.join(workdir, "lock.json")
  with open(path) as f:
    first = json.load(f)["heartbeat"]
  time.sleep(0.3)
  with open(path) as f:
    assert json.load(f)["heartbeat"] > first
  lock.check()  # Still ours.
  _foreign_lock(workdir, heartbeat_age=0)  # Another launch broke it (we looked stale to it).
  time.sleep(0.3)
  with pytest.raises(workdir_lock.LockLostError, match="now belongs to pid 1 on host"):
    lock.check()
  lock.release()
  assert os.path.exists(path)  # Not ours any more: left alone.


def test_gs_workdir_says_it_is_not_locked(capsys):
  lock = workdir_lock.make_lock("gs://bucket/run")
  lock.acquire()
  assert ("gs://bucket/run is not locked: locking a gs:// workdir (a lease object with "
          "generation preconditions) is not implemented yet") in capsys.readouterr().err
  lock.release()
