"""Checksums of a checkpoint's contents, recorded at save time and verified at restore.

Arrays: a 64-bit fingerprint per array, computed on the devices where the array lives (no host
copy, any sharding, any number of hosts): two sums, modulo 2^32, of the array's bits as 32-bit
words times position-dependent odd multipliers (one of them over a non-linear mix). A sum modulo
2^32 does not depend on the reduction order, so the fingerprint of an array is the same on 1
device and on a pod; any single flipped bit changes it (an odd multiple of 2^k is never 0 modulo
2^32), and so does a swap of two unequal words.

Data iterator: the SHA-256 of each process's Grain state (canonical JSON).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_M1, _M2, _M3 = 0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D


def _words(x: jax.Array) -> jax.Array:
  """The array's bits as uint32 words (a 64-bit dtype gets a trailing axis of 2)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = jnp.dtype(x.dtype).itemsize
  if size in (4, 8):
    return lax.bitcast_convert_type(x, jnp.uint32)
  narrow = {2: jnp.uint16, 1: jnp.uint8}[size]
  return lax.bitcast_convert_type(x, narrow).astype(jnp.uint32)


def _fingerprint(x: jax.Array) -> jax.Array:
  """uint32[2] of one array (see the module docstring)."""
  w = _words(x)
  # The flat position of every element, built from iotas (a reshape could move shards).
  index = jnp.zeros(w.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(w.ndim)):
    index = index + lax.broadcasted_iota(jnp.uint32, w.shape, axis) * jnp.uint32(stride)
    stride *= w.shape[axis]
  a = index * jnp.uint32(_M1) | jnp.uint32(1)
  b = (index + jnp.uint32(_M3)) * jnp.uint32(_M2) | jnp.uint32(1)
  mixed = (w ^ (w >> 15)) * jnp.uint32(_M3) ^ (w >> 13)
  return jnp.stack([jnp.sum(w * a, dtype=jnp.uint32), jnp.sum(mixed * b, dtype=jnp.uint32)])


@jax.jit
def _fingerprints(tree: Any) -> Any:
  return jax.tree.map(_fingerprint, tree)


def path_name(path: tuple[Any, ...]) -> str:
  """A pytree path as 'params/decoder/...'."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


def arrays(tree: Any) -> dict[str, str]:
  """Array path ('params/decoder/...') -> 16 hex digits, for every leaf of `tree`."""
  prints = _fingerprints(tree)
  out = {}
  for path, value in jax.tree_util.tree_flatten_with_path(prints)[0]:
    # Replicated over every device: any local shard is the whole (2,) result.
    words = np.asarray(value.addressable_data(0)) if isinstance(value, jax.Array) else value
    out[path_name(path)] = f"{int(words[0]):08x}{int(words[1]):08x}"
  return out


def data_state(state: Any) -> str:
  """SHA-256 of a data iterator state (as Grain's JSON carries it)."""
  return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


def compare(recorded: dict[str, str], actual: dict[str, str]) -> list[str]:
  """Array paths whose checksum differs or that exist on one side only."""
  return sorted(k for k in set(recorded) | set(actual) if recorded.get(k) != actual.get(k))


def gather_data_sums(digest: str) -> dict[str, str]:
  """{'process_<i>-of-<n>.json': sha256} over every process (each knows only its own)."""
  count = jax.process_count()
  if count == 1:
    return {"process_0-of-1.json": digest}
  from jax.experimental import multihost_utils

  mine = np.frombuffer(bytes.fromhex(digest), np.uint8)
  every = np.asarray(multihost_utils.process_allgather(mine))
  return {f"process_{i}-of-{count}.json": bytes(every[i]).hex() for i in range(count)}
