"""Multi-host start-up: `jax.distributed.initialize` when a launcher says there are peers.

Launchers that set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (our sweep
runner, a custom sbatch script, a 2-process local test) get an explicit initialization; on a
Cloud TPU VM pod or under SLURM, JAX detects the cluster by itself. A single machine without
either does nothing.
"""

from __future__ import annotations

import os

import jax

ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _cluster_detected() -> bool:
  """A TPU pod slice with several workers, or a SLURM job with several tasks."""
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
    return True
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hosts.split(",") if h]) > 1


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
      heartbeat_timeout_seconds=heartbeat_timeout_s,
    )
    return True
  if _cluster_detected():
    jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_s)
    return True
  return False

