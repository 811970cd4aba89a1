"""A training run in its own process, for the fault tests: killed, signalled or multi-host.

    python -m tests.train.child --workdir W --mode M --at K --overrides '{"train.num_steps": 6}'

Modes: run (train to the end); kill_after_checkpoint (SIGKILL once the checkpoint of step K is
complete on disk); hold_after_checkpoint (once that checkpoint is complete, print HOLDING and
sleep, holding the workdir's lock, until killed); kill_during_save (SIGKILL right after the
save of step K has started, before Orbax finalizes it); sigterm (SIGTERM to itself after step
K); nan (the loss becomes NaN from step K on; unused by the tests, which poison the data
instead); sigterm_in_eval (SIGTERM after the first batch of the K-th evaluation); load
(load_params of the workdir's checkpoint onto one device, print its hash); late_first_step
(process 1 starts compiling its first step K s after the others). Several processes
(the multi-host tests) are started with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID.
"""

import argparse
import json
import os
import signal
import time

import jax
import jax.numpy as jnp
from jax import config as jax_config

jax_config.update("jax_numpy_rank_promotion", "raise")


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--mode", default="run")
  parser.add_argument("--at", type=int, default=0)
  parser.add_argument("--overrides", default="{}")
  args = parser.parse_args()

  from attn.train import distributed

  # A peer is declared dead after this long without a heartbeat. No test here kills a peer of
  # a multi-process run, and on a loaded 2-core machine a process can go 10 s without CPU
  # (the compile threads of its neighbours): generous, so only a real death ends a run.
  distributed.maybe_initialize(heartbeat_timeout_s=60)

  from attn import train
  from attn.train import checkpoint, steps
  from tests.train.conftest import tiny_config

  overrides = json.loads(args.overrides)
  if args.mode == "load":
    params = checkpoint.load_params(args.workdir)
    from attn.train.metrics import params_sha256

    print("LOADED", json.dumps({"sha": params_sha256(params), "devices": jax.device_count(),
                               "shardings": sorted({str(x.sharding) for x in
                                                    jax.tree.leaves(params)})}), flush=True)
    return
  config = tiny_config(overrides.pop("data_dir"), **overrides)
  hooks = []
  if args.mode == "kill_after_checkpoint":

    def hook(step, state, ckpt):
      if step == args.at + 1:
        ckpt.wait()  # The save of step `at` is complete (local disk or bucket).
        assert ckpt.latest_step() == args.at, ckpt.all_steps()
        os.kill(os.getpid(), signal.SIGKILL)

    hooks.append(hook)
  elif args.mode == "hold_after_checkpoint":

    def hook(step, state, ckpt):
      if step == args.at + 1:
        ckpt.wait()
        print("HOLDING", flush=True)
        time.sleep(600)

    hooks.append(hook)
  elif args.mode == "kill_during_save":
    real_save = checkpoint.Checkpointer.save

    def save(self, step, *a, **k):
      real_save(self, step, *a, **k)
      if step == args.at:
        names = sorted(os.listdir(self.directory))
        print("AT_KILL", json.dumps(names), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.Checkpointer.save = save
  elif args.mode == "sigterm":

    def hook(step, state, ckpt):
      if step == args.at:
        os.kill(os.getpid(), signal.SIGTERM)

    hooks.append(hook)
  elif args.mode == "nan":
    real_step = steps.train_step

    def nan_step(state, batch, **kwargs):
      new_state, metrics = real_step(state, batch, **kwargs)
      bad = state.step + 1 >= args.at
      metrics["loss"] = jnp.where(bad, jnp.nan, metrics["loss"])
      return new_state, metrics

    steps.train_step = nan_step
  elif args.mode == "late_first_step":
    real_train_step = steps.train_step

    def late_step(state, batch, **kwargs):  # Runs when jit traces it: before the first step.
      if jax.process_index() == 1:
        time.sleep(args.at)  # This process compiles its first step K s after the others.
      return real_train_step(state, batch, **kwargs)

    steps.train_step = late_step
  make_data = None
  if args.mode == "sigterm_in_eval":
    from attn import data

    def make_data(cfg, **kwargs):
      """The eval of step K gets a SIGTERM after its first batch; prints how many it read."""
      train_iter, eval_iters, info = data.make_iterators(cfg, **kwargs)
      calls = []

      def eval_with_signal(num_batches=None):
        calls.append(1)
        read = 0
        try:
          for batch in eval_iters(num_batches=num_batches):
            yield batch
            read += 1
            if len(calls) == args.at and read == 1:
              os.kill(os.getpid(), signal.SIGTERM)
        finally:
          print("EVAL_BATCHES", len(calls), read, flush=True)

      return train_iter, eval_with_signal, info
  result = train.train_and_evaluate(config, args.workdir, hooks=hooks, make_data=make_data)
  print("RESULT", json.dumps({k: v for k, v in result.items() if isinstance(v, (int, float))}),
        flush=True)


if __name__ == "__main__":
  main()
