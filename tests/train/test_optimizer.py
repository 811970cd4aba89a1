"""Optimizers and schedules from config.optim: exact schedule values, the decay mask, and that
each optimizer actually descends."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from attn.train import config as config_lib
from attn.train import optimizer


def _optim(**overrides) -> ml_collections.ConfigDict:
  cfg = config_lib.optim_config()
  cfg.update(overrides)
  return cfg


def _numpy_schedule(name, step, *, warmup, decay, end):
  """Float64 reference: lr / peak for the update at `step` (the (step+1)-th update)."""
  u = step + 1.0
  if u < warmup:
    return u / warmup
  t = u - warmup
  if name == "cosine":
    return end + (1 - end) * 0.5 * (1 + np.cos(np.pi * min(t / (decay - warmup), 1.0)))
  if name == "linear":
    return 1.0 - (1 - end) * min(t / (decay - warmup), 1.0)
  if name == "inverse_sqrt":
    return 1.0 / np.sqrt(1.0 + t / max(warmup, 1))
  return 1.0


@pytest.mark.parametrize("name", ["cosine", "linear", "inverse_sqrt", "constant"])
@pytest.mark.parametrize("warmup", [0, 1, 4])
def test_schedules_at_every_step(name, warmup):
  decay = 14
  schedule = optimizer.make_schedule(_optim(learning_rate=2.0, warmup_steps=warmup, schedule=name,
                                            end_lr_factor=0.1), num_steps=decay)
  got = np.array([float(schedule(s)) for s in range(decay + 3)])
  want = 2.0 * np.array([_numpy_schedule(name, s, warmup=warmup, decay=decay, end=0.1)
                         for s in range(decay + 3)])
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  if warmup:  # The peak is reached once, at the warmup's last step; never held.
    assert got[warmup - 1] == pytest.approx(2.0) and got.argmax() == warmup - 1
    assert name == "constant" or got[warmup] < 2.0
  if name in ("cosine", "linear"):  # The run's last step gets the end value.
    assert got[decay - 1] == pytest.approx(0.2) and got[decay - 2] > 0.2


def test_cosine_is_optaxs_schedule_one_update_later():
  schedule = optimizer.make_schedule(_optim(learning_rate=1.0, warmup_steps=4,
                                            end_lr_factor=0.1), num_steps=14)
  reference = optax.warmup_cosine_decay_schedule(0.0, 1.0, 4, 14, 0.1)
  for step in range(16):
    assert float(schedule(step)) == pytest.approx(float(reference(step + 1)), rel=1e-6, abs=1e-7)


def test_warmup_as_long_as_the_decay_ends_on_the_end_value():
  schedule = optimizer.make_schedule(_optim(learning_rate=1.0, warmup_steps=4,
                                            end_lr_factor=0.1), num_steps=4)
  got = [float(schedule(s)) for s in range(5)]
  np.testing.assert_allclose(got, [0.25, 0.5, 0.75, 1.0, 0.1], rtol=1e-6)


def test_decay_mask_skips_norms_biases_and_scanned_scales():
  params = {
    "embed": {"embedding": jnp.zeros((10, 4))},
    "layer": {"attn": {"kernel": jnp.zeros((4, 2, 2)), "bias": jnp.zeros((2, 2))},
              "pre_attention_norm": {"scale": jnp.zeros((3, 4))}},  # scanned: [layers, D]
    "final_norm": {"scale": jnp.zeros((4,)), "bias": jnp.zeros((4,))},
  }
  mask = optimizer.decay_mask(params)
  assert mask == {
    "embed": {"embedding": True},
    "layer": {"attn": {"kernel": True, "bias": False}, "pre_attention_norm": {"scale": False}},
    "final_norm": {"scale": False, "bias": False},
  }


def test_weight_decay_only_touches_masked_weights():
  params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}}
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  tx, _ = optimizer.make_optimizer(
    _optim(name="adamw", learning_rate=0.1, warmup_steps=0, schedule="constant",
           weight_decay=0.5, clip_norm=0.0), num_steps=10)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  np.testing.assert_allclose(updates["dense"]["kernel"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
  np.testing.assert_array_equal(updates["dense"]["bias"], np.zeros(2))


@pytest.mark.parametrize("name", list(optimizer.OPTIMIZERS))
def test_each_optimizer_descends_a_quadratic(name):
  target = jnp.arange(6.0).reshape(2, 3)
  params = {"w": jnp.zeros((2, 3))}
  loss = lambda p: jnp.sum((p["w"] - target) ** 2)
  lr = {"sgd": 0.05, "adafactor": 0.3}.get(name, 0.1)
  tx, _ = optimizer.make_optimizer(
    _optim(name=name, learning_rate=lr, warmup_steps=2, schedule="constant"), num_steps=50)
  state = tx.init(params)
  start = float(loss(params))
  for _ in range(50):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, updates)
  assert float(loss(params)) < 0.1 * start


def test_global_norm_clipping():
  params = {"w": jnp.zeros((4,))}
  grads = {"w": jnp.full((4,), 10.0)}  # norm 20
  tx, _ = optimizer.make_optimizer(
    _optim(name="sgd", momentum=0.0, learning_rate=1.0, warmup_steps=0, schedule="constant",
           clip_norm=2.0), num_steps=1)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert float(optax.tree.norm(updates)) == pytest.approx(2.0, rel=1e-5)
