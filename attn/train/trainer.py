"""`train_and_evaluate(config, workdir)`: the one trainer for every task.

Order: validate the config -> mesh -> data -> model and task -> abstract state and shardings ->
checkpoint check (a different model in the workdir is an error here, before any compilation)
-> restore or init -> loop (train step, logs, eval, checkpoint, preemption) -> final
checkpoint, eval, sample and `summary.json`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
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
from attn.train.optimizer import make_optimizer
from attn.train.tasks import Task, make_task

Hook = Callable[[int, state_lib.TrainState, Checkpointer], None]


class NonFiniteError(FloatingPointError):
  """The loss or the gradient norm became NaN or infinite; names the step."""


class _Preemption:
  """SIGTERM (a preempted TPU VM, a cluster's stop) sets a flag; the loop saves and exits."""

  def __init__(self) -> None:
    self.requested = False
    self._previous = None

  def __enter__(self) -> _Preemption:
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread (a notebook worker): no handler, no preemption.
      self._previous = None
    return self

  def _handle(self, signum: int, frame: Any) -> None:
    del signum, frame
    self.requested = True

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


class _Evaluator:
  """Runs the eval split through the jitted eval step and the task's host-side extras."""

  def __init__(self, config: Any, task: Task, model: nn.Module, eval_iters: Any,
               eval_fn: Any, batch_sharding: NamedSharding):
    self.task, self.model, self.eval_iters = task, model, eval_iters
    self.eval_fn, self.batch_sharding = eval_fn, batch_sharding
    self.num_batches = int(config.train.eval_steps) or None
    self.bleu_batches = int(config.train.bleu_batches)

  def __call__(self, state: state_lib.TrainState,
               should_stop: Callable[[], bool] | None = None) -> dict[str, float] | None:
    """The eval metrics; None if `should_stop()` turned true on the way (a SIGTERM)."""
    sums = None
    host_batches = []
    for batch in self.eval_iters(num_batches=self.num_batches):
      if should_stop is not None and should_stop():
        return None  # A long eval must not outlast a preemption notice.
      if len(host_batches) < self.bleu_batches:
        host_batches.append(batch)
      out = self.eval_fn(state, sharding_lib.place_batch(batch, self.batch_sharding))
      sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    if sums is None:
      return {}
    metrics = self.task.finalize(jax.device_get(sums))
    if host_batches and self.task.name == "seq2seq" and jax.process_count() == 1:
      metrics.update(self.task.extra_eval(self._generate_fn(state), host_batches))
    return metrics

  def _generate_fn(self, state: state_lib.TrainState) -> Callable[[np.ndarray], np.ndarray]:
    from attn import decode

    info = self.task.info

    def generate(sources: np.ndarray) -> np.ndarray:
      return decode.generate(self.model, state.params, jnp.asarray(sources),
                             max_new_tokens=info.target_len, eos_id=info.eos_id,
                             pad_id=info.pad_id, bos_id=info.bos_id)

    return generate


def _sample(model: nn.Module, params: Any, info: data_lib.DataInfo, config: Any) -> str | None:
  """Text generated from `train.sample_prompt` (lm runs with train.sample_tokens > 0)."""
  if info.task != "lm" or not config.train.sample_tokens or info.tokenizer is None:
    return None
  from attn import decode

  prompt = np.concatenate([[info.bos_id], info.tokenizer.encode(config.train.sample_prompt)])
  # The KV cache holds model.max_len positions: a longer sample is cut to fit, not an error
  # at the end of a finished run.
  new_tokens = min(int(config.train.sample_tokens), model.config.max_len - len(prompt))
  if new_tokens <= 0:
    return None
  out = decode.generate(model, params, jnp.asarray(prompt[None], jnp.int32),
                        max_new_tokens=new_tokens,
                        rng=jax.random.PRNGKey(config.seed),
                        temperature=float(config.train.sample_temperature), eos_id=info.eos_id)
  return info.tokenizer.decode(np.asarray(out)[0, 1:])


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
  config = config.copy_and_resolve_references()
  config_lib.validate(config)
  storage.check_url_support(workdir, "--workdir")
  # One writer per workdir, before anything there is read; then the run's config identity.
  with workdir_lock.hold(workdir) as lock:
    identity = config_identity.check(workdir, config, allow_change=allow_config_change)
    if lock is not None:
      hooks = (*hooks, lambda *_: lock.check())
    return _train(config, workdir, make_data=make_data, hooks=hooks, identity=identity)


def _train(config: ml_collections.ConfigDict, workdir: str, *,
           make_data: Callable[..., Any] | None, hooks: Sequence[Hook],
           identity: config_identity.Identity) -> dict[str, Any]:
  """train_and_evaluate, once the workdir is this run's."""
  from attn import models  # Deferred so that config errors surface before model imports.

  try:
    model_cfg = models.ModelConfig.from_config(config.model)
  except (TypeError, ValueError) as e:
    raise config_lib.ConfigError(str(e)) from e
  config_lib.check_mechanism(config, model_cfg)
  t = config.train
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
  is_main = jax.process_index() == 0
  # Measured here, outside the mesh context: the CPU peak is a single-device matmul.
  peak = metrics_lib.peak_flops()

  with jax.set_mesh(mesh):
    abstract, shardings, init = state_lib.abstract_state(
      model, task, tx, mesh, axis_rules, t.batch_size // t.grad_accum_steps)
    ckpt = Checkpointer(workdir, keep=t.keep_checkpoints, keep_best=t.keep_best,
                        best_metric=t.best_metric, best_mode=t.best_mode,
                        async_save=t.async_checkpoints)
    try:
      # Damaged steps are moved aside here (unreadable metadata) and in _run (data that does
      # not load or verify); a step holding another model or optimizer is a ConfigError.
      latest = recovery.latest_usable(ckpt, abstract)
      summary = metrics_lib.read_summary(workdir) if latest is not None else None
      if latest is not None and latest >= t.num_steps and summary is not None:
        if is_main:
          print(f"{workdir}: finished at step {summary['step']}; nothing to do.", flush=True)
        return {"step": summary["step"], **summary["metrics"]}
      return _run(config, workdir, model=model, model_cfg=model_cfg, task=task, info=info,
                  tx=tx, schedule=schedule, mesh=mesh, abstract=abstract, shardings=shardings,
                  init=init, axis_rules=axis_rules, ckpt=ckpt, latest=latest,
                  train_iter=train_iter, peak=peak,
                  eval_iters=eval_iters, hooks=hooks, identity=identity)
    finally:
      ckpt.close()


def _run(config: Any, workdir: str, *, model: nn.Module, model_cfg: Any, task: Task,
         info: data_lib.DataInfo, tx: Any, schedule: Any, mesh: Any, abstract: Any,
         shardings: Any, init: Any, axis_rules: Any, ckpt: Checkpointer, latest: int | None,
         train_iter: Any, eval_iters: Any, hooks: Sequence[Hook],
         peak: tuple[float, str], identity: config_identity.Identity) -> dict[str, Any]:
  """The loop, once the state's layout and the checkpoint are known to fit."""
  t = config.train
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
  evaluate = _Evaluator(config, task, model, eval_iters, eval_fn, batch_sharding)

  # Resume order: the train state and the data iterator's position come from the same
  # checkpoint step and are both restored before the first batch is read; dropout keys are
  # fold_in(state.rng, step), so nothing else carries randomness across a restart.
  if latest is not None:  # The newest step that loads and verifies (bad ones moved aside).
    latest, state = recovery.restore_newest(ckpt, abstract, train_iter)
  if latest is None:
    state = state_lib.create_state(init, shardings, config.seed)
  step = int(jax.device_get(state.step))
  identity.commit(step)  # The first launch's config, or a change recorded at this step.
  # Activation sharding constraints (nn.with_logical_constraint in the layers) apply only under
  # the rules; switched off, XLA propagates the parameter and batch shardings by itself.
  rules_context = nn.logical_axis_rules(axis_rules if config.mesh.activation_constraints else ())
  with rules_context:
    return _loop(config, workdir, model=model, model_cfg=model_cfg, task=task, info=info,
                 mesh=mesh, abstract=abstract, ckpt=ckpt, latest=latest, state=state, step=step,
                 train_fn=train_fn, evaluate=evaluate, train_iter=train_iter, hooks=hooks,
                 peak=peak)


def _loop(config: Any, workdir: str, *, model: nn.Module, model_cfg: Any, task: Task,
          info: data_lib.DataInfo, mesh: Any, abstract: Any, ckpt: Checkpointer,
          latest: int | None, state: state_lib.TrainState, step: int, train_fn: Any,
          evaluate: Any, train_iter: Any, hooks: Sequence[Hook],
          peak: tuple[float, str]) -> dict[str, Any]:
  """Steps, logs, evals, checkpoints and the summary."""
  t = config.train
  is_main = jax.process_index() == 0
  batch_sharding = sharding_lib.batch_sharding(mesh)
  start_step = step
  from attn.models import count_params  # The one implementation; attn.models is loaded by now.

  num_params = count_params(abstract.params)
  flops_per_step = metrics_lib.model_flops_per_step(num_params, model_cfg, info, t.batch_size)
  length = info.seq_len if info.task != "seq2seq" else info.seq_len + info.target_len
  tokens_per_step = t.batch_size * (length if info.task != "vision" else 1)
  writer = metrics_lib.MetricWriter(workdir, total_steps=t.num_steps, initial_step=step,
                                    progress_bar=t.progress_bar, enabled=is_main,
                                    config_text=str(config))
  start = f"resuming at step {step}" if latest is not None else "new run"
  writer.message(f"{workdir}: {start}"
                 f"; {num_params:,} parameters; mesh {dict(mesh.shape)}; {jax.device_count()} "
                 f"devices, {jax.process_count()} process(es).")

  pending: list[tuple[int, dict[str, jax.Array]]] = []
  last_train: dict[str, float] = {}
  eval_metrics: dict[str, float] = {}
  timing = {"seconds": 0.0, "steps": 0}
  clock = None  # Starts after the first step: compilation is not throughput.

  def flush() -> None:
    """Fetches pending step metrics, stops on a non-finite value, writes the train logs."""
    nonlocal last_train
    if not pending:
      return
    fetched = jax.device_get(pending)
    pending.clear()
    for s, m in fetched:
      if not (math.isfinite(float(m["loss"])) and math.isfinite(float(m["grad_norm"]))):
        raise NonFiniteError(
          f"Non-finite loss ({float(m['loss'])}) or gradient norm ({float(m['grad_norm'])}) at "
          f"step {s}; no checkpoint was written after step {ckpt.latest_step()}. Lower "
          "optim.learning_rate, raise optim.warmup_steps or check the data."
        )
    window = {k: float(np.mean([m[k] for _, m in fetched])) for k in fetched[-1][1]}
    window["tokens"] = float(np.sum([m["tokens"] for _, m in fetched]))
    if timing["seconds"] > 0:
      window["steps_per_second"] = timing["steps"] / timing["seconds"]
      window["tokens_per_second"] = window["steps_per_second"] * tokens_per_step
    last_train = window
    writer.write(fetched[-1][0], "train", window)
    writer.progress(fetched[-1][0], {"loss": window["loss"],
                                     **({"tok/s": window["tokens_per_second"]}
                                        if "tokens_per_second" in window else {})})

  with _Preemption() as preemption:
    while step < t.num_steps:
      batch = sharding_lib.place_batch(next(train_iter), batch_sharding)
      # Everything the step reads is already on the devices; an implicit host transfer here
      # would be a silent per-step copy (a bug), so make it an error.
      with jax.transfer_guard("disallow"):
        state, step_metrics = train_fn(state, batch)
      step += 1
      pending.append((step, step_metrics))
      if clock is None:
        jax.block_until_ready(step_metrics)
        clock = time.perf_counter()
      else:
        timing["steps"] += 1
      for hook in hooks:
        hook(step, state, ckpt)
      last = step == t.num_steps
      do_eval = last or (t.eval_every and step % t.eval_every == 0)
      do_ckpt = last or (t.checkpoint_every and step % t.checkpoint_every == 0)
      do_log = last or step % t.log_every == 0 or do_eval or do_ckpt
      # One process reads its flag every step; several agree on it at log steps (a collective).
      stop = preemption.agreed() if jax.process_count() == 1 or do_log else False
      if do_log or stop:
        jax.block_until_ready(step_metrics)
        timing["seconds"] += time.perf_counter() - clock
        flush()
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
      if do_log or stop:
        clock = time.perf_counter()
      if stop and not (last and evaluated is not None):
        ckpt.wait()
        writer.message(f"Preempted (SIGTERM): saved step {step} in {ckpt.directory}; "
                       "run the same command again to resume.")
        writer.close()
        return {"preempted": True, "step": step}

  ckpt.wait()
  if not eval_metrics:  # A finished run relaunched without its summary: evaluate once more.
    eval_metrics = evaluate(state)
  writer.close()
  _summary(config, workdir, state=state, model=model, info=info, step=step,
           start_step=start_step, eval_metrics=eval_metrics, last_train=last_train,
           timing=timing, flops_per_step=flops_per_step, num_params=num_params, peak=peak)
  return {"step": step, **eval_metrics}


def _summary(config: Any, workdir: str, *, state: state_lib.TrainState, model: nn.Module,
             info: data_lib.DataInfo, step: int, start_step: int, eval_metrics: dict[str, float],
             last_train: dict[str, float], timing: dict[str, float], flops_per_step: float,
             num_params: int, peak: tuple[float, str]) -> dict[str, Any]:
  """Writes summary.json (process 0) and returns it."""
  steps_per_second = timing["steps"] / timing["seconds"] if timing["seconds"] > 0 else None
  peak, basis = peak
  mfu = None
  if steps_per_second and math.isfinite(peak):
    mfu = flops_per_step * steps_per_second / peak
  sample = _sample(model, state.params, info, config)
  params_hash = metrics_lib.params_sha256(state.params)
  summary = {
    "step": step,
    "metrics": eval_metrics,
    "train_loss": last_train.get("loss"),
    "tokens_per_second": last_train.get("tokens_per_second"),
    "steps_per_second": steps_per_second,
    "mfu": mfu,
    "mfu_basis": f"{flops_per_step:.4g} model FLOPs/step (6N + attention) over {basis}",
    "params_sha256": params_hash,
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
  from attn.layers import registry  # Deferred like the models (see train_and_evaluate).

  if (sample is not None and jax.process_count() == 1
      and all(registry.get(name).weights for name in model.config.mechanisms)):
    from attn import viz  # Deferred: matplotlib is only needed at the very end.

    # One picture of what the heads look at on the sample (layers x heads).
    viz.save_attention_png(model, state.params, sample, storage.join(workdir, "attention.png"),
                           tokenizer=info.tokenizer)
  if jax.process_index() == 0:
    # Sweeps treat summary.json as "done": never half-written.
    storage.write_text_atomic(storage.join(workdir, "summary.json"), json.dumps(summary, indent=2))
  return summary
