"""steps.batchnorm_drift: the batch statistics recovered from the running averages before and
after a step equal the batch's own mean / variance (float64 NumPy), and the logged distances are
Shen et al.'s (1/d) ||mu_B - mu||, (1/d) ||sigma_B^2 - sigma^2||."""

import jax
import numpy as np

from attn.layers.norms import BatchNorm
from attn.train.steps import batchnorm_drift


def _distance(batch, running):
  return np.linalg.norm(np.float64(batch) - np.float64(running)) / running.size


def test_recovers_the_batch_statistics_of_every_layer():
  rng = np.random.default_rng(0)
  # Depth order, not sorted order: layer_2 before layer_10, the final norm last.
  names = ["layer_2", "layer_10", "final_norm"]
  xs = {name: rng.normal(1.5 - i, 2.0 / (i + 1), (8, 5, 6)) for i, name in enumerate(names)}
  before, after = {}, {}
  for name, x in xs.items():
    norm = BatchNorm()
    variables = norm.init(jax.random.key(0), x)
    running = {"mean": rng.normal(size=6).astype(np.float32),
               "var": rng.uniform(0.5, 2.0, 6).astype(np.float32)}
    _, updates = norm.apply({**variables, "batch_stats": running}, x, deterministic=False,
                            mutable=["batch_stats"])
    before[name], after[name] = running, updates["batch_stats"]

  drift = jax.device_get(batchnorm_drift(before, after, BatchNorm.momentum))

  expected = {}
  for stat, fn in (("mean", np.mean), ("var", np.var)):  # biased variance, as BatchNorm's
    per_layer = [_distance(fn(xs[n].reshape(-1, 6), axis=0), before[n][stat]) for n in names]
    expected[f"bn_{stat}_distance"] = np.mean(per_layer)
    expected[f"bn_first_{stat}_distance"] = per_layer[0]
  assert sorted(drift) == sorted(expected)
  for key, value in expected.items():
    # float32 running averages, divided by 1 - momentum = 0.01: ~1e-4 relative.
    np.testing.assert_allclose(drift[key], value, rtol=2e-3, err_msg=key)
  assert drift["bn_first_mean_distance"] != drift["bn_mean_distance"]


def test_no_batchnorm_no_metrics():
  assert batchnorm_drift({}, {}, 0.99) == {}
