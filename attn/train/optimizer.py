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

Schedule = Callable[[jax.Array], jax.Array]


def _cosine(progress: jax.Array, end: float) -> jax.Array:
  return end + (1.0 - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))


def _linear(progress: jax.Array, end: float) -> jax.Array:
  return 1.0 - (1.0 - end) * progress


# Each maps (steps after warmup, decay length, warmup length, end factor) -> lr multiplier.
SCHEDULES: dict[str, Callable[..., jax.Array]] = {
  "cosine": lambda t, decay, warmup, end: _cosine(jnp.clip(t / max(decay - warmup, 1), 0, 1), end),
  "linear": lambda t, decay, warmup, end: _linear(jnp.clip(t / max(decay - warmup, 1), 0, 1), end),
  # 1/sqrt(step), continuous with the warmup: equals 1 at its end (Vaswani et al., 2017).
  "inverse_sqrt": lambda t, decay, warmup, end: jax.lax.rsqrt(1.0 + t / max(warmup, 1)),
  "constant": lambda t, decay, warmup, end: jnp.ones_like(t),
}


def make_schedule(cfg: Any, num_steps: int) -> Schedule:
  """Linear warmup from 0 to `learning_rate` over `warmup_steps`, then `schedule`."""
  peak = float(cfg.learning_rate)
  warmup = int(cfg.warmup_steps)
  decay = int(cfg.decay_steps) if cfg.get("decay_steps") is not None else int(num_steps)
  end = float(cfg.end_lr_factor)
  after = SCHEDULES[cfg.schedule]

  def schedule(step: jax.Array) -> jax.Array:
    step = jnp.asarray(step, jnp.float32)
    # The first update (step 0) already gets lr > 0: a warmup of w steps reaches the peak at w-1.
    warm = (step + 1.0) / warmup if warmup > 0 else jnp.ones_like(step)
    rest = after(jnp.maximum(step - warmup, 0.0), decay, warmup, end)
    return peak * jnp.where(step < warmup, warm, rest)

  return schedule


def decay_mask(params: Any) -> Any:
  """True for the weights that get weight decay: matrices, not norms, biases or scales.

  Names matter, not only ranks: with scanned layers a norm scale is [layers, D].
  """

  def keep(path: tuple[Any, ...], leaf: Any) -> bool:
    names = [str(getattr(k, "key", getattr(k, "name", k))).lower() for k in path]
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
  if cfg.name not in OPTIMIZERS:
    raise ValueError(
      f"Unknown optimizer config.optim.name={cfg.name!r}; known: {list(OPTIMIZERS)}.")
  if cfg.schedule not in SCHEDULES:
    raise ValueError(f"Unknown config.optim.schedule={cfg.schedule!r}; known: {list(SCHEDULES)}.")
  schedule = make_schedule(cfg, num_steps)
  tx = OPTIMIZERS[cfg.name](cfg, schedule)
  if cfg.clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
  return tx, schedule
