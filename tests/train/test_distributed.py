"""attn.train.distributed: which simulated cluster environments start jax.distributed, and with
what JAX's own detection then hands to the runtime (no cluster, no network: the environment and
the TPU metadata server are faked)."""

import jax
import pytest
from jax._src import clusters
from jax._src.clusters import cloud_tpu_cluster

from attn.train import distributed

# Everything JAX's detectors read, so the host's own environment cannot leak into a test.
DETECTED_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                 "JAX_LOCAL_DEVICE_IDS", "JAX_COORDINATOR_PORT", "OMPI_MCA_orte_hnp_uri",
                 "SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                 "SLURM_LOCALID", "SLURM_NODEID", "SLURM_STEP_TASKS_PER_NODE",
                 "SLURM_TASKS_PER_NODE", "SLURM_GPUS_PER_TASK", "CUDA_VISIBLE_DEVICES",
                 "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "TPU_WORKER_ID",
                 "TPU_SKIP_MDS_QUERY", "MEGASCALE_NUM_SLICES", "MEGASCALE_SLICE_ID",
                 "KUBERNETES_SERVICE_HOST")


@pytest.fixture
def calls(monkeypatch):
  """A bare environment; jax.distributed.initialize records its keyword arguments."""
  for var in DETECTED_VARS:
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", False)
  monkeypatch.setattr(jax.config, "update", lambda *a: None)  # The gloo switch of explicit starts.
  recorded = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: recorded.append(kw))
  return recorded


def slurm(monkeypatch, *, nodes, tasks_per_node, node, local, gpus, job=4242, **extra):
  """The variables srun gives one task of a `nodes` x `tasks_per_node` step."""
  env = {"SLURM_JOB_ID": str(job), "SLURM_STEP_NODELIST": f"gpu[003-{2 + nodes:03d}]",
         "SLURM_NTASKS": str(nodes * tasks_per_node), "SLURM_NODEID": str(node),
         "SLURM_PROCID": str(node * tasks_per_node + local), "SLURM_LOCALID": str(local),
         "SLURM_STEP_TASKS_PER_NODE": f"{tasks_per_node}(x{nodes})",
         "CUDA_VISIBLE_DEVICES": gpus, **extra}
  for key, value in env.items():
    monkeypatch.setenv(key, value)


def jax_would_get(local_device_ids):
  """(coordinator, process count, process id, local devices) as initialize() completes them."""
  return clusters.ClusterEnv.auto_detect_unset_distributed_params(
    None, None, None, local_device_ids, None, 10)


def test_single_machine_does_nothing(calls):
  assert distributed.detected_cluster() is None
  assert not distributed.maybe_initialize()
  assert calls == []


def test_explicit_launcher_variables(calls, monkeypatch):
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  monkeypatch.setenv("JAX_PROCESS_ID", "1")
  assert distributed.maybe_initialize(heartbeat_timeout_s=7)
  assert calls == [{"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1,
                    "local_device_ids": None, "heartbeat_timeout_seconds": 7}]
  monkeypatch.delenv("JAX_PROCESS_ID")
  with pytest.raises(ValueError, match="JAX_PROCESS_ID"):
    distributed.maybe_initialize()


def test_slurm_one_task_per_gpu(calls, monkeypatch):
  """What `launch.gpu sbatch --nodes 2 --gpus_per_node 8` gets: 16 processes, one GPU each."""
  slurm(monkeypatch, nodes=2, tasks_per_node=8, node=1, local=3, gpus="0,1,2,3,4,5,6,7")
  assert distributed.maybe_initialize()
  assert calls == [{"local_device_ids": [3], "heartbeat_timeout_seconds": 100}]
  # Port: JAX's rule, job id mod 4096 into the top of the ephemeral range.
  assert jax_would_get(calls[0]["local_device_ids"]) == (
    f"gpu003:{4242 % 4096 + 61440}", 16, 11, [3])


def test_slurm_one_task_per_node_keeps_all_gpus(calls, monkeypatch):
  """The old sbatch (one task per node, 8 GPUs): JAX alone would give each task GPU 0 only."""
  slurm(monkeypatch, nodes=2, tasks_per_node=1, node=0, local=0, gpus="0,1,2,3,4,5,6,7")
  assert jax_would_get(None)[1:] == (2, 0, [0])  # The silent 2-device run of the issue.
  assert distributed.maybe_initialize()
  assert calls[0]["local_device_ids"] == list(range(8))
  assert jax_would_get(calls[0]["local_device_ids"])[1:] == (2, 0, list(range(8)))


def test_hand_written_sbatch_with_explicit_addresses(calls, monkeypatch):
  """launch.gpu's docstring script: JAX_* variables, one task per node seeing 8 GPUs."""
  slurm(monkeypatch, nodes=2, tasks_per_node=1, node=1, local=0, gpus="0,1,2,3,4,5,6,7")
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "gpu003:12355")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  monkeypatch.setenv("JAX_PROCESS_ID", "1")
  assert distributed.maybe_initialize()
  assert calls[0]["local_device_ids"] == list(range(8))
  monkeypatch.setenv("JAX_LOCAL_DEVICE_IDS", "0,1")  # The user's choice wins (JAX reads it).
  distributed.maybe_initialize()
  assert calls[1]["local_device_ids"] is None


def test_slurm_tasks_bound_to_their_gpus(calls, monkeypatch):
  """`--gpus-per-task`: SLURM shows each task only its own GPUs; it drives all of them."""
  slurm(monkeypatch, nodes=1, tasks_per_node=4, node=0, local=2, gpus="4,5",
        SLURM_GPUS_PER_TASK="2")
  assert distributed.maybe_initialize()
  assert calls[0]["local_device_ids"] == [0, 1]
  slurm(monkeypatch, nodes=1, tasks_per_node=4, node=0, local=3, gpus="6",
        SLURM_GPUS_PER_TASK="1")
  assert distributed.slurm_local_device_ids() == [0]


def test_slurm_shares_and_uneven_nodes(monkeypatch):
  env = {"SLURM_STEP_TASKS_PER_NODE": "2(x2),4", "SLURM_NODEID": "1", "SLURM_LOCALID": "1",
         "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}
  assert distributed.slurm_local_device_ids(env) == [4, 5, 6, 7]  # 2 tasks share 8 GPUs.
  assert distributed.slurm_local_device_ids({**env, "SLURM_NODEID": "2"}) == [2, 3]
  assert distributed.slurm_local_device_ids({**env, "CUDA_VISIBLE_DEVICES": ""}) is None
  with pytest.raises(ValueError, match="one task per GPU"):
    distributed.slurm_local_device_ids({**env, "SLURM_NODEID": "2",
                                        "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5"})


def test_slurm_single_task_is_not_initialized(calls, monkeypatch):
  """One task (salloc + srun python): initializing would only pin it to GPU 0."""
  slurm(monkeypatch, nodes=1, tasks_per_node=1, node=0, local=0, gpus="0,1")
  assert distributed.detected_cluster() is clusters.SlurmCluster
  assert not distributed.maybe_initialize()
  assert calls == []


def fake_gce_tpu_vm(monkeypatch, endpoints, worker):
  """A Cloud TPU VM whose metadata server describes a slice with these worker endpoints."""
  metadata = {"agent-worker-number": str(worker), "worker-network-endpoints": endpoints,
              "tpu-env": "ACCELERATOR_TYPE: 'v4-16'\nTYPE: 'V4'"}
  monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
  monkeypatch.setattr(cloud_tpu_cluster, "get_metadata", lambda key: (metadata[key], 200))


def test_gce_tpu_pod_slice_from_metadata(calls, monkeypatch):
  """`tpu-vm create --accelerator-type=v4-16`: no TPU_* variables, only the metadata server."""
  fake_gce_tpu_vm(monkeypatch, "w-0:uid0:10.0.0.2,w-1:uid1:10.0.0.3", worker=1)
  assert distributed.detected_cluster() is clusters.GceTpuCluster
  assert distributed.maybe_initialize(heartbeat_timeout_s=30)
  assert calls == [{"local_device_ids": None, "heartbeat_timeout_seconds": 30}]
  monkeypatch.setattr(cloud_tpu_cluster.BaseTpuCluster, "wait_for_coordinator",
                      classmethod(lambda cls, address, timeout: None))
  # JAX's ids: 2 processes, this is 1, coordinator worker 0; never local_device_ids on TPU.
  assert jax_would_get(None) == ("10.0.0.2:8482", 2, 1, None)


def test_single_host_tpu_vm_is_not_initialized(calls, monkeypatch):
  fake_gce_tpu_vm(monkeypatch, "10.0.0.2", worker=0)
  assert distributed.detected_cluster() is clusters.GceTpuCluster
  assert not distributed.maybe_initialize()
  assert calls == []


def test_gke_tpu_pod(calls, monkeypatch):
  monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "h0,h1,h2,h3")
  monkeypatch.setenv("TPU_WORKER_ID", "2")
  monkeypatch.setenv("TPU_SKIP_MDS_QUERY", "1")  # GKE: no metadata server to ask.
  monkeypatch.setenv("MEGASCALE_NUM_SLICES", "1")  # Set by JobSet; else read from metadata.
  monkeypatch.setenv("MEGASCALE_SLICE_ID", "0")
  assert distributed.detected_cluster() is clusters.GkeTpuCluster
  assert distributed.maybe_initialize()
  assert calls == [{"local_device_ids": None, "heartbeat_timeout_seconds": 100}]
  assert clusters.GkeTpuCluster.get_process_id() == 2


def test_generated_sbatch_uses_every_gpu_once(calls, monkeypatch):
  """Each task of `launch.gpu sbatch --nodes 2 --gpus_per_node 8`, as SLURM would start it."""
  from launch import gpu

  script = gpu.sbatch_script(gpu.parse_args(["sbatch", "--nodes", "2", "--gpus_per_node", "8",
                                             "--config", "experiments/lm.py", "--workdir", "w"]))
  opts = dict(line.removeprefix("#SBATCH --").split("=", 1) for line in script.splitlines()
              if line.startswith("#SBATCH --") and "=" in line)
  nodes, tasks, gpus = int(opts["nodes"]), int(opts["ntasks-per-node"]), int(opts["gpus-per-node"])
  used, ids = set(), set()
  for node in range(nodes):
    for local in range(tasks):
      slurm(monkeypatch, nodes=nodes, tasks_per_node=tasks, node=node, local=local,
            gpus=",".join(map(str, range(gpus))))
      assert distributed.maybe_initialize()
      _, count, pid, devices = jax_would_get(calls[-1]["local_device_ids"])
      assert count == 16 and len(devices) == 1
      used |= {(node, d) for d in devices}
      ids.add(pid)
  assert used == {(n, g) for n in range(2) for g in range(8)} and ids == set(range(16))
