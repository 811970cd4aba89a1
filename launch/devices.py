"""Which accelerators a sweep's children get when `launch.sweep --parallel N` runs N at once:
on one or more GPUs, each child a GPU of its own (round robin) and, where several share one, its
share of the memory (XLA_PYTHON_CLIENT_MEM_FRACTION); on a TPU VM, each child its own block of
chips as a one-process slice. The runner never imports JAX's runtime to find them (it would
claim the devices itself)."""

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence

MEM_FRACTION = "XLA_PYTHON_CLIENT_MEM_FRACTION"
# What the runs on one GPU may preallocate together; the rest is CUDA contexts and headroom.
SHARED_GPU_MEMORY = 0.9
# TPU chips per run -> their grid on the host (x,y,z): pairs are 0,1 / 2,3, fours are 2x2, eight
# is a v6e / v5e host's 2x4 (as JAX's own multi-process test runner lays them out).
TPU_CHIP_BOUNDS = {1: "1,1,1", 2: "1,2,1", 4: "2,2,1", 8: "2,4,1"}
TPU_BASE_PORT = 8476  # libtpu's default TPU_PROCESS_PORT; run slot s listens on 8476 + s.


def visible_gpus(environ: Mapping[str, str] = os.environ) -> list[str]:
  """The GPUs the children could use: CUDA_VISIBLE_DEVICES if set, else nvidia-smi's list (the
  runner must not import JAX: it would take GPU memory itself); [] without NVIDIA GPUs."""
  if "CUDA_VISIBLE_DEVICES" in environ:
    return [d.strip() for d in environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
  if shutil.which("nvidia-smi") is None:
    return []
  done = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                        capture_output=True, text=True)
  return done.stdout.split() if done.returncode == 0 else []


def visible_tpu_chips(environ: Mapping[str, str] = os.environ) -> list[str]:
  """The TPU chips the children could use: TPU_VISIBLE_CHIPS if set, else the Google TPU chips
  on this host's PCI bus (JAX's count, read from /sys without starting the TPU runtime, which
  would hold every chip); [] without TPUs."""
  if environ.get("TPU_VISIBLE_CHIPS"):
    return [c.strip() for c in environ["TPU_VISIBLE_CHIPS"].split(",") if c.strip()]
  from jax._src import hardware_utils  # No public API counts chips without claiming them.

  return [str(i) for i in range(hardware_utils.num_available_tpu_chips_and_device_id()[0])]


def accelerators(parallel: int) -> tuple[list[str], list[str]]:
  """(GPUs, TPU chips) that `parallel` runs at a time share; ValueError if they cannot."""
  if parallel <= 1:
    return [], []
  gpus = visible_gpus()
  chips = [] if gpus else visible_tpu_chips()
  if chips and parallel > len(chips):
    raise ValueError(f"--parallel {parallel}: this TPU VM has {len(chips)} chip(s) "
                     f"({', '.join(chips)}) and a chip serves one process; use --parallel "
                     f"{len(chips)} or less.")
  return gpus, chips


def child_env(slot: int, parallel: int, gpus: Sequence[str],
              environ: Mapping[str, str] = os.environ, *,
              chips: Sequence[str] = ()) -> dict[str, str]:
  """The variables that give child `slot` (of `parallel` at a time) its part of the GPUs, or
  its own TPU chips."""
  if parallel <= 1 or not (gpus or chips):
    return {}
  if chips:
    return _tpu_child_env(slot, parallel, chips)
  out = {}
  if len(gpus) > 1:
    out["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
  sharing = -(-parallel // len(gpus))  # Runs at a time on one GPU (ceil).
  if sharing > 1 and MEM_FRACTION not in environ:
    out[MEM_FRACTION] = f"{SHARED_GPU_MEMORY / sharing:.3f}"
  return out


def _tpu_child_env(slot: int, parallel: int, chips: Sequence[str]) -> dict[str, str]:
  """Child `slot`'s own block of chips as a one-process slice: libtpu sees only those chips,
  arranged as TPU_CHIPS_PER_PROCESS_BOUNDS, and listens on a port of its own."""
  per = max(n for n in TPU_CHIP_BOUNDS if n <= max(1, len(chips) // parallel))
  port = TPU_BASE_PORT + slot
  return {
    "TPU_VISIBLE_CHIPS": ",".join(chips[slot * per:(slot + 1) * per]),
    "TPU_CHIPS_PER_PROCESS_BOUNDS": TPU_CHIP_BOUNDS[per],
    "TPU_PROCESS_BOUNDS": "1,1,1",  # One process in its slice (it coordinates with nobody).
    "TPU_PROCESS_PORT": str(port),
    "TPU_PROCESS_ADDRESSES": f"localhost:{port}",
    "CLOUD_TPU_TASK_ID": "0",
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",  # Else libtpu's lock file lets one process per host.
  }
