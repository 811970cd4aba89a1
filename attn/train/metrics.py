"""Metric outputs: `metrics.jsonl`, TensorBoard events (tensorboardX, no TensorFlow), a progress
bar, and the numbers in `summary.json` (parameter hash, throughput, MFU).

Only process 0 writes; the other processes get a writer that does nothing. The workdir may be a
bucket (`gs://...`): files go through attn.storage, and TensorBoard events are written to a local
folder and copied to `<workdir>/tensorboard` every `SYNC_SECONDS` and at the end. (tensorboardX's
own gs:// writer re-uploads from `__del__` at interpreter exit, which hangs for two minutes of
retries when the bucket is out of reach.)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from attn import storage

# Peak dense bf16 FLOP/s per chip for MFU. Unknown accelerators report mfu = null.
PEAK_FLOPS = {
  "TPU v4": 275e12,
  "TPU v5 lite": 197e12,
  "TPU v5e": 197e12,
  "TPU v5p": 459e12,
  "TPU v6 lite": 918e12,
  "TPU v6e": 918e12,
  "NVIDIA A100": 312e12,
  "NVIDIA H100": 989e12,
  "NVIDIA H200": 989e12,
}


SYNC_SECONDS = 30.0


class MetricWriter:
  """Writes scalars to metrics.jsonl and TensorBoard; a tqdm bar on the console."""

  def __init__(self, workdir: str, *, total_steps: int, initial_step: int = 0,
               progress_bar: bool = True, enabled: bool = True, config_text: str = ""):
    self.enabled = enabled
    self.total_steps = total_steps
    self._started = (time.monotonic(), initial_step)  # For the ETA of the plain log lines.
    self.path = storage.join(workdir, "metrics.jsonl")
    self.tb_dir = storage.join(workdir, "tensorboard")
    self._tb = None
    self._bar = None
    self._tb_local = None  # Local staging folder when tb_dir is in a bucket.
    self._synced = 0.0
    if not enabled:
      return
    storage.makedirs(workdir)
    _truncate_after(self.path, initial_step)
    from tensorboardX import SummaryWriter  # Imports no TensorFlow (clu and flax's writer do).

    if storage.is_url(self.tb_dir):
      self._tb_local = tempfile.mkdtemp(prefix="attn-tensorboard-")
    # A resumed run purges what the previous run logged after its checkpoint (TensorBoard
    # drops earlier events with step >= purge_step), so no step is shown twice. Its own file
    # name: tensorboardX names files by the second, and a second writer of the same name
    # would overwrite the first run's file.
    self._tb = SummaryWriter(self._tb_local or self.tb_dir, flush_secs=30,
                             purge_step=initial_step + 1 if initial_step else None,
                             filename_suffix=f".resumed_at_{initial_step}" if initial_step else "")
    if config_text:  # Indented: TensorBoard renders text as Markdown, this as a code block.
      self._tb.add_text("config", "    " + config_text.replace("\n", "\n    "), initial_step)
    self._synced = time.monotonic()
    if progress_bar:
      from tqdm import tqdm

      self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True,
                       file=sys.stderr, mininterval=1.0)

  def write(self, step: int, split: str, metrics: dict[str, float]) -> None:
    """One line per (step, split) in metrics.jsonl, and one TensorBoard scalar per metric."""
    if not self.enabled:
      return
    clean = {k: _plain(v) for k, v in metrics.items()}
    storage.append_text(self.path, json.dumps({"step": step, "split": split, **clean}) + "\n")
    for key, value in clean.items():
      if isinstance(value, (int, float)):
        self._tb.add_scalar(f"{split}/{key}", value, step)
    if self._tb_local and time.monotonic() - self._synced > SYNC_SECONDS:
      self._sync_tensorboard()

  def _sync_tensorboard(self) -> None:
    """Copies the local event files to the bucket (each upload replaces the whole object)."""
    self._tb.flush()
    for name in sorted(os.listdir(self._tb_local)):
      with open(os.path.join(self._tb_local, name), "rb") as f:
        storage.write_bytes_atomic(storage.join(self.tb_dir, name), f.read())
    self._synced = time.monotonic()

  def progress(self, step: int, postfix: dict[str, float]) -> None:
    """The bar, or without one (sweeps, TPU VMs, SLURM logs) one line per logged step."""
    if self._bar is not None:
      self._bar.n = step
      self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=True)
    elif self.enabled:
      seconds, first = time.monotonic() - self._started[0], self._started[1]
      eta = seconds / (step - first) * (self.total_steps - step) if step > first else None
      self.message(f"step {step}/{self.total_steps}: "
                   + ", ".join(f"{k} {v:.4g}" for k, v in postfix.items())
                   + (f", eta {_duration(eta)}" if eta is not None else ""))

  def message(self, text: str) -> None:
    """A line on the console that does not break the bar."""
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(text, file=sys.stderr)
    else:
      print(text, file=sys.stderr, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    if self._tb is not None:
      if self._tb_local:
        self._sync_tensorboard()
      self._tb.close()
      if self._tb_local:
        shutil.rmtree(self._tb_local, ignore_errors=True)


def _duration(seconds: float) -> str:
  """3725 -> '1h02m', 95 -> '1m35s'."""
  minutes, secs = divmod(round(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _plain(value: Any) -> Any:
  value = value.item() if hasattr(value, "item") else value
  return None if isinstance(value, float) and not math.isfinite(value) else value


def _truncate_after(path: str, step: int) -> None:
  """Drops lines past `step` (a resumed run rewrites the steps after its checkpoint) and lines
  that do not parse (a torn last line of a killed run); rewrites the file atomically."""
  if not storage.exists(path):
    return
  lines = [line + "\n" for line in storage.read_text(path).splitlines() if line.strip()]
  kept, torn = [], []
  for number, line in enumerate(lines, 1):
    try:
      record = json.loads(line)
      if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    except ValueError:
      torn.append(number)
      continue
    if record.get("step", 0) <= step:
      kept.append(line)
  if torn:
    print(f"{path}: dropped {len(torn)} damaged line(s) (line {', '.join(map(str, torn[:5]))}"
          f"{', ...' if len(torn) > 5 else ''} of {len(lines)}; a run killed mid-write tears "
          "its last line).", file=sys.stderr, flush=True)
  if len(kept) != len(lines):
    storage.write_text_atomic(path, "".join(kept))  # A kill mid-repair leaves the old file.


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """metrics.jsonl as a list of dicts."""
  return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


def params_sha256(params: Any) -> str:
  """A hash of every parameter's path, dtype, shape and bytes, in sorted path order."""
  digest = hashlib.sha256()
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      leaf = multihost_utils.process_allgather(leaf, tiled=True)
    array = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


class ThroughputMeter:
  """Steps/s and tokens/s of the training steps alone, cumulative over this run.

  The clock starts when the first step has finished (compilation is not throughput) and is
  stopped around host work (logs, evals, checkpoints) with `paused`:

      meter.step(metrics)              # after each train step
      with meter.paused(metrics):      # waits for the step, stops the clock
        ...                            # logs read meter.rates(); evals; checkpoints
  """

  def __init__(self, tokens_per_step: float) -> None:
    self.tokens_per_step = tokens_per_step
    self.steps = 0  # Timed steps (the first one is not).
    self.seconds = 0.0
    self._clock: float | None = None
    self._started = False

  def step(self, step_metrics: Any) -> None:
    """Counts a step; the first one is waited for and starts the clock."""
    if self._started:
      self.steps += 1
      return
    jax.block_until_ready(step_metrics)
    self._started = True
    self._clock = time.perf_counter()

  @contextlib.contextmanager
  def paused(self, step_metrics: Any) -> Iterator[None]:
    """Waits for the last step, stops the clock for the block, restarts it after."""
    jax.block_until_ready(step_metrics)
    if self._clock is not None:
      self.seconds += time.perf_counter() - self._clock
    self._clock = None
    try:
      yield
    finally:
      self._clock = time.perf_counter()

  @property
  def steps_per_second(self) -> float | None:
    """None until a step was timed."""
    return self.steps / self.seconds if self.steps and self.seconds > 0 else None

  def rates(self) -> dict[str, float]:
    """{steps_per_second, tokens_per_second}; {} until a step was timed."""
    rate = self.steps_per_second
    if rate is None:
      return {}
    return {"steps_per_second": rate, "tokens_per_second": rate * self.tokens_per_step}


def measure_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
  """This host's float32 matmul FLOP/s on the first device (the CPU 'peak' for MFU)."""
  x = jax.device_put(jnp.ones((n, n), jnp.float32), jax.local_devices()[0])
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    f(x).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best


def peak_flops() -> tuple[float, str]:
  """(peak FLOP/s of all devices of the run, how it was obtained)."""
  device = jax.devices()[0]
  if device.platform == "cpu":
    # Simulated CPU devices share the host's cores: the peak is one measured matmul rate per host.
    rate = measure_matmul_flops()
    return rate * jax.process_count(), (
      f"cpu: measured float32 1024x1024 matmul rate {rate / 1e9:.1f} GFLOP/s per host"
    )
  for name, peak in PEAK_FLOPS.items():
    if device.device_kind.startswith(name):
      return peak * jax.device_count(), f"{device.device_kind}: {peak / 1e12:.0f} TFLOP/s bf16 peak"
  return math.nan, f"{device.device_kind}: unknown peak"


def model_flops_per_step(num_params: int, model_cfg: Any, info: Any, batch_size: int) -> float:
  """Training FLOPs of one step, the usual estimate (Kaplan et al. 2020; PaLM appendix B):
  6 per parameter per token (forward + backward matmuls) plus the attention score and value
  matmuls, 12 * layers * T * D per token. Remat recomputation is not counted (MFU, not HFU)."""
  if info.task == "vision":
    length = model_cfg.num_patches + 1
  elif info.task == "seq2seq":
    length = info.seq_len + info.target_len
  else:
    length = info.seq_len
  layers = model_cfg.num_layers
  if info.task == "seq2seq":
    layers += model_cfg.decoder_layers
  tokens = batch_size * length
  attention = 12 * layers * length * model_cfg.num_heads * model_cfg.head_size
  return float(tokens * (6 * num_params + attention))


def read_summary(workdir: str) -> dict[str, Any] | None:
  """summary.json, or None if there is none or it is damaged (which is reported on stderr)."""
  path = storage.join(workdir, "summary.json")
  try:
    summary = json.loads(storage.read_text(path))
    if not (isinstance(summary, dict) and isinstance(summary.get("step"), int)
            and isinstance(summary.get("metrics"), dict)):
      raise ValueError("not a summary (no integer 'step' and 'metrics' object)")
    return summary
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    print(f"{path} is damaged ({type(e).__name__}: {e}); it will be recomputed from the newest "
          "checkpoint.", file=sys.stderr, flush=True)
    return None


def format_report(workdir: str, result: dict[str, Any]) -> str:
  """What the command line prints at the end: eval metrics, a sample, throughput, the paths."""
  if result.get("preempted"):
    return f"Stopped at step {result['step']} (SIGTERM); the same command resumes it."
  summary = read_summary(workdir)
  if summary is None:
    return f"Finished {workdir} at step {result.get('step')}; its summary.json is missing."
  lines = [f"Finished {workdir} at step {summary['step']}."]
  lines.append("eval: " + ", ".join(f"{k} {v:.4f}" for k, v in summary["metrics"].items()
                                   if isinstance(v, (int, float))))
  if summary.get("tokens_per_second"):
    mfu = summary.get("mfu")
    lines.append(f"speed: {summary['tokens_per_second']:,.0f} tokens/s, "
                 f"{summary['steps_per_second']:.2f} steps/s"
                 + (f", MFU {100 * mfu:.1f}% ({summary['mfu_basis']})" if mfu else ""))
  if summary.get("sample") is not None:
    lines.append("sample:\n" + summary["sample"])
  lines.append("wrote:")
  for name in ("summary.json", "metrics.jsonl", "tensorboard", "checkpoints", "attention.png"):
    if storage.exists(storage.join(workdir, name)):
      lines.append(f"  {storage.join(workdir, name)}")
  return "\n".join(lines)
