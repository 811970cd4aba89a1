"""Multi-host on one machine: 2 processes x 2 CPU devices (gloo collectives) train exactly like
1 process x 4 devices on the same global batches."""

import socket

import numpy as np
import pytest

from tests.train.conftest import losses, run_child, start_child

OVERRIDES = {"model.dropout_rate": 0.0, "train.num_steps": 4, "train.eval_every": 0,
             "train.checkpoint_every": 2}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(data_dir, tmp_path):
  single = str(tmp_path / "single")
  proc = run_child(single, {"data_dir": data_dir, **OVERRIDES}, mode="multihost", devices=4)
  assert proc.returncode == 0, proc.stderr[-3000:]

  multi = str(tmp_path / "multi")
  port = _free_port()
  procs = []
  for pid in range(2):
    env = {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
           "JAX_PROCESS_ID": str(pid)}
    procs.append(start_child(multi, {"data_dir": data_dir, **OVERRIDES},
                                      mode="multihost", devices=2, extra_env=env))
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs, strict=True):
    assert p.returncode == 0, err[-3000:]
  one, two = losses(single), losses(multi)
  assert sorted(one) == [1, 2, 3, 4]
  np.testing.assert_allclose([two[s] for s in sorted(one)], [one[s] for s in sorted(one)],
                             rtol=1e-6)
