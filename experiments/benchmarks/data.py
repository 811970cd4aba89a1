"""Input-pipeline throughput: examples/s and tokens/s of each dataset's Grain pipeline.

    python -m experiments.benchmarks.data                      # all embedded datasets
    python -m experiments.benchmarks.data --datasets=pystdlib/small --batch_size=32 --seq_len=256
    python -m experiments.benchmarks.data --out=runs/bench/data.json

Measures the train iterator after a warm-up (preparing a dataset the first time is not timed),
on this process's CPU only: no device, no model. Tokens are non-padding tokens of the rows
(inputs + targets for seq2seq); vision counts images. `fill` = real tokens / row capacity.
`--consumed_tokens_per_s` (what the training run eats, from its own benchmark or log) adds the
ratio `headroom` = delivered / consumed; the pipeline should deliver at least 10x.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Sequence

from absl import app, flags

from attn import data

_DATASETS = flags.DEFINE_list(
  "datasets",
  ["pystdlib/small", "mqar/default", "listops/small", "algorithmic/reverse",
   "cldr_translate/en_de", "digits"],
  "Dataset names (config.data.name) to measure.",
)
_BATCH = flags.DEFINE_integer("batch_size", 32, "Global batch size (one process).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "config.data.seq_len.")
_SECONDS = flags.DEFINE_float("seconds", 3.0, "How long to time each pipeline.")
_WORKERS = flags.DEFINE_integer("num_workers", 0, "Grain worker processes.")
_PACK = flags.DEFINE_bool("pack", True, "Pack sequences (lm, seq2seq).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir (default: attn's).")
_CONSUMED = flags.DEFINE_float("consumed_tokens_per_s", None,
                               "Tokens/s the training run consumes, to report the headroom.")
_OUT = flags.DEFINE_string("out", None, "Write the JSON results here as well as to stdout.")


def _tokens(batch: dict, task: str) -> float:
  """Real (non-padding) tokens in a batch; images for vision."""
  if task == "vision":
    return float(batch["weights"].sum())
  if task == "seq2seq":
    return float((batch["inputs_segment_ids"] > 0).sum() + (batch["targets_segment_ids"] > 0).sum())
  return float((batch["segment_ids"] > 0).sum())


def measure(name: str, batch_size: int, seq_len: int, seconds: float, num_workers: int,
            pack: bool, data_dir: str | None) -> dict:
  """Times one pipeline; returns its numbers."""
  cfg = data.default_config()
  cfg.name, cfg.seq_len, cfg.pack, cfg.num_workers = name, seq_len, pack, num_workers
  if data_dir:
    cfg.data_dir = data_dir
  start = time.perf_counter()
  train_iter, _, info = data.make_iterators(cfg, global_batch_size=batch_size, seed=0,
                                            process_index=0, process_count=1)
  for _ in range(5):  # Warm-up: threads, workers and the first packed groups.
    next(train_iter)
  setup_s = time.perf_counter() - start
  capacity = {"vision": 1, "seq2seq": info.seq_len + info.target_len}.get(info.task, seq_len)
  batches, tokens, rows = 0, 0.0, 0
  start = time.perf_counter()
  while (elapsed := time.perf_counter() - start) < seconds:
    batch = next(train_iter)
    batches += 1
    tokens += _tokens(batch, info.task)
    rows += next(iter(batch.values())).shape[0]
  if num_workers:
    train_iter.close()
  return {
    "dataset": info.name, "task": info.task, "batch_size": batch_size, "seq_len": seq_len,
    "pack": pack and info.task in ("lm", "seq2seq"), "num_workers": num_workers,
    "setup_s": round(setup_s, 2), "batches_per_s": round(batches / elapsed, 1),
    "examples_per_s": round(rows / elapsed, 1), "tokens_per_s": round(tokens / elapsed, 1),
    "fill": round(tokens / (rows * capacity), 3),  # Share of row slots holding real tokens.
  }


def main(argv: Sequence[str]) -> None:
  del argv
  results = []
  for name in _DATASETS.value:
    result = measure(name, _BATCH.value, _SEQ_LEN.value, _SECONDS.value, _WORKERS.value,
                     _PACK.value, _DATA_DIR.value)
    if _CONSUMED.value:
      result["headroom"] = round(result["tokens_per_s"] / _CONSUMED.value, 1)
    print(json.dumps(result), flush=True)
    results.append(result)
  report = {"benchmark": "data", "machine": platform.machine(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "results": results}
  if _OUT.value:
    os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
    with open(_OUT.value, "w") as f:
      json.dump(report, f, indent=2)


if __name__ == "__main__":
  app.run(main)
