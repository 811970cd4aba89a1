"""Tests of attn/layers/norms.py against float64 NumPy, padding included for BatchNorm."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.layers import norms

B, T, D = 3, 5, 8
# Row 0 full, row 1 with two padding tokens, row 2 with four: uneven on purpose.
MASK_BT = np.array(
  [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]],
  bool,
)


def _x(seed: int = 0, shift: float = 3.0) -> np.ndarray:
  # Non-zero mean and non-unit scale so that centering and scaling are both exercised.
  return (np.random.default_rng(seed).normal(size=(B, T, D)) * 2.0 + shift).astype(np.float32)


def _with_random_affine(variables, seed: int = 1):
  """Replaces the ones / zeros init of scale and bias so that they are tested too."""
  rng = np.random.default_rng(seed)
  params = jax.tree.map(
    lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), nn.unbox(variables)["params"]
  )
  return {**nn.unbox(variables), "params": params}


def test_layernorm_matches_numpy():
  x = _x()
  module = norms.LayerNorm()
  variables = _with_random_affine(module.init(jax.random.key(0), x))
  got = jax.jit(module.apply)(variables, x)
  x64 = x.astype(np.float64)
  mean = x64.mean(-1, keepdims=True)
  var = x64.var(-1, keepdims=True)
  p = variables["params"]
  want = (x64 - mean) / np.sqrt(var + 1e-6) * np.asarray(p["scale"]) + np.asarray(p["bias"])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_rmsnorm_matches_numpy():
  x = _x()
  module = norms.RMSNorm(epsilon=1e-5)
  variables = _with_random_affine(module.init(jax.random.key(0), x))
  assert set(variables["params"]) == {"scale"}
  got = module.apply(variables, x)
  x64 = x.astype(np.float64)
  want = (
    x64
    / np.sqrt((x64**2).mean(-1, keepdims=True) + 1e-5)
    * np.asarray(variables["params"]["scale"])
  )
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(norms.NORMS))
def test_norm_params_carry_embed_axis_and_dtypes(kind):
  x = jnp.asarray(_x(), jnp.bfloat16)
  module = norms.make_norm(kind)
  variables = module.init(jax.random.key(0), x)
  specs = jax.tree.map(tuple, nn.get_partition_spec(variables)["params"])
  assert set(specs) == ({"scale"} if kind == "rmsnorm" else {"scale", "bias"})
  assert all(spec == ("embed",) for spec in specs.values())
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nn.unbox(variables)["params"]))
  # The one call signature every kind accepts; output in the input's dtype by default.
  out = module.apply(variables, x, mask=jnp.asarray(MASK_BT), deterministic=True)
  assert out.dtype == jnp.bfloat16 and out.shape == x.shape
  assert norms.make_norm(kind, dtype=jnp.float32).apply(variables, x).dtype == jnp.float32


def test_make_norm_unknown_lists_kinds():
  with pytest.raises(ValueError, match=r"model.norm='groupnorm' is not one of \['layernorm'"):
    norms.make_norm("groupnorm")


def _np_masked_stats(x: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  tokens = x.astype(np.float64)[mask]  # [num_real_tokens, D]
  return tokens.mean(0), tokens.var(0)


def _train_step(module, variables, x, mask):
  return module.apply(variables, x, mask=mask, deterministic=False, mutable=["batch_stats"])


def test_batchnorm_train_uses_masked_batch_stats_and_updates_running_average():
  x = _x()
  module = norms.BatchNorm(momentum=0.9)
  variables = _with_random_affine(module.init(jax.random.key(0), x, deterministic=False))
  # Init is not a training step: running averages stay at mean 0, var 1.
  np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros(D))
  np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones(D))

  out, updates = jax.jit(_train_step, static_argnums=0)(module, variables, x, MASK_BT)
  mean, var = _np_masked_stats(x, MASK_BT)
  p = variables["params"]
  want = (x - mean) / np.sqrt(var + 1e-5) * np.asarray(p["scale"]) + np.asarray(p["bias"])
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.1 * mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(updates["batch_stats"]["var"], 0.9 + 0.1 * var, rtol=1e-5)

  # A second step moves the averages again: running = 0.9 * running + 0.1 * batch.
  x2 = _x(seed=2, shift=-1.0)
  variables = {**variables, **updates}
  _, updates2 = _train_step(module, variables, x2, MASK_BT)
  mean2, var2 = _np_masked_stats(x2, MASK_BT)
  np.testing.assert_allclose(
    updates2["batch_stats"]["mean"], 0.9 * 0.1 * mean + 0.1 * mean2, rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(
    updates2["batch_stats"]["var"], 0.9 * (0.9 + 0.1 * var) + 0.1 * var2, rtol=1e-5
  )


def test_batchnorm_padding_changes_nothing():
  x = _x()
  module = norms.BatchNorm()
  variables = module.init(jax.random.key(0), x, deterministic=False)
  garbage = np.where(MASK_BT[..., None], x, np.float32(1e6))
  garbage[2, 3, 0] = np.inf  # even non-finite padding must not leak
  out_a, upd_a = _train_step(module, variables, x, MASK_BT)
  out_b, upd_b = _train_step(module, variables, garbage, MASK_BT)
  np.testing.assert_array_equal(np.asarray(out_a)[MASK_BT], np.asarray(out_b)[MASK_BT])
  jax.tree.map(np.testing.assert_array_equal, upd_a, upd_b)
  # And the statistics are those of the real tokens only, not of the padded batch.
  np.testing.assert_allclose(
    upd_a["batch_stats"]["mean"], 0.01 * _np_masked_stats(x, MASK_BT)[0], rtol=1e-5, atol=1e-7
  )


def test_batchnorm_eval_uses_running_average():
  x = _x()
  module = norms.BatchNorm()
  variables = _with_random_affine(module.init(jax.random.key(0), x, deterministic=False))
  stats = {"mean": jnp.linspace(-1.0, 1.0, D), "var": jnp.linspace(0.5, 2.0, D)}
  variables = {**variables, "batch_stats": stats}
  # Eval needs no mutable collection and ignores the batch (and its mask).
  out = module.apply(variables, x, mask=jnp.asarray(MASK_BT), deterministic=True)
  p = variables["params"]
  mean, var = np.asarray(stats["mean"]), np.asarray(stats["var"])
  want = (x - mean) / np.sqrt(var + 1e-5) * np.asarray(p["scale"]) + np.asarray(p["bias"])
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
  # use_running_average overrides the call's flag, in both directions.
  forced_eval = norms.BatchNorm(use_running_average=True)
  np.testing.assert_allclose(forced_eval.apply(variables, x, deterministic=False), out, rtol=1e-6)
  forced_train = norms.BatchNorm(use_running_average=False)
  _, upd = forced_train.apply(variables, x, mutable=["batch_stats"])
  assert not np.allclose(upd["batch_stats"]["mean"], stats["mean"])


def test_batchnorm_no_mask_and_all_padding():
  x = _x()
  module = norms.BatchNorm(momentum=0.5)
  variables = module.init(jax.random.key(0), x, deterministic=False)
  _, upd = _train_step(module, variables, x, None)
  full_mean, _ = _np_masked_stats(x, np.ones((B, T), bool))
  np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.5 * full_mean, rtol=1e-5)
  # A batch of padding only is no evidence: the running averages stay put (and stay finite).
  out, upd = _train_step(module, variables, x, np.zeros((B, T), bool))
  jax.tree.map(np.testing.assert_array_equal, upd["batch_stats"], variables["batch_stats"])
  assert set(upd["batch_stats"]) == {"mean", "var"}  # The names old checkpoints hold.
  assert np.all(np.isfinite(out))
  with pytest.raises(ValueError, match="mask shape"):
    _train_step(module, variables, x, np.ones((B, T + 1), bool))
