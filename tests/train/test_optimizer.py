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


def test_warmup_then_cosine_values():
  schedule = optimizer.make_schedule(_optim(learning_rate=1.0, warmup_steps=4,
                                            end_lr_factor=0.1), num_steps=14)
  got = np.array([float(schedule(s)) for s in range(16)])
  warm = np.array([1, 2, 3, 4]) / 4
  progress = np.minimum(np.arange(12) / 10, 1.0)
  cos = 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * progress))
  np.testing.assert_allclose(got, np.concatenate([warm, cos]), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name,expected", [
  ("linear", lambda s: 1.0 - 0.5 * min(s / 10, 1.0)),
  ("inverse_sqrt", lambda s: 1.0 / np.sqrt(1.0 + s / 1)),
  ("constant", lambda s: 1.0),
])
def test_zero_warmup_schedules(name, expected):
  schedule = optimizer.make_schedule(_optim(learning_rate=2.0, warmup_steps=0, schedule=name,
                                            end_lr_factor=0.5), num_steps=10)
  for step in (0, 1, 5, 10, 20):
    assert float(schedule(step)) == pytest.approx(2.0 * expected(step), rel=1e-6)


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
