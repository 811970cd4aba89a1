"""Array checksums against a NumPy reference, on any sharding; a flipped bit in a saved array
(which Orbax restores silently) is caught, the step moved aside, the previous one used."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from attn.train import checksums, recovery
from attn.train.checkpoint import Checkpointer


def _np_fingerprint(x: np.ndarray) -> str:
  """The documented fingerprint in NumPy uint64 arithmetic, reduced modulo 2^32 by hand."""
  words = x.view({2: np.uint16, 4: np.uint32}[x.dtype.itemsize]).astype(np.uint64).ravel()
  mask = np.uint64(0xFFFFFFFF)
  index = np.arange(words.size, dtype=np.uint64)
  a = ((index * np.uint64(0x9E3779B1)) & mask) | np.uint64(1)
  b = (((index + np.uint64(0xC2B2AE3D)) * np.uint64(0x85EBCA77)) & mask) | np.uint64(1)
  mixed = (((words ^ (words >> np.uint64(15))) * np.uint64(0xC2B2AE3D)) & mask) ^ (
    words >> np.uint64(13))
  first = int(np.sum((words * a) & mask, dtype=np.uint64) & mask)
  second = int(np.sum((mixed * b) & mask, dtype=np.uint64) & mask)
  return f"{first:08x}{second:08x}"


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16, np.int32])
def test_fingerprint_matches_numpy_on_any_sharding(dtype):
  x = (np.random.RandomState(0).randn(16, 24) * 100).astype(dtype)
  want = _np_fingerprint(np.asarray(x))
  mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Explicit,))
  sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec("d", None)))
  across = jax.device_put(x, NamedSharding(mesh, PartitionSpec(None, "d")))
  for array in (jnp.asarray(x), sharded, across):
    assert checksums.arrays({"x": array}) == {"x": want}


def test_every_single_bit_flip_changes_the_fingerprint():
  x = np.random.RandomState(1).randn(5, 7).astype(np.float32)
  base = checksums.arrays({"x": x})["x"]
  words = x.view(np.uint32).copy()
  for element in (0, 17, 34):
    for bit in range(32):
      flipped = words.copy()
      flipped.flat[element] ^= np.uint32(1 << bit)
      assert checksums.arrays({"x": flipped.view(np.float32)})["x"] != base, (element, bit)
  swapped = x.copy()
  swapped.flat[[3, 4]] = swapped.flat[[4, 3]]
  assert checksums.arrays({"x": swapped})["x"] != base


def test_flipped_bit_in_a_saved_array_falls_back_to_the_previous_step(tmp_path, capfd):
  w = np.random.RandomState(0).randn(64, 256).astype(np.float32)
  ckpt = Checkpointer(str(tmp_path), keep=3)
  ckpt.save(1, {"w": jnp.asarray(w), "b": jnp.arange(4.0)})
  ckpt.save(2, {"w": jnp.asarray(w + 1), "b": jnp.arange(4.0)})
  ckpt.close()
  # The 64 KiB array is the one large file of step 2; Orbax compresses it without a checksum,
  # so a flipped bit there decodes to wrong values without an error (checked below).
  step2 = os.path.join(str(tmp_path), "checkpoints", "2")
  big = max(glob.glob(f"{step2}/state/**/d/*", recursive=True), key=os.path.getsize)
  data = bytearray(open(big, "rb").read())
  data[4135] ^= 0x04
  open(big, "wb").write(data)
  abstract = {"w": jax.ShapeDtypeStruct(w.shape, w.dtype), "b": jax.ShapeDtypeStruct((4,),
                                                                                       np.float32)}
  ckpt = Checkpointer(str(tmp_path), keep=3)
  silently = ckpt.restore(2, abstract)  # What a restore without checksums would have used.
  assert not np.array_equal(np.asarray(silently["w"]), w + 1)
  step, state = recovery.restore_newest(ckpt, abstract)
  ckpt.close()
  assert step == 1
  np.testing.assert_array_equal(np.asarray(state["w"]), w)
  err = capfd.readouterr().err
  assert f"{step2}/state: ValueError: 1 array(s) differ from their recorded checksums: w" in err
  assert sorted(os.listdir(os.path.join(str(tmp_path), "checkpoints"))) == ["1", "corrupt-2"]
  moved = os.path.join(str(tmp_path), "checkpoints", "corrupt-2")
  assert os.path.getsize(big.replace(step2, moved)) == len(data)  # Moved whole, not deleted.
