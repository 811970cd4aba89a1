"""The workdir lock: a second holder is refused naming the first; stale locks (a killed pid on
this host, an old heartbeat from another host) are taken over; a lost lock is noticed."""

import json
import os
import signal
import threading
import time

import pytest

from attn import storage
from attn.train import workdir_lock
from attn.train.workdir_lock import LocalLock, WorkdirBusyError
from tests.train.conftest import lock_holder


def test_second_holder_is_refused_naming_the_first_then_kill9_is_recovered(tmp_path):
  workdir = str(tmp_path / "run")
  proc = lock_holder(workdir)
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


# -- gs://: the lease object, against the GCS emulator (tests/gcs.py) ---------------------------
def _lease_record(url: str) -> tuple[dict, int]:
  data, generation, _ = storage.read_versioned(storage.join(url, "lock.json"))
  return json.loads(data), generation


def test_gcs_lease_refuses_a_second_holder_renews_and_is_released(gcs):
  url = gcs.url("run")
  lease = workdir_lock.make_lock(url, heartbeat_s=0.05)
  assert isinstance(lease, workdir_lock.GcsLease)
  lease.acquire()
  first, generation = _lease_record(url)
  assert first["pid"] == os.getpid() and first["token"] == lease.token
  with pytest.raises(WorkdirBusyError, match=rf"{url} is in use by pid {os.getpid()} on host"):
    workdir_lock.make_lock(url).acquire()
  time.sleep(0.5)
  renewed, renewed_generation = _lease_record(url)  # Rewritten on its own generation.
  assert renewed["heartbeat"] > first["heartbeat"] and renewed_generation > generation
  assert renewed["token"] == lease.token
  lease.check()
  lease.release()
  assert not storage.exists(storage.join(url, "lock.json"))
  with workdir_lock.make_lock(url):  # Free again.
    assert _lease_record(url)[0]["pid"] == os.getpid()
  assert not storage.exists(storage.join(url, "lock.json"))


def _foreign_lease(url: str, heartbeat_age: float) -> None:
  storage.write_text_atomic(storage.join(url, "lock.json"), json.dumps(
    {"pid": 1, "host": "another-host", "token": "x", "started": "earlier",
     "heartbeat": time.time() - heartbeat_age, "command": "python -m x"}))


def test_gcs_lease_of_another_host_expires_by_heartbeat_and_the_old_holder_notices(gcs):
  url = gcs.url("run")
  _foreign_lease(url, heartbeat_age=5)
  with pytest.raises(WorkdirBusyError, match=r"pid 1 on host 'another-host'.*heartbeat 5 s ago"):
    workdir_lock.GcsLease(url, stale_after_s=60).acquire()
  _foreign_lease(url, heartbeat_age=61)
  lease = workdir_lock.GcsLease(url, heartbeat_s=0.05, stale_after_s=60)
  lease.acquire()
  assert "last heartbeat is 61 s old" in lease.took_over
  assert _lease_record(url)[0]["token"] == lease.token
  # Another launch takes it over (this one looked stale to it): the next renewal, made on the
  # generation this lease wrote, fails; the run stops and leaves the new holder's lease alone.
  _foreign_lease(url, heartbeat_age=0)
  time.sleep(0.5)
  with pytest.raises(workdir_lock.LockLostError, match="now belongs to pid 1 on host"):
    lease.check()
  lease.release()
  assert _lease_record(url)[0]["host"] == "another-host"


@pytest.mark.parametrize("stale", [False, True], ids=["absent", "stale"])
def test_gcs_lease_racers_exactly_one_wins(gcs, stale):
  """Eight launches race for a lease that does not exist, or for one whose holder is stale:
  the generation preconditions let exactly one of them write it."""
  url = gcs.url("run")
  if stale:
    _foreign_lease(url, heartbeat_age=120)
  leases = [workdir_lock.GcsLease(url, heartbeat_s=60) for _ in range(8)]
  start = threading.Barrier(len(leases))
  outcomes: list[str] = [""] * len(leases)

  def race(i: int) -> None:
    start.wait()
    try:
      leases[i].acquire()
      outcomes[i] = "won"
    except WorkdirBusyError as e:
      outcomes[i] = str(e)

  threads = [threading.Thread(target=race, args=(i,)) for i in range(len(leases))]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert outcomes.count("won") == 1, outcomes
  winner = leases[outcomes.index("won")]
  assert _lease_record(url)[0]["token"] == winner.token
  assert all(f"in use by pid {os.getpid()}" in o for o in outcomes if o != "won")
  assert bool(winner.took_over) == stale
  for lease in leases:
    lease.release()
  assert not storage.exists(storage.join(url, "lock.json"))


def test_gcs_lease_that_cannot_be_renewed_stops_the_run_before_it_may_be_taken_over(
    gcs, monkeypatch):
  url = gcs.url("run")
  lease = workdir_lock.GcsLease(url, heartbeat_s=0.05, stale_after_s=3.0)
  lease.acquire()

  def unreachable(*args, **kwargs):
    raise OSError("bucket unreachable")

  monkeypatch.setattr(storage, "write_if_generation", unreachable)
  time.sleep(0.5)
  lease.check()  # A few failed beats: not yet.
  time.sleep(3.0)  # > stale_after_s - 2 heartbeats without a renewal.
  with pytest.raises(workdir_lock.LockLostError,
                     match=r"heartbeat could not be written for \d s \(OSError: bucket"):
    lease.check()
  lease.release()
  assert _lease_record(url)[0]["token"] == lease.token  # Not ours to delete any more: left.
