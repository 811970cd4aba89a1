"""Pure train and eval steps. The trainer jits them once with shardings and donated state.

    new_state, metrics = train_step(state, batch, model=..., task=..., tx=..., schedule=...,
                                    grad_accum_steps=...)

Losses are sums divided once by the total weight of the whole (global) batch, so a step with
gradient accumulation computes the same update as one big batch, up to float summation order.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import optax

from attn.layers.norms import BatchNorm
from attn.train.state import TrainState
from attn.train.tasks import Batch, Task


def _split_micro(batch: Batch, num: int) -> Batch:
  """[B, ...] -> [num, B / num, ...], micro-batch i = rows i, i + num, i + 2 num, ...

  The strided split keeps every device's rows on that device (a contiguous split would move
  rows between devices, since the batch is sharded in contiguous blocks).
  """

  def split(x: jax.Array) -> jax.Array:
    x = x.reshape(x.shape[0] // num, num, *x.shape[1:])
    return jnp.swapaxes(x, 0, 1)

  return jax.tree.map(split, batch)


def _grads_and_stats(state: TrainState, batch: Batch, rng: jax.Array, *, model: Any, task: Task,
                     batch_stats: Any) -> tuple[Any, dict[str, jax.Array], Any]:
  """Gradients of the summed loss, the stats sums, and updated batch stats for one micro-batch."""

  def loss_fn(params: Any) -> tuple[jax.Array, tuple[dict[str, jax.Array], Any]]:
    variables = {"params": params}
    if batch_stats:
      variables["batch_stats"] = batch_stats
    logits, updates = task.forward(model, variables, batch, train=True, rng=rng)
    stats = task.stats(logits, batch)
    return stats["loss_sum"], (stats, updates.get("batch_stats", batch_stats))

  grads, (stats, new_batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
  return grads, stats, new_batch_stats


def _depth_order(path: tuple[str, ...]) -> tuple[tuple[int, int, str], ...]:
  """Sort key of a module path in depth order: `layer_N` by N (layer_2 before layer_10), a
  `final...` module after the layers, other names alphabetically (attention_norm, mlp_norm)."""
  key = []
  for part in path:
    match = re.fullmatch(r"layer_(\d+)", part)
    if match:
      key.append((1, int(match.group(1)), ""))
    else:
      key.append((2 if part.startswith("final") else 0, 0, part))
  return tuple(key)


def batchnorm_drift(before: Any, after: Any, momentum: float) -> dict[str, jax.Array]:
  """How far each BatchNorm layer's batch statistics were from its running statistics.

  Shen et al. 2020 ("PowerNorm", fig. 2) plot, per training step, (1/d) ||mu_B - mu|| and
  (1/d) ||sigma_B^2 - sigma^2||: the batch's mean / variance against the running averages
  used at inference. The batch statistics are recovered exactly from the running averages
  before and after the step, since after = m * before + (1 - m) * batch.

  Args:
    before: the `batch_stats` collection before the step ({path: {'mean', 'var'}} nested).
    after: the same after the step.
    momentum: the BatchNorm momentum m.

  Returns:
    `bn_mean_distance` / `bn_var_distance`: the distances averaged over the BatchNorm layers;
    `bn_first_mean_distance` / `bn_first_var_distance`: those of the first layer in depth
    order (`_depth_order`: the first block's first norm). {} without BatchNorm.
  """
  flat_before = jax.tree_util.tree_flatten_with_path(before)[0]
  flat_after = jax.tree.leaves(after)
  layers: dict[tuple[str, ...], dict[str, jax.Array]] = {}
  for (path, old), new in zip(flat_before, flat_after, strict=True):
    keys = tuple(str(getattr(p, "key", p)) for p in path)
    batch = old + (new - old) / (1.0 - momentum)
    layers.setdefault(keys[:-1], {})[keys[-1]] = jnp.linalg.norm(batch - old) / old.size
  if not layers:
    return {}
  names = sorted(layers, key=_depth_order)
  out = {}
  for stat in ("mean", "var"):
    values = jnp.stack([layers[n][stat] for n in names])
    out[f"bn_{stat}_distance"] = jnp.mean(values)
    out[f"bn_first_{stat}_distance"] = values[0]
  return out


def train_step(state: TrainState, batch: Batch, *, model: Any, task: Task,
               tx: optax.GradientTransformation, schedule: Any,
               grad_accum_steps: int = 1) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update on a global batch; metrics are scalars for the logs."""
  step_key = jax.random.fold_in(state.rng, state.step)
  if grad_accum_steps == 1:
    grads, stats, batch_stats = _grads_and_stats(state, batch, step_key, model=model, task=task,
                                                 batch_stats=state.batch_stats)
  else:
    micro = _split_micro(batch, grad_accum_steps)

    def body(carry: Any, inputs: Any) -> tuple[Any, None]:
      grads_acc, stats_acc, batch_stats = carry
      index, micro_batch = inputs
      grads, stats, batch_stats = _grads_and_stats(
        state, micro_batch, jax.random.fold_in(step_key, index), model=model, task=task,
        batch_stats=batch_stats)
      return (jax.tree.map(jnp.add, grads_acc, grads),
              jax.tree.map(jnp.add, stats_acc, stats), batch_stats), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    stats_shape = jax.eval_shape(
      lambda: _grads_and_stats(state, jax.tree.map(lambda x: x[0], micro), step_key,
                               model=model, task=task, batch_stats=state.batch_stats)[1])
    stats0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), stats_shape)
    (grads, stats, batch_stats), _ = jax.lax.scan(
      body, (zeros, stats0, state.batch_stats),
      (jnp.arange(grad_accum_steps), micro))

  total = jnp.maximum(stats["weight_sum"], 1.0)
  grads = jax.tree.map(lambda g: g / total.astype(g.dtype), grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {
    "loss": stats["loss_sum"] / total,
    "accuracy": stats["correct_sum"] / total,
    "tokens": stats["weight_sum"],
    "grad_norm": optax.tree.norm(grads),
    "update_norm": optax.tree.norm(updates),
    "param_norm": optax.tree.norm(params),
    "learning_rate": schedule(state.step),
  }
  if state.batch_stats and grad_accum_steps == 1:  # BatchNorm: batch vs running statistics.
    metrics.update(batchnorm_drift(state.batch_stats, batch_stats, BatchNorm.momentum))
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            batch_stats=batch_stats)
  return new_state, metrics


def eval_step(state: TrainState, batch: Batch, *, model: Any, task: Task) -> dict[str, jax.Array]:
  """Stats sums of one eval batch (padding rows have weight 0)."""
  variables = {"params": state.params}
  if state.batch_stats:
    variables["batch_stats"] = state.batch_stats
  logits, _ = task.forward(model, variables, batch, train=False)
  return task.stats(logits, batch)
