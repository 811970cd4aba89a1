"""Run I/O for local paths and bucket URLs alike (`gs://...`), through `etils.epath`.

Everything a run reads or writes outside the checkpoint arrays goes through here: metrics.jsonl,
summary.json, TensorBoard, tokenizer models, attention.png, sweep plans and reports. Orbax writes
the checkpoints itself (TensorStore's own gcs driver for arrays, epath for metadata), given the
URL unchanged: `resolve` makes local paths absolute and leaves URLs alone.

    path = storage.Path("gs://bucket/run") / "summary.json"
    storage.write_text_atomic(path, text)     # readers see the old or the new content, never half
    storage.append_text(path, line)           # an object store has no append: read + rewrite there

`gs://` needs gcsfs (etils reaches GCS through fsspec when TensorFlow is absent); it comes with
the `tpu`, `cuda` and `gcs` extras. Without it, `check_url_support` names the extra to install
instead of fsspec's bare ImportError deep inside a run.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import uuid
from typing import Any
from urllib.parse import quote

from etils import epath

Path = epath.Path
PathLike = str | os.PathLike

# Scheme -> (module fsspec needs, what to install).
_FILESYSTEMS = {
  "gs": ("gcsfs", "pip install -e '.[gcs]' (also in the tpu and cuda extras)"),
}


def is_url(path: PathLike) -> bool:
  """True for `scheme://...` paths (buckets), False for local ones."""
  return "://" in os.fspath(path)


def resolve(path: PathLike) -> str:
  """An absolute local path, or the URL unchanged (`abspath` would turn gs://b into ./gs:/b)."""
  path = os.fspath(path)
  return path if is_url(path) else os.path.abspath(path)


def url_support_error(path: PathLike, field: str) -> str | None:
  """Why `path` (the value of config field or flag `field`) cannot be opened here, or None."""
  path = os.fspath(path)
  if not is_url(path):
    return None
  scheme = path.split("://", 1)[0]
  if scheme not in _FILESYSTEMS:
    return (f"{field}={path!r}: the {scheme}:// scheme is not supported; use a local path or "
            f"one of {', '.join(s + '://' for s in _FILESYSTEMS)}.")
  module, install = _FILESYSTEMS[scheme]
  if not _installed(module):
    return (f"{field}={path!r} needs the {module} package, which is not installed: {install}. "
            "On a Cloud TPU VM or GPU host the credentials come from the machine's service "
            "account (or `gcloud auth application-default login`).")
  return None


def _installed(module: str) -> bool:
  return importlib.util.find_spec(module) is not None


def check_url_support(path: PathLike, field: str) -> None:
  """Raises ConfigError (naming `field` and the extra to install) if `path` cannot be opened."""
  message = url_support_error(path, field)
  if message:
    from attn.errors import ConfigError

    raise ConfigError(message)


def join(path: PathLike, *parts: str) -> str:
  """`os.path.join` that keeps URLs intact (returns a string, like os.path.join)."""
  return os.fspath(Path(path).joinpath(*parts)) if is_url(path) else os.path.join(path, *parts)


def exists(path: PathLike) -> bool:
  return Path(path).exists()


def isdir(path: PathLike) -> bool:
  return Path(path).is_dir()


def makedirs(path: PathLike) -> None:
  """Creates `path` and its parents (on an object store, folders exist implicitly)."""
  Path(path).mkdir(parents=True, exist_ok=True)


def listdir(path: PathLike) -> list[str]:
  """Names of the entries of a folder, sorted."""
  return sorted(p.name for p in Path(path).iterdir())


def read_text(path: PathLike) -> str:
  return Path(path).read_text()


def read_bytes(path: PathLike) -> bytes:
  return Path(path).read_bytes()


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
  """Writes `path` so that a reader sees the old or the new content, never half of it."""
  target = Path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  if is_url(path):
    target.write_bytes(data)  # One object upload: atomic on GCS.
    return
  tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
  tmp.write_bytes(data)
  os.replace(tmp, target)


def write_text_atomic(path: PathLike, text: str) -> None:
  write_bytes_atomic(path, text.encode())


def append_text(path: PathLike, text: str) -> None:
  """Appends `text`. Objects cannot be appended to: on a bucket the object is rewritten whole
  (fine for the small logs written here; a reader still sees a complete older version)."""
  if not is_url(path):
    with open(path, "a") as f:
      f.write(text)
    return
  target = Path(path)
  old = target.read_text() if target.exists() else ""
  write_text_atomic(path, old + text)


# -- objects with generations (gs:// only): what a lease needs ----------------------------------
# GCS gives every write of an object a new generation number, and a write or delete may be made
# conditional on the generation it replaces (ifGenerationMatch; 0 = "only if absent"). gcsfs
# exposes only the "only if absent" case, so these send the JSON API requests themselves
# through gcsfs's session (its credentials, retries and STORAGE_EMULATOR_HOST endpoint).
def _object(path: PathLike) -> tuple[Any, str, str]:
  """(gcsfs filesystem, bucket, object name) of a gs:// URL."""
  import fsspec

  fs, target = fsspec.core.url_to_fs(os.fspath(path))
  bucket, name = target.split("/", 1)
  return fs, bucket, name


def read_versioned(path: PathLike) -> tuple[bytes, int, float] | None:
  """(content, generation, time of that write in epoch seconds) of an object; None if absent."""
  fs, bucket, name = _object(path)
  while True:
    try:
      meta = fs.call("GET", "b/{}/o/{}", bucket, name, json_out=True)
    except FileNotFoundError:
      return None
    try:  # The content of exactly that generation: 404 if it was replaced since, then again.
      _, data = fs.call("GET", "b/{}/o/{}", bucket, name, alt="media",
                        generation=str(meta["generation"]))
    except FileNotFoundError:
      continue
    updated = datetime.datetime.fromisoformat(meta["updated"].replace("Z", "+00:00"))
    return data, int(meta["generation"]), updated.timestamp()


def write_if_generation(path: PathLike, data: bytes, generation: int) -> int | None:
  """Writes the object only if its current generation is `generation` (0: only if it does not
  exist); returns the new generation, or None if the precondition failed (nothing written)."""
  fs, bucket, name = _object(path)
  meta, cut = json.dumps({"name": name}), f"--{uuid.uuid4().hex}"  # A multipart upload.
  body = (f"{cut}\nContent-Type: application/json; charset=UTF-8\n\n{meta}\n{cut}\n"
          "Content-Type: application/octet-stream\n\n").encode() + data + f"\n{cut}--".encode()
  try:
    out = fs.call("POST", f"{fs._location}/upload/storage/v1/b/{quote(bucket)}/o",
                  uploadType="multipart", ifGenerationMatch=str(generation), data=body,
                  headers={"Content-Type": f'multipart/related; boundary="{cut[2:]}"'},
                  json_out=True)
  except FileExistsError:  # gcsfs's name for 412 Precondition Failed.
    return None
  fs.invalidate_cache(os.fspath(path))
  return int(out["generation"])


def remove_if_generation(path: PathLike, generation: int) -> None:
  """Deletes the object if its current generation is `generation` (else leaves it). (The GCS
  emulator of the tests ignores this precondition on deletes; GCS honors it.)"""
  fs, bucket, name = _object(path)
  try:
    fs.call("DELETE", "b/{}/o/{}", bucket, name, ifGenerationMatch=str(generation))
  except (FileExistsError, FileNotFoundError):  # Replaced since, or already gone.
    pass
  fs.invalidate_cache(os.fspath(path))


def remove(path: PathLike) -> None:
  """Deletes a file if it exists."""
  target = Path(path)
  if target.exists():
    target.unlink()


def save_figure(fig: Any, path: PathLike, **kwargs: Any) -> None:
  """`fig.savefig(path)` for a matplotlib figure; the PNG is rendered in memory first."""
  import io

  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", **kwargs)
  write_bytes_atomic(path, buffer.getvalue())


def open_file(path: PathLike, mode: str = "r", **kwargs: Any) -> Any:
  """A file object for `path` (local or bucket)."""
  return Path(path).open(mode, **kwargs)
