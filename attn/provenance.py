"""What produced a result: the git commit (and whether the tree had uncommitted changes) and
the versions of the packages that decide the numbers. Recorded in summary.json, benchmark JSON
and reproduction results; with the lock files in requirements/ enough to rebuild the setup."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The packages whose versions can change a measured number; accelerator plugins when present.
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "tensorflow-datasets",
            "numpy", "ml-collections", "jax-cuda12-plugin", "libtpu")


def _git(*args: str) -> str | None:
  try:
    done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
  except (OSError, subprocess.TimeoutExpired):
    return None
  return done.stdout.strip() if done.returncode == 0 else None


def versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
  """package -> installed version (None when it is not installed)."""
  out: dict[str, str | None] = {}
  for name in packages:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


def provenance() -> dict[str, Any]:
  """{'commit', 'dirty', 'python', 'platform', 'versions'}; commit None outside a git checkout."""
  status = _git("status", "--porcelain", "--untracked-files=no")
  dirty = bool(status) if status is not None else None
  return {"commit": _git("rev-parse", "HEAD"), "dirty": dirty,
          "python": platform.python_version(), "platform": platform.platform(),
          "cpu_count": os.cpu_count(), "versions": versions()}
