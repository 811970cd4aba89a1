"""`train_and_evaluate(config, workdir)`: the one trainer for every task, read top to bottom.

Setup (validate the config, take the workdir, mesh, data, model and task, optimizer, abstract
state and shardings, jitted steps) -> restore or init (a different model in the workdir is an
error here, before any compilation) -> loop (train step, logs, eval, checkpoint, preemption) ->
finish (final checkpoint, eval, sample and `summary.json`). Tasks differ only through their
`Task` object (`attn.train.tasks`); evaluation is `attn.train.evaluate.Evaluator`, timing
`metrics.ThroughputMeter`.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import signal
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from attn import data as data_lib
from attn import provenance, storage
from attn.train import config as config_lib
from attn.train import config_identity, recovery, steps, workdir_lock
from attn.train import metrics as metrics_lib
from attn.train import sharding as sharding_lib
from attn.train import state as state_lib
from attn.train.checkpoint import Checkpointer
from attn.train.evaluate import Evaluator
from attn.train.optimizer import make_optimizer
from attn.train.tasks import make_task

Hook = Callable[[int, state_lib.TrainState, Checkpointer], None]


class NonFiniteError(FloatingPointError):
  """The loss or the gradient norm became NaN or infinite; names the step."""


class _Preemption:
  """SIGTERM (a preempted TPU VM, a cluster's stop) sets a flag; the loop saves and exits."""

  requested = False
  _previous: Any = None

  def __enter__(self) -> _Preemption:
    try:
      self._previous = signal.signal(signal.SIGTERM,
                                     lambda *_: setattr(self, "requested", True))
    except ValueError:  # Not the main thread (a notebook worker): no handler, no preemption.
      pass
    return self

  def __exit__(self, *exc: Any) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def agreed(self) -> bool:
    """True once any process was asked to stop (all processes take the same decision)."""
    if jax.process_count() == 1:
      return self.requested
    flags = multihost_utils.process_allgather(np.asarray(self.requested, np.int32))
    return bool(np.any(flags))


def config_hash(config: ml_collections.ConfigDict) -> str:
  text = json.dumps(config.to_dict(), sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       make_data: Callable[..., Any] | None = None,
                       hooks: Sequence[Hook] = (),
                       allow_config_change: bool = False) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming from its latest checkpoint); returns final metrics.

  Args:
    config: the full config (`attn.train.default_config()` and an experiment's changes).
    workdir: checkpoints, metrics.jsonl, tensorboard/ and summary.json go here.
    make_data: replaces `attn.data.make_iterators` (same signature and results), e.g. for an
      in-memory dataset in a notebook or a test.
    hooks: called after every step as `hook(step, state, checkpointer)`.
    allow_config_change: continue a run whose stored config differs in fields that change its
      trajectory (recorded in config.json with the step it took effect).

  Returns:
    The final eval metrics plus `step`; {"preempted": True, "step": ...} after a SIGTERM.

  Raises:
    ConfigError: a config that cannot run, or that differs from the workdir's run.
    WorkdirBusyError: another launch holds the workdir.
  """
  # ---- Setup: config, workdir, model, mesh, data, optimizer, jitted steps. ----
  config = config.copy_and_resolve_references()
  config_lib.validate(config)
  storage.check_url_support(workdir, "--workdir")
  t = config.train
  is_main = jax.process_index() == 0
  with contextlib.ExitStack() as stack:
    # One writer per workdir, before anything there is read; then the run's config identity.
    lock = stack.enter_context(workdir_lock.hold(workdir))
    identity = config_identity.check(workdir, config, allow_change=allow_config_change)
    if lock is not None:
      hooks = (*hooks, lambda *_: lock.check())
    model_cfg = config_lib.model_config(config)  # Config errors before the model imports.
    from attn import models

    mesh = sharding_lib.make_mesh(config.mesh)
    axis_rules = sharding_lib.rules(config.mesh)
    sharding_lib.check_model_fits(mesh, model_cfg, batch_size=t.batch_size,
                                  grad_accum_steps=t.grad_accum_steps,
                                  process_count=jax.process_count())
    train_iter, eval_iters, info = (make_data or data_lib.make_iterators)(
      config.data, global_batch_size=t.batch_size, seed=config.seed)
    config_lib.check_against_data(model_cfg, info)
    task = make_task(info)
    model = models.build(model_cfg)
    tx, schedule = make_optimizer(config.optim, num_steps=t.num_steps)
    # Measured here, outside the mesh context: the CPU peak is a single-device matmul.
    peak, peak_basis = metrics_lib.peak_flops()

    stack.enter_context(jax.set_mesh(mesh))
    abstract, shardings, init = state_lib.abstract_state(
      model, task, tx, mesh, axis_rules, t.batch_size // t.grad_accum_steps)
    ckpt = stack.enter_context(contextlib.closing(Checkpointer(
      workdir, keep=t.keep_checkpoints, keep_best=t.keep_best, best_metric=t.best_metric,
      best_mode=t.best_mode, async_save=t.async_checkpoints)))
    batch_sharding = sharding_lib.batch_sharding(mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    train_fn = jax.jit(
      functools.partial(steps.train_step, model=model, task=task, tx=tx, schedule=schedule,
                        grad_accum_steps=t.grad_accum_steps),
      in_shardings=(shardings, batch_sharding), out_shardings=(shardings, replicated),
      donate_argnums=(0,),
    )
    eval_fn = jax.jit(functools.partial(steps.eval_step, model=model, task=task),
                      in_shardings=(shardings, batch_sharding), out_shardings=replicated)
    evaluate = Evaluator(task, model, eval_fn, eval_iters, batch_sharding,
                         num_batches=int(t.eval_steps) or None,
                         decode_batches=int(t.bleu_batches))

    # ---- Restore or init. ----
    # Damaged steps are moved aside here (unreadable metadata) and at the restore (data that
    # does not load or verify); a step holding another model or optimizer is a ConfigError.
    latest = recovery.latest_usable(ckpt, abstract)
    summary = metrics_lib.read_summary(workdir) if latest is not None else None
    if latest is not None and latest >= t.num_steps and summary is not None:
      identity.refuse_if_finished(summary["step"])
      if is_main:
        print(f"{workdir}: finished at step {summary['step']}; nothing to do.", flush=True)
      return {"step": summary["step"], **summary["metrics"]}
    # Resume order: the train state and the data iterator's position come from the same
    # checkpoint step and are both restored before the first batch is read; dropout keys are
    # fold_in(state.rng, step), so nothing else carries randomness across a restart.
    if latest is not None:  # The newest step that loads and verifies (bad ones moved aside).
      latest, state = recovery.restore_newest(ckpt, abstract, train_iter)
    if latest is None:
      state = state_lib.create_state(init, shardings, config.seed)
    step = start_step = int(jax.device_get(state.step))
    identity.commit(step)  # The first launch's config, or a change recorded at this step.
    # Activation sharding constraints (nn.with_logical_constraint in the layers) apply only
    # under the rules; switched off, XLA propagates the parameter and batch shardings by itself.
    stack.enter_context(
      nn.logical_axis_rules(axis_rules if config.mesh.activation_constraints else ()))

    # ---- Loop: steps, logs, evals, checkpoints, preemption. ----
    num_params = models.count_params(abstract.params)
    writer = metrics_lib.MetricWriter(workdir, total_steps=t.num_steps, initial_step=step,
                                      progress_bar=t.progress_bar, enabled=is_main,
                                      config_text=str(config))
    writer.message(f"{workdir}: {'new run' if latest is None else f'resuming at step {step}'}"
                   f"; {num_params:,} parameters; mesh {dict(mesh.shape)}; "
                   f"{jax.device_count()} devices, {jax.process_count()} process(es).")
    if identity.describe(step):
      writer.message(identity.describe(step))
    meter = metrics_lib.ThroughputMeter(t.batch_size * task.tokens_per_row())
    pending: list[tuple[int, dict[str, jax.Array]]] = []  # Step metrics not fetched yet.
    last_train: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    with _Preemption() as preemption:
      while step < t.num_steps:
        batch = sharding_lib.place_batch(next(train_iter), batch_sharding)
        # Everything the step reads is already on the devices; an implicit host transfer here
        # would be a silent per-step copy (a bug), so make it an error.
        with jax.transfer_guard("disallow"):
          state, step_metrics = train_fn(state, batch)
        step += 1
        pending.append((step, step_metrics))
        meter.step(step_metrics)
        for hook in hooks:
          hook(step, state, ckpt)
        last = step == t.num_steps
        do_eval = last or (t.eval_every and step % t.eval_every == 0)
        do_ckpt = last or (t.checkpoint_every and step % t.checkpoint_every == 0)
        do_log = last or step % t.log_every == 0 or do_eval or do_ckpt
        # One process reads its flag every step; several agree on it at log steps (a collective).
        stop = preemption.agreed() if jax.process_count() == 1 or do_log else False
        if not (do_log or stop):
          continue
        with meter.paused(step_metrics):  # Logs, evals and checkpoints are not step time.
          last_train = _log_train(pending, writer, meter, ckpt)
          evaluated = None  # A SIGTERM stops a long eval early (None); the checkpoint still saves.
          if do_eval and not stop:
            evaluated = evaluate(state, preemption.agreed)
            stop = evaluated is None
          if evaluated is not None:
            eval_metrics = evaluated
            writer.write(step, "eval", eval_metrics)
            writer.message(f"step {step}: eval " + ", ".join(f"{k} {v:.4g}"
                                                             for k, v in eval_metrics.items()))
          if do_ckpt or stop:
            ckpt.save(step, state, train_iter,
                      metrics=evaluated if evaluated and t.best_metric in evaluated else None)
        if stop and not (last and evaluated is not None):
          ckpt.wait()
          writer.message(f"Preempted (SIGTERM): saved step {step} in {ckpt.directory}; "
                         "run the same command again to resume.")
          writer.close()
          return {"preempted": True, "step": step}

    # ---- Finish: the last checkpoint, summary.json, the sample and its attention maps. ----
    ckpt.wait()
    if not eval_metrics:  # A finished run relaunched without its summary: evaluate once more.
      eval_metrics = evaluate(state)
    writer.close()
    flops_per_step = metrics_lib.model_flops_per_step(num_params, model_cfg, info, t.batch_size)
    steps_per_second = meter.steps_per_second
    sample = task.sample(model, state.params, prompt=t.sample_prompt, max_tokens=t.sample_tokens,
                         temperature=t.sample_temperature, seed=config.seed)
    summary = {
      "step": step,
      "metrics": eval_metrics,
      "train_loss": last_train.get("loss"),
      "tokens_per_second": meter.rates().get("tokens_per_second"),
      "steps_per_second": steps_per_second,
      "mfu": (flops_per_step * steps_per_second / peak
              if steps_per_second and math.isfinite(peak) else None),
      "mfu_basis": f"{flops_per_step:.4g} model FLOPs/step (6N + attention) over {peak_basis}",
      "params_sha256": metrics_lib.params_sha256(state.params),
      "num_params": num_params,
      "steps_this_run": step - start_step,
      "devices": jax.device_count(),
      "processes": jax.process_count(),
      "config_hash": config_hash(config),
      "provenance": provenance.provenance(),  # Package versions and git commit.
      "sample": sample,
      "config": config_identity.as_json(config),
      "config_changes": config_identity.history(workdir),
    }
    if sample is not None and jax.process_count() == 1:
      _save_attention_png(model, state.params, sample, info, workdir)
    if is_main:
      # Sweeps treat summary.json as "done": never half-written.
      storage.write_text_atomic(storage.join(workdir, "summary.json"),
                                json.dumps(summary, indent=2))
    return {"step": step, **eval_metrics}


def _log_train(pending: list[tuple[int, dict[str, jax.Array]]],
               writer: metrics_lib.MetricWriter, meter: metrics_lib.ThroughputMeter,
               ckpt: Checkpointer) -> dict[str, float]:
  """Fetches the pending steps' metrics, stops on a non-finite value, logs their means."""
  fetched = jax.device_get(pending)
  pending.clear()
  for s, m in fetched:
    if not (math.isfinite(float(m["loss"])) and math.isfinite(float(m["grad_norm"]))):
      latest = ckpt.latest_step()
      raise NonFiniteError(
        f"Non-finite loss ({float(m['loss'])}) or gradient norm ({float(m['grad_norm'])}) at "
        f"step {s}; " + ("no checkpoint was written" if latest is None else
                         f"no checkpoint was written after step {latest}") + ". Lower "
        "optim.learning_rate, raise optim.warmup_steps or check the data."
      )
  window = {k: float(np.mean([m[k] for _, m in fetched])) for k in fetched[-1][1]}
  window["tokens"] = float(np.sum([m["tokens"] for _, m in fetched]))
  window.update(meter.rates())
  writer.write(fetched[-1][0], "train", window)
  writer.progress(fetched[-1][0], {"loss": window["loss"],
                                   **({"tok/s": window["tokens_per_second"]}
                                      if "tokens_per_second" in window else {})})
  return window


def _save_attention_png(model: nn.Module, params: Any, sample: str, info: data_lib.DataInfo,
                        workdir: str) -> None:
  """One picture of what the heads look at on the sample (layers x heads), if all can show it."""
  from attn.layers import registry  # Deferred like the models (see train_and_evaluate).

  if all(registry.get(name).weights for name in model.config.mechanisms):
    from attn import viz  # Deferred: matplotlib is only needed at the very end.

    viz.save_attention_png(model, params, sample, storage.join(workdir, "attention.png"),
                           tokenizer=info.tokenizer)
