"""Multi-host start-up: `jax.distributed.initialize` when this process is one of several.

Two ways to learn that:
- a launcher sets JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (`launch.gpu
  local`, a hand-written sbatch script, the 2-process tests): an explicit initialization;
- JAX's own cluster detection (`jax._src.clusters`, the same code `initialize()` runs without
  arguments) finds one of: Open MPI (`OMPI_MCA_orte_hnp_uri`), SLURM (an srun step:
  SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID), a GKE TPU pod
  (TPU_WORKER_HOSTNAMES or TPU_PROCESS_ADDRESSES on a TPU VM), a GCE Cloud TPU VM (the metadata
  server's agent-worker-number: `tpu-vm create` and queued-resource slices) or Kubernetes
  (KUBERNETES_SERVICE_HOST with the `kubernetes` package). mpi4py is opt-in in JAX and not used.
  Then `jax.distributed.initialize()` gets no addresses or ids: JAX reads them itself.

A detected cluster of one process (a single-host TPU VM, a one-task SLURM job) is not
initialized: there is nobody to coordinate with, a second process on the same host would
collide on the coordinator port, and under SLURM JAX would restrict the process to one GPU.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping

import jax
from jax._src import clusters  # JAX's cluster detection; no public API exposes it.

ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def detected_cluster() -> type[clusters.ClusterEnv] | None:
  """The cluster environment `jax.distributed.initialize()` would pick, or None (JAX's order)."""
  with warnings.catch_warnings():  # Any Kubernetes pod without the `kubernetes` package warns.
    warnings.simplefilter("ignore")
    return next((env for env in clusters.ClusterEnv._cluster_types
                 if not env.opt_in_only_method and env.is_env_present()), None)


def _tasks_on_this_node(environ: Mapping[str, str]) -> int | None:
  """SLURM's task count on this node, from the compressed SLURM_STEP_TASKS_PER_NODE ("8(x2),4")."""
  spec = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
  if not spec or "SLURM_NODEID" not in environ:
    return None
  counts = []
  for part in spec.split(","):
    match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
    if match is None:
      return None
    counts += [int(match[1])] * int(match[2] or 1)
  node = int(environ["SLURM_NODEID"])
  return counts[node] if node < len(counts) else None


def slurm_local_device_ids(environ: Mapping[str, str] = os.environ) -> list[int] | None:
  """The GPUs (indices among the visible ones) this SLURM task drives; None = JAX's default.

  JAX's default gives task SLURM_LOCALID the GPU of that index, which is right only when every
  task on the node sees all of the node's GPUs and there is one task per GPU. Otherwise: a task
  bound to its own GPUs (`--gpus-per-task`) drives all it sees, and k visible GPUs shared by
  t tasks give each task k / t consecutive ones (t = 1: all of them).
  """
  visible = [d for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
  tasks = _tasks_on_this_node(environ)
  if not visible or tasks is None:
    return None
  if environ.get("SLURM_GPUS_PER_TASK") or len(visible) == 1:
    return list(range(len(visible)))  # `--gpus-per-task` binds each task to its own GPUs.
  if len(visible) % tasks:
    raise ValueError(f"SLURM gives this node {tasks} tasks and {len(visible)} visible GPUs "
                     f"(CUDA_VISIBLE_DEVICES={environ['CUDA_VISIBLE_DEVICES']}); ask for one "
                     "task per GPU (`--ntasks-per-node` = `--gpus-per-node`, as `launch.gpu "
                     "sbatch` does).")
  share = len(visible) // tasks
  local = int(environ["SLURM_LOCALID"])
  return list(range(local * share, (local + 1) * share))


def maybe_initialize(heartbeat_timeout_s: int = 100) -> bool:
  """Initializes jax.distributed if this process is one of several; returns whether it did."""
  present = [v for v in ENV_VARS if os.environ.get(v)]
  if present:
    missing = [v for v in ENV_VARS if v not in present]
    if missing:
      raise ValueError(f"Multi-host needs all of {ENV_VARS}; missing {missing}.")
    # CPU processes exchange arrays through gloo (the default CPU collectives do not span
    # processes); the setting only concerns the CPU backend, so it is harmless on GPU hosts.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
      coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
      num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
      process_id=int(os.environ["JAX_PROCESS_ID"]),
      local_device_ids=_local_device_ids(),
      heartbeat_timeout_seconds=heartbeat_timeout_s,
    )
    if jax.process_count() > 1 and jax.devices()[0].platform == "cpu":
      connect_cpu_collectives()
    return True
  env = detected_cluster()
  if env is None or env.get_process_count() <= 1:
    return False
  jax.distributed.initialize(local_device_ids=_local_device_ids(),
                             heartbeat_timeout_seconds=heartbeat_timeout_s)
  return True


def connect_cpu_collectives(timeout_s: int = 600) -> None:
  """Connects the CPU processes' collectives (gloo) over all devices now, while they are in step.

  gloo connects the processes of a device set at the first collective over it and gives up
  after 30 s (XLA's key-value deadline, which JAX does not expose): a process that reached the
  first training step 30 s after another (its compile or data slower on a loaded machine, or
  stopped) failed the run with "Gloo context initialization failed: ... GetKeyValue() timed
  out". Once connected, a collective waits for a late process as long as the coordination
  heartbeat allows, and a later program over the same devices (the train step on the default
  mesh over all of them) reuses the connection. So: meet at a coordination barrier (no 30 s
  limit), then run one tiny collective over all devices.
  """
  import jax.numpy as jnp
  import numpy as np
  from jax._src import distributed as jax_distributed  # The client has no public accessor.
  from jax.sharding import NamedSharding, PartitionSpec

  jax_distributed.global_state.client.wait_at_barrier("attn/cpu_collectives", timeout_s * 1000)
  mesh = jax.make_mesh((jax.device_count(),), ("all",))
  ones = jax.make_array_from_process_local_data(
    NamedSharding(mesh, PartitionSpec("all")), np.ones(jax.local_device_count(), np.int32))
  total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, PartitionSpec()))(ones)
  if int(total) != jax.device_count():
    raise RuntimeError(f"The CPU collectives sum {int(total)} ones over {jax.device_count()} "
                       "devices.")


def _local_device_ids() -> list[int] | None:
  """Explicit GPUs under SLURM (JAX would pick one by SLURM_LOCALID, even with explicit
  addresses); None elsewhere or when JAX_LOCAL_DEVICE_IDS says which."""
  if os.environ.get("JAX_LOCAL_DEVICE_IDS") or not clusters.SlurmCluster.is_env_present():
    return None
  return slurm_local_device_ids()
