"""One writer per workdir: a lock taken before the trainer reads or writes anything there.

    with workdir_lock.hold(workdir):     # WorkdirBusyError naming the holder if it is taken
      ...                                # lock.check() raises LockLostError if it was taken over

`WorkdirLock` is the interface. The holder writes `<workdir>/lock.json` with its host, pid,
process start time and a heartbeat (renewed every `heartbeat_s`); a later launch takes over a
stale lock: on the same host (same boot, same pid namespace) when that pid is gone (kill -9, a
crash) or belongs to another process now, elsewhere when the heartbeat is older than
`stale_after_s`.
`LocalLock` keeps it on a local (or NFS) disk, created atomically (`os.link`); `GcsLease` keeps
it in a bucket as a lease object written with generation preconditions (create only if absent,
renew and take over only the generation last read), so of two launches racing for it exactly
one wins.

Multi-host: process 0 holds the lock; the others learn the outcome from it.
"""

from __future__ import annotations

import abc
import contextlib
import datetime
import itertools
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from attn import storage

LOCK_FILE = "lock.json"
HEARTBEAT_S = 10.0
STALE_AFTER_S = 60.0
HEARTBEAT_THREAD = "workdir-lock"  # The name of every held lock's heartbeat thread.


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


def _pid_space() -> str | None:
  """Where this process's pid means something: this boot of this kernel and this pid namespace
  ('<boot id> pid:[4026531836]'). A host name alone is not enough to trust a pid: containers
  sharing one see different pids, and a machine recreated under the same name (a preempted TPU
  VM) has rebooted."""
  try:
    with open("/proc/sys/kernel/random/boot_id") as f:
      return f"{f.read().strip()} {os.readlink('/proc/self/ns/pid')}"
  except OSError:
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


class _RecordLock(WorkdirLock):
  """What LocalLock and GcsLease share: the holder's record (host, pid, start time, heartbeat,
  command), the acquire loop (create the lock, else name its live holder or take a stale one
  over), the heartbeat thread, `check` and `release`. Subclasses store the record: a file, an
  object with generations."""

  def __init__(self, workdir: str, path: str, *, heartbeat_s: float, stale_after_s: float):
    self.workdir, self.path = workdir, path
    self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
    self.token = uuid.uuid4().hex
    self.record: dict[str, Any] = {}
    self.lost: str | None = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._renewed = 0.0  # time.monotonic() of the last heartbeat written.
    self.took_over: str | None = None  # Why a stale lock was broken, for the run's log.

  # -- storage (subclasses) --------------------------------------------------------------------
  @abc.abstractmethod
  def _create(self) -> bool:
    """Stores self.record as the lock unless one exists; True if it did."""

  @abc.abstractmethod
  def _read(self) -> tuple[dict[str, Any] | None, Any, float]:
    """(record, version, time it was written); record {} if unreadable, None if no lock."""

  @abc.abstractmethod
  def _replace(self, holder: dict[str, Any], version: Any) -> bool:
    """Replaces the stale lock read as (holder, version) by self.record; False if another
    launch changed it first (nothing written then)."""

  @abc.abstractmethod
  def _renew(self) -> str | None:
    """Rewrites self.record if the lock is still ours; else why it is not (nothing written)."""

  @abc.abstractmethod
  def _remove(self) -> None:
    """Deletes the lock if it is still ours."""

  # -- shared ------------------------------------------------------------------------------
  def _stale_reason(self, holder: dict[str, Any], written: float) -> str | None:
    """Why the holder no longer runs, or None if it may still be running."""
    if not holder:  # A torn record: its writer died mid-write, or is writing right now.
      age = time.time() - written
      return f"an unreadable lock {age:.0f} s old" if age > self.stale_after_s else None
    if holder.get("host") == socket.gethostname() and holder.get("pid_space") == _pid_space():
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

  def _lost_reason(self, holder: dict[str, Any] | None) -> str:
    return (f"{self.path} now belongs to {describe(holder)}" if holder
            else f"{self.path} was removed")

  def acquire(self) -> None:
    self.record = {
      "pid": os.getpid(), "host": socket.gethostname(), "pid_space": _pid_space(),
      "token": self.token, "process_start": _process_start(os.getpid()),
      "started": datetime.datetime.now().isoformat(timespec="seconds"),
      "heartbeat": time.time(), "command": " ".join(sys.argv),
    }
    for _ in range(20):
      if self._create():
        return self._start_heartbeat()
      holder, version, written = self._read()
      if holder is None:
        continue  # Released between our attempt and the read: try again.
      reason = self._stale_reason(holder, written)
      if reason is None:
        raise WorkdirBusyError(
          f"{self.workdir} is in use by {describe(holder)}. One run writes a workdir at a time: "
          "wait for it to finish, stop it (it saves and exits on SIGTERM), or use another "
          f"--workdir. If that process is gone and on another host, its lock expires "
          f"{self.stale_after_s:.0f} s after its last heartbeat; removing {self.path} takes "
          "over at once.")
      if self._replace(holder, version):
        self.took_over = (f"took over the lock of {describe(holder) if holder else 'a dead run'}"
                          f": {reason}")
        return self._start_heartbeat()
      time.sleep(0.05)
    raise WorkdirBusyError(f"Could not take {self.path}: other launches keep racing for it.")

  def _start_heartbeat(self) -> None:
    self._renewed = time.monotonic()
    self._stop.clear()
    self._thread = threading.Thread(target=self._beat, name=HEARTBEAT_THREAD, daemon=True)
    self._thread.start()

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      self.record["heartbeat"] = time.time()
      try:
        self.lost = self._renew()
      except Exception as e:  # noqa: BLE001 (storage unreachable: retried at the next beat)
        silent = time.monotonic() - self._renewed
        # Stop before others may see a stale lock and take it (two beats of margin).
        if silent > self.stale_after_s - 2 * self.heartbeat_s:
          self.lost = (f"its heartbeat could not be written for {silent:.0f} s "
                       f"({type(e).__name__}: {e})")
      else:
        self._renewed = time.monotonic()
      if self.lost:
        return

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
    if not self.lost:
      self._remove()


class LocalLock(_RecordLock):
  """`workdir/lock.json` on a POSIX filesystem, created atomically (`os.link` of a complete
  file fails if one exists)."""

  def __init__(self, workdir: str, *, heartbeat_s: float = HEARTBEAT_S,
               stale_after_s: float = STALE_AFTER_S):
    workdir = os.path.abspath(workdir)
    super().__init__(workdir, os.path.join(workdir, LOCK_FILE), heartbeat_s=heartbeat_s,
                     stale_after_s=stale_after_s)

  def _read(self) -> tuple[dict[str, Any] | None, Any, float]:
    try:
      with open(self.path) as f:
        written = os.fstat(f.fileno()).st_mtime
        text = f.read()
    except FileNotFoundError:
      return None, None, 0.0
    except OSError:
      return {}, None, time.time()
    try:
      return json.loads(text), None, written
    except ValueError:
      return {}, None, written

  def _create(self) -> bool:
    os.makedirs(self.workdir, exist_ok=True)
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

  def _replace(self, holder: dict[str, Any], version: Any) -> bool:
    with self._breaking() as breaking:
      if not breaking or self._read()[0] != holder:  # Another launch is at it, or was.
        return False
      os.remove(self.path)
      return self._create()

  def _renew(self) -> str | None:
    holder = self._read()[0]
    if not holder or holder.get("token") != self.token:
      return self._lost_reason(holder)
    tmp = f"{self.path}.{self.token}.tmp"
    with open(tmp, "w") as f:
      json.dump(self.record, f)
    os.replace(tmp, self.path)
    return None

  def _remove(self) -> None:
    holder = self._read()[0]
    if holder and holder.get("token") == self.token:
      os.remove(self.path)


class GcsLease(_RecordLock):
  """`gs://.../workdir/lock.json`, a lease object: created only if absent (ifGenerationMatch=0),
  renewed and taken over only on the generation last seen (so of two writers racing from the
  same generation exactly one wins), deleted on release only if still ours. An object store
  cannot tell whether a pid on another machine lives, so a lease from another host is stale
  only when its heartbeat is older than `stale_after_s` (clocks of the hosts are assumed to
  agree to well within that, as NTP-synced cloud VMs do)."""

  def __init__(self, workdir: str, *, heartbeat_s: float = HEARTBEAT_S,
               stale_after_s: float = STALE_AFTER_S):
    super().__init__(workdir, storage.join(workdir, LOCK_FILE), heartbeat_s=heartbeat_s,
                     stale_after_s=stale_after_s)
    self.generation = 0  # Of our last write; 0 while we hold nothing.

  def _data(self) -> bytes:
    return json.dumps(self.record).encode()

  def _create(self) -> bool:
    return self._write(0)

  def _write(self, generation: int) -> bool:
    new = storage.write_if_generation(self.path, self._data(), generation)
    if new is not None:
      self.generation = new
    return new is not None

  def _read(self) -> tuple[dict[str, Any] | None, Any, float]:
    found = storage.read_versioned(self.path)
    if found is None:
      return None, 0, 0.0
    data, generation, written = found
    try:
      return json.loads(data), generation, written
    except ValueError:
      return {}, generation, written

  def _replace(self, holder: dict[str, Any], version: Any) -> bool:
    return self._write(version)

  def _renew(self) -> str | None:
    if self._write(self.generation):
      return None
    holder, generation, _ = self._read()
    if holder == self.record:  # Our write landed but its reply was lost (and retried): ours.
      self.generation = generation
      return None
    return self._lost_reason(holder)

  def _remove(self) -> None:
    storage.remove_if_generation(self.path, self.generation)


def make_lock(workdir: str, **kwargs: Any) -> WorkdirLock:
  """The lock that fits the workdir's storage."""
  if str(workdir).startswith("gs://"):
    return GcsLease(workdir, **kwargs)
  return LocalLock(workdir, **kwargs)


def holder(workdir: str) -> dict[str, Any] | None:
  """The record of the launch that holds `workdir` now, or None (no lock, or a stale one that
  the next launch takes over); only reads. For `describe`, e.g. before a sweep starts a run."""
  lock = make_lock(workdir)
  record, _, written = lock._read()
  if record is None or lock._stale_reason(record, written) is not None:
    return None
  return record


_SHARED = itertools.count()  # Every process calls hold() in the same order: one key each.


def _from_process_0(error: WorkdirBusyError | None) -> WorkdirBusyError | None:
  """Process 0's outcome (None, or its error with the holder's name) on every process.

  Through the coordination service's key-value store (what jax.distributed.initialize
  started), not a collective: the others wait as long as process 0's lock I/O takes (a lease
  in a bucket is several HTTP round trips) without setting up the CPU collectives (gloo) on it,
  and they can show process 0's message rather than only that it failed.
  """
  import jax
  from jax._src import distributed as jax_distributed  # The client has no public accessor.

  client = jax_distributed.global_state.client
  key = f"attn/workdir_lock/{next(_SHARED)}"
  if jax.process_index() == 0:
    client.key_value_set(key, "busy:" + str(error) if error else "ok")
    return error
  outcome = client.blocking_key_value_get(key, 10 * 60 * 1000)
  return WorkdirBusyError(f"(process 0) {outcome[5:]}") if outcome != "ok" else None


@contextlib.contextmanager
def hold(workdir: str, **kwargs: Any) -> Iterator[WorkdirLock | None]:
  """Process 0 holds the workdir's lock for the block; every process fails if it cannot."""
  import jax

  lock = make_lock(workdir, **kwargs) if jax.process_index() == 0 else None
  error: WorkdirBusyError | None = None
  if lock is not None:
    try:
      lock.acquire()
    except WorkdirBusyError as e:
      error = e
    if lock.took_over:
      print(f"{workdir}: {lock.took_over}", file=sys.stderr, flush=True)
  if jax.process_count() > 1:
    error = _from_process_0(error)
  if error is not None:
    raise error
  try:
    yield lock
  finally:
    if lock is not None:
      lock.release()
