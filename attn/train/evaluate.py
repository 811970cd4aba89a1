"""The evaluator: the eval split through the jitted eval step, then the task's host-side extras.

    evaluate = Evaluator(task, model, eval_fn, eval_iters, batch_sharding, num_batches=20,
                         decode_batches=2)
    metrics = evaluate(state)                    # task.finalize of the summed stats, + extras
    metrics = evaluate(state, preemption.agreed) # None if a SIGTERM came in on the way

Every task goes the same way: the stats of all batches are summed on the devices and finalized
once on the host, and the first `decode_batches` host batches go to `task.extra_eval` (BLEU /
chrF for seq2seq; nothing for the others) with a greedy `generate` function of the current
parameters. Decoding runs in a single process only (it reads the whole batch on one host).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from attn.train import sharding as sharding_lib
from attn.train.tasks import Batch, Task


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """`evaluator(state, should_stop=None)` -> eval metrics (None if stopped on the way)."""

  task: Task
  model: nn.Module
  eval_fn: Callable[[Any, Batch], dict[str, jax.Array]]  # jitted (state, batch) -> stats sums
  eval_iters: Callable[..., Iterable[Batch]]  # eval_iters(num_batches=) -> host batches
  batch_sharding: NamedSharding
  num_batches: int | None = None  # None: the whole eval split
  decode_batches: int = 0  # host batches handed to task.extra_eval

  def __call__(self, state: Any,
               should_stop: Callable[[], bool] | None = None) -> dict[str, float] | None:
    """The eval metrics; None if `should_stop()` turned true on the way (a SIGTERM)."""
    sums = None
    host_batches = []
    for batch in self.eval_iters(num_batches=self.num_batches):
      if should_stop is not None and should_stop():
        return None  # A long eval must not outlast a preemption notice.
      if len(host_batches) < self.decode_batches:
        host_batches.append(batch)
      out = self.eval_fn(state, sharding_lib.place_batch(batch, self.batch_sharding))
      sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    if sums is None:
      return {}
    metrics = self.task.finalize(jax.device_get(sums))
    if host_batches and jax.process_count() == 1:
      metrics.update(self.task.extra_eval(self.generate_fn(state.params), host_batches))
    return metrics

  def generate_fn(self, params: Any) -> Callable[[np.ndarray], np.ndarray]:
    """sources [B, S] -> greedy continuations of up to the data's target length."""
    from attn import decode  # Deferred: only tasks that decode call it.

    info = self.task.info

    def generate(sources: np.ndarray) -> np.ndarray:
      return decode.generate(self.model, params, jnp.asarray(sources),
                             max_new_tokens=info.target_len, eos_id=info.eos_id,
                             pad_id=info.pad_id, bos_id=info.bos_id)

    return generate
