"""One writer per workdir: a lock taken before the trainer reads or writes anything there.

    with workdir_lock.hold(workdir):     # WorkdirBusyError naming the holder if it is taken
      ...                                # lock.check() raises LockLostError if it was taken over

`WorkdirLock` is the interface; `LocalLock` implements it for a local (or NFS) directory with a
`lock.json` created atomically (`os.link` of a complete file fails if one exists). The holder
writes its host, pid, process start time and a heartbeat (every `heartbeat_s`); a later launch
takes over a stale lock: on the same host when that pid is gone (kill -9, a crash) or belongs
to another process now, on another host when the heartbeat is older than `stale_after_s`.
On an object store (gs://) the same contract is a lease object written with generation
preconditions; `GcsLease` is that place, not implemented yet: it warns and does not lock.

Multi-host: process 0 holds the lock; the others learn the outcome from it.
"""

from __future__ import annotations

import abc
import contextlib
import datetime
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

LOCK_FILE = "lock.json"
HEARTBEAT_S = 10.0
STALE_AFTER_S = 60.0


class WorkdirBusyError(RuntimeError):
  """Another launch holds the workdir; the message names it and the ways out."""


class LockLostError(RuntimeError):
  """This run's lock was taken over (it looked stale to another launch): stop writing."""


class WorkdirLock(abc.ABC):
  """Exclusive ownership of a workdir for one run (acquire, check while running, release)."""

  @abc.abstractmethod
  def acquire(self) -> None:
    """Takes the lock or raises WorkdirBusyError naming the holder."""

  @abc.abstractmethod
  def check(self) -> None:
    """Raises LockLostError if another launch has taken the lock over."""

  @abc.abstractmethod
  def release(self) -> None:
    """Gives the lock up (a no-op if it is not held)."""

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc: Any) -> None:
    self.release()


def _process_start(pid: int) -> str | None:
  """The kernel's start time of `pid` (so a reused pid is not mistaken for the holder)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Alive, owned by someone else.
    return True
  return True


def describe(holder: dict[str, Any], now: float | None = None) -> str:
  """'pid 123 on host h (started ..., last heartbeat 4 s ago): python -m ...'."""
  if not holder:
    return "an unknown run (its lock file is unreadable)"
  now = time.time() if now is None else now
  age = now - float(holder.get("heartbeat", now))
  return (f"pid {holder.get('pid')} on host {holder.get('host')!r} (started "
          f"{holder.get('started')}, last heartbeat {age:.0f} s ago): {holder.get('command')}")


class LocalLock(WorkdirLock):
  """`workdir/lock.json` on a POSIX filesystem, with pid/host liveness and a heartbeat."""

  def __init__(self, workdir: str, *, heartbeat_s: float = HEARTBEAT_S,
               stale_after_s: float = STALE_AFTER_S):
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, LOCK_FILE)
    self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
    self.token = uuid.uuid4().hex
    self.record: dict[str, Any] = {}
    self.lost: str | None = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self.took_over: str | None = None  # Why a stale lock was broken, for the run's log.

  # -- the file ------------------------------------------------------------------------------
  def _read(self) -> dict[str, Any] | None:
    """The holder's record; {} if unreadable (torn), None if there is no lock."""
    try:
      with open(self.path) as f:
        return json.load(f)
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {}

  def _write_new(self) -> bool:
    """Creates lock.json with our complete record; False if a lock exists."""
    tmp = f"{self.path}.{self.token}.tmp"
    with open(tmp, "w") as f:
      json.dump(self.record, f)
    try:
      os.link(tmp, self.path)  # Atomic: fails if lock.json exists; never a half-written lock.
      return True
    except FileExistsError:
      return False
    finally:
      os.remove(tmp)

  def _stale_reason(self, holder: dict[str, Any]) -> str | None:
    """Why the holder no longer runs, or None if it may still be running."""
    if not holder:  # A torn record: its writer died mid-write, or is writing right now.
      try:
        age = time.time() - os.path.getmtime(self.path)
      except FileNotFoundError:
        return "it is gone"
      return f"an unreadable lock file {age:.0f} s old" if age > self.stale_after_s else None
    if holder.get("host") == socket.gethostname():
      pid = int(holder.get("pid", -1))
      if not _pid_alive(pid):
        return f"pid {pid} no longer exists on this host"
      start = holder.get("process_start")
      if start is not None and _process_start(pid) not in (None, start):
        return f"pid {pid} on this host is another process now"
      return None  # Alive on this host: its heartbeat does not matter (it may be stopped).
    age = time.time() - float(holder.get("heartbeat", 0))
    if age > self.stale_after_s:
      return f"its last heartbeat is {age:.0f} s old (> {self.stale_after_s:.0f} s)"
    return None

  @contextlib.contextmanager
  def _breaking(self) -> Iterator[bool]:
    """A short mutex around breaking a stale lock, so two launches cannot both break it."""
    path = self.path + ".break"
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
      try:  # Its owner died mid-break (a few ms window): expire it.
        if time.time() - os.path.getmtime(path) > 30:
          os.remove(path)
      except FileNotFoundError:
        pass
      yield False
      return
    os.close(fd)
    try:
      yield True
    finally:
      os.remove(path)

  # -- the interface -------------------------------------------------------------------------
  def acquire(self) -> None:
    os.makedirs(self.workdir, exist_ok=True)
    now = time.time()
    self.record = {
      "pid": os.getpid(), "host": socket.gethostname(), "token": self.token,
      "process_start": _process_start(os.getpid()),
      "started": datetime.datetime.now().isoformat(timespec="seconds"),
      "heartbeat": now, "command": " ".join(sys.argv),
    }
    for _ in range(20):
      if self._write_new():
        self._start_heartbeat()
        return
      holder = self._read()
      if holder is None:
        continue  # Released between our attempt and the read: try again.
      reason = self._stale_reason(holder)
      if reason is None:
        raise WorkdirBusyError(
          f"{self.workdir} is in use by {describe(holder)}. One run writes a workdir at a time: "
          "wait for it to finish, stop it (it saves and exits on SIGTERM), or use another "
          f"--workdir. If that process is gone and on another host, its lock expires "
          f"{self.stale_after_s:.0f} s after its last heartbeat; removing {self.path} takes "
          "over at once.")
      with self._breaking() as breaking:
        if breaking and self._read() == holder:  # Still the same stale holder.
          os.remove(self.path)
          self.took_over = (f"took over the lock of {describe(holder) if holder else 'a dead run'}"
                            f": {reason}")
      if not breaking:
        time.sleep(0.05)
    raise WorkdirBusyError(f"Could not take {self.path}: other launches keep racing for it.")

  def _start_heartbeat(self) -> None:
    self._stop.clear()
    self._thread = threading.Thread(target=self._beat, name="workdir-lock", daemon=True)
    self._thread.start()

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      holder = self._read()
      if not holder or holder.get("token") != self.token:
        self.lost = (f"{self.path} now belongs to {describe(holder)}" if holder
                     else f"{self.path} was removed")
        return
      self.record["heartbeat"] = time.time()
      tmp = f"{self.path}.{self.token}.tmp"
      with open(tmp, "w") as f:
        json.dump(self.record, f)
      os.replace(tmp, self.path)

  def check(self) -> None:
    if self.lost:
      raise LockLostError(f"This run lost its lock on {self.workdir}: {self.lost}. Stopping "
                          "without writing more; the newest checkpoint is intact.")

  def release(self) -> None:
    if self._thread is None:
      return
    self._stop.set()
    self._thread.join()
    self._thread = None
    holder = self._read()
    if holder and holder.get("token") == self.token:
      os.remove(self.path)


class GcsLease(WorkdirLock):
  """A gs:// workdir's lease: an object created with `if_generation_match=0`, renewed with the
  generation it was read at, taken over when its heartbeat is stale. NOT IMPLEMENTED yet (it
  needs the epath I/O layer and a GCS emulator to test against): acquiring says so on stderr and
  the run goes on unlocked, so that gs:// runs keep working."""

  def __init__(self, workdir: str, **unused: Any):
    self.workdir = workdir

  def acquire(self) -> None:
    print(f"WARNING: {self.workdir} is not locked: locking a gs:// workdir (a lease object with "
          "generation preconditions) is not implemented yet. Make sure only one run writes it.",
          file=sys.stderr, flush=True)

  def check(self) -> None:
    pass

  def release(self) -> None:
    pass


def make_lock(workdir: str, **kwargs: Any) -> WorkdirLock:
  """The lock that fits the workdir's storage."""
  if str(workdir).startswith("gs://"):
    return GcsLease(workdir, **kwargs)
  return LocalLock(workdir, **kwargs)


@contextlib.contextmanager
def hold(workdir: str, **kwargs: Any) -> Iterator[WorkdirLock | None]:
  """Process 0 holds the workdir's lock for the block; every process fails if it cannot."""
  import jax

  lock = make_lock(workdir, **kwargs) if jax.process_index() == 0 else None
  error: Exception | None = None
  if lock is not None:
    try:
      lock.acquire()
    except WorkdirBusyError as e:
      error = e
  if jax.process_count() > 1:
    import numpy as np
    from jax.experimental import multihost_utils

    failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
    if failed and error is None:
      error = WorkdirBusyError(f"Process 0 could not take the lock on {workdir} (see its log).")
  if error is not None:
    raise error
  try:
    yield lock
  finally:
    if lock is not None:
      lock.release()
