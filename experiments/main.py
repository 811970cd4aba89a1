"""Train one experiment: the command line of `attn.train.train_and_evaluate`.

    python -m experiments.main --config experiments/default.py[:arg] --workdir runs/default \
        [--config.train.num_steps=100 ...]

Relaunching the same command resumes from the workdir's latest checkpoint (a finished run does
nothing). Multi-host: every host runs this same command (see attn.train.distributed).
"""

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from attn import data, train
from attn.train import distributed, metrics

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Experiment file with get_config(arg), e.g. experiments/default.py:runlocal.",
  lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and summary.json go here.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  logging.set_verbosity(logging.WARNING)  # Orbax logs every step of every save at INFO.
  distributed.maybe_initialize(config.train.heartbeat_timeout_s)
  try:
    result = train.train_and_evaluate(config, _WORKDIR.value)
  except (train.ConfigError, data.DataError) as e:
    sys.exit(f"Config error: {e}")  # Exit status 1, no traceback: the message names the fix.
  if jax.process_index() == 0:
    print(metrics.format_report(_WORKDIR.value, result), flush=True)


if __name__ == "__main__":
  app.run(main)
