"""Multi-host on one machine: 2 processes x 2 CPU devices (gloo collectives) train exactly like
1 process x 4 devices on the same global batches, with the workdir on local disk or in a bucket
(both processes write their checkpoint shards there; tests/gcs.py's emulator)."""

import json
import socket

import numpy as np
import pytest

from attn import storage
from attn.train.checkpoint import Checkpointer
from tests.train.conftest import losses, run_child, start_child

OVERRIDES = {"model.dropout_rate": 0.0, "train.num_steps": 4, "train.eval_every": 0,
             "train.checkpoint_every": 2}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("where", ["local", "gcs"])
def test_two_processes_match_one_process(data_dir, tmp_path, where, request):
  single = str(tmp_path / "single")
  proc = run_child(single, {"data_dir": data_dir, **OVERRIDES}, mode="multihost", devices=4)
  assert proc.returncode == 0, proc.stderr[-3000:]

  multi = str(tmp_path / "multi") if where == "local" else request.getfixturevalue("gcs").url("m")
  port = _free_port()
  procs = []
  for pid in range(2):
    env = {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
           "JAX_PROCESS_ID": str(pid)}
    procs.append(start_child(multi, {"data_dir": data_dir, **OVERRIDES},
                                      mode="multihost", devices=2, extra_env=env))
  outs = [p.communicate(timeout=300) for p in procs]
  for p in procs:
    assert p.returncode == 0, "\n---\n".join(err[-3000:] for _, err in outs)
  one, two = losses(single), losses(multi)
  assert sorted(one) == [1, 2, 3, 4]
  np.testing.assert_allclose([two[s] for s in sorted(one)], [one[s] for s in sorted(one)],
                             rtol=1e-6)
  summary = json.loads(storage.read_text(storage.join(multi, "summary.json")))
  assert summary["processes"] == 2 and summary["step"] == 4
  assert Checkpointer(multi, read_only=True).all_steps() == [2, 4]
