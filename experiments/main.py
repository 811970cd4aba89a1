"""Train one experiment: the command line of `attn.train.train_and_evaluate`.

    python -m experiments.main --config experiments/default.py[:arg] --workdir runs/default \
        [--config.train.num_steps=100 ...]

Relaunching the same command resumes from the workdir's latest checkpoint (a finished run does
nothing). Multi-host: every host runs this same command (see attn.train.distributed).
"""

import ctypes
import os
import re
import signal
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from attn import data, train
from attn.train import distributed, metrics, workdir_lock
from launch import report, sweep

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Experiment file with get_config(arg), e.g. experiments/default.py:runlocal.",
  lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and summary.json go here.")
_ALLOW_CHANGE = flags.DEFINE_bool(
  "allow_config_change", False, "Continue the workdir's run although the config changes fields "
  "that change its trajectory (recorded in <workdir>/config.json with the step).")
flags.mark_flags_as_required(["config", "workdir"])


def stop_with_launcher() -> None:
  """Under a sweep (sweep.LAUNCHER_PID_ENV set; Linux), asks the kernel for a SIGTERM when the sweep
  dies, however it dies (kill -9, a closed terminal): the run then saves and stops, as on any
  SIGTERM, instead of training on unwatched and holding its workdir against the relaunch."""
  launcher = os.environ.get(sweep.LAUNCHER_PID_ENV)
  if not launcher or not sys.platform.startswith("linux"):
    return
  pr_set_pdeathsig = 1  # <linux/prctl.h>
  ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
  if os.getppid() != int(launcher):  # The sweep died before the call above.
    os.kill(os.getpid(), signal.SIGTERM)


def _load_error(e: OSError) -> str:
  cause = e.__cause__ if isinstance(e.__cause__, OSError) else e
  return f"Config error: --config could not be loaded: {cause}"


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, where a --config.* override of a field the config does not have is
  one `Config error:` line (ml_collections raised a KeyError traceback ending in its
  did-you-mean)."""
  try:
    return app.parse_flags_with_usage(argv)
  except OSError as e:  # The file did not load and a --config.* override was applied to it.
    sys.exit(_load_error(e))
  except (KeyError, AttributeError) as e:
    text = str(e).replace('\\"', '"').replace("\\'", "'")
    hint = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
    missing = hint.group(2) if hint else (re.findall(r"'(\w+)'", text) or [""])[0]
    overrides = [a.split("=")[0] for a in argv if a.startswith("--config.")]
    named = [a for a in overrides if missing and missing in a.split(".")] or overrides
    sys.exit(f"Config error: {', '.join(named) or 'an override'} names no field of the config"
             + (f' (did you mean "{hint.group(1)}"?).' if hint else "."))


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  stop_with_launcher()
  config = _CONFIG.value
  try:
    config.get("train")  # A file that failed to load is an object that raises on any access.
  except OSError as e:
    sys.exit(_load_error(e))
  logging.set_verbosity(logging.WARNING)  # Orbax logs every step of every save at INFO.
  distributed.maybe_initialize(config.train.heartbeat_timeout_s)
  try:
    result = train.train_and_evaluate(config, _WORKDIR.value,
                                      allow_config_change=_ALLOW_CHANGE.value)
  except (train.ConfigError, data.DataError) as e:
    sys.exit(f"Config error: {e}")  # Exit status 1, no traceback: the message names the fix.
  except (workdir_lock.WorkdirBusyError, workdir_lock.LockLostError) as e:
    sys.exit(str(e))
  except train.NonFiniteError as e:  # A result, not a crash: sweeps report the run as diverged.
    print(f"Diverged: {e}", file=sys.stderr, flush=True)
    sys.exit(report.DIVERGED_EXIT_STATUS)
  except KeyboardInterrupt:
    # The lock is released and saves are finished by now. Leave without the interpreter's
    # teardown, which can crash while XLA's compile threads are still running (a first
    # compile interrupted by Ctrl-C ended in a segmentation fault).
    print("Interrupted (Ctrl-C): stopped without saving; the same command resumes from the "
          "newest checkpoint (SIGTERM saves before it stops).", file=sys.stderr, flush=True)
    os._exit(130)
  if jax.process_index() == 0:
    print(metrics.format_report(_WORKDIR.value, result), flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
