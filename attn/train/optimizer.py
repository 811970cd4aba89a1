"""Optimizers and learning-rate schedules from `config.optim`, by name.

    tx, schedule = make_optimizer(config.optim, num_steps=config.train.num_steps)

Every optimizer is `clip_by_global_norm(clip_norm)` (if on) followed by the update rule with a
decoupled weight decay that skips norms, biases and other vectors (`decay_mask`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from attn.errors import check_choice

Schedule = Callable[[jax.Array], jax.Array]


def _inverse_sqrt(peak: float, warmup: int, decay: int, end: float) -> optax.Schedule:
  # optax has none: 1/sqrt(step) after the warmup, continuous with it (Vaswani et al., 2017).
  return optax.join_schedules(
    [optax.linear_schedule(0.0, peak, warmup),
     lambda t: peak * jax.lax.rsqrt(1.0 + t / max(warmup, 1))], [warmup])


# Each maps (peak lr, warmup steps, decay steps, end factor) to an optax schedule of the number of
# updates done: a linear warmup from 0 to the peak over `warmup`, then the named decay reaching
# `end * peak` at `decay` (cosine, linear) or going on forever (inverse_sqrt, constant).
SCHEDULES: dict[str, Callable[[float, int, int, float], optax.Schedule]] = {
  "cosine": lambda peak, warmup, decay, end: optax.warmup_cosine_decay_schedule(
    0.0, peak, warmup, decay, end * peak),
  "linear": lambda peak, warmup, decay, end: optax.join_schedules(
    [optax.linear_schedule(0.0, peak, warmup),
     optax.linear_schedule(peak, end * peak, decay - warmup)], [warmup]),
  "inverse_sqrt": _inverse_sqrt,
  "constant": lambda peak, warmup, decay, end: optax.join_schedules(
    [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup]),
}


def make_schedule(cfg: Any, num_steps: int) -> Schedule:
  """Linear warmup from 0 to `learning_rate` over `warmup_steps`, then `schedule`.

  The update at step s (0-based) is the (s + 1)-th, so it gets the optax schedule's value at
  s + 1: the first update already has lr > 0, the peak is reached once, at step warmup - 1, and
  the last step of the decay (decay_steps - 1, by default the run's last) gets the end value.
  """
  warmup = int(cfg.warmup_steps)
  decay = int(cfg.decay_steps) if cfg.get("decay_steps") is not None else int(num_steps)
  # At least one decay step (optax's cosine refuses none): warmup == decay ends on the end value.
  decay = max(decay, warmup + 1)
  schedule = SCHEDULES[cfg.schedule](float(cfg.learning_rate), warmup, decay,
                                     float(cfg.end_lr_factor))
  return lambda step: schedule(jnp.asarray(step, jnp.int32) + 1)


def decay_mask(params: Any) -> Any:
  """True for the weights that get weight decay: matrices, not norms, biases or scales.

  Names matter, not only ranks: with scanned layers a norm scale is [layers, D].
  """

  def keep(path: tuple[Any, ...], leaf: Any) -> bool:
    # Attributes are not names: a wrapped parameter (a flax box, sharding.optimizer_shardings'
    # tag) adds `.value` to its path.
    names = [jax.tree_util.keystr((k,), simple=True).lower() for k in path
             if not isinstance(k, jax.tree_util.GetAttrKey)]
    if names and names[-1] in ("bias", "scale", "embedding_bias"):
      return False
    if any("norm" in n for n in names):
      return False
    return jnp.ndim(leaf) >= 2

  return jax.tree_util.tree_map_with_path(keep, params)


def _adamw(cfg: Any, lr: Schedule) -> optax.GradientTransformation:
  return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                     mask=decay_mask)


def _adafactor(cfg: Any, lr: Schedule) -> optax.GradientTransformation:
  # Clipping is done by the shared global-norm clip, not Adafactor's own update clipping.
  return optax.adafactor(lr, weight_decay_rate=cfg.weight_decay or None,
                         weight_decay_mask=decay_mask, clipping_threshold=None,
                         multiply_by_parameter_scale=False)


def _lion(cfg: Any, lr: Schedule) -> optax.GradientTransformation:
  return optax.lion(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask)


def _sgd(cfg: Any, lr: Schedule) -> optax.GradientTransformation:
  parts = []
  if cfg.weight_decay:
    parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask))
  parts.append(optax.sgd(lr, momentum=cfg.momentum or None, nesterov=cfg.nesterov))
  return optax.chain(*parts)


OPTIMIZERS: dict[str, Callable[[Any, Schedule], optax.GradientTransformation]] = {
  "adamw": _adamw,
  "adafactor": _adafactor,
  "lion": _lion,
  "sgd": _sgd,
}


def make_optimizer(cfg: Any, *, num_steps: int) -> tuple[optax.GradientTransformation, Schedule]:
  """The optax transformation and its schedule for `config.optim`."""
  check_choice("config.optim.name", cfg.name, OPTIMIZERS)
  check_choice("config.optim.schedule", cfg.schedule, SCHEDULES)
  schedule = make_schedule(cfg, num_steps)
  tx = OPTIMIZERS[cfg.name](cfg, schedule)
  if cfg.clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
  return tx, schedule
