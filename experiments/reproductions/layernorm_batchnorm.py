"""LayerNorm vs BatchNorm in a Transformer LM: BatchNorm trains worse on language (Shen et al.
2020, PowerNorm).

Claim:    a Transformer language model with BatchNorm ends worse than the same model with
          LayerNorm; the paper's explanation is that the batch statistics fluctuate strongly
          from step to step on text.
Paper:    Shen et al. 2020, "PowerNorm: Rethinking Batch Normalization in Transformers" (ICML),
          sec. 3 and fig. 2 (batch-statistics variance across steps).
Band:     eval loss of BatchNorm >= LayerNorm + 0.05 nats/byte (a diverged BatchNorm run counts
          as worse). Stated before the first run. Not measured yet: the variance of the batch
          statistics across steps (the paper's fig. 2) needs the trainer to log BatchNorm's
          batch mean / variance per step, which it does not do today.
Budget:   experiments/norm_ablation.py's model at size `tiny` (2 layers, d_model 64, Pre-LN) on
          pystdlib bytes, 300 steps of 16 x 128, AdamW lr 3e-3 with 25 warmup steps. The paper
          trains IWSLT / WMT / WikiText.
Command:  python -m experiments.reproduce --only layernorm_batchnorm [--seeds 3]
Hardware: a 2-core CPU: 2 runs of ~1-2 min each unloaded (estimate).
"""

import math

from experiments import norm_ablation
from launch import grid

ORDER = 3
TITLE = "LayerNorm vs BatchNorm (Pre-LN, pystdlib bytes)"
PAPER = "Shen et al. 2020 (PowerNorm)"
BAND = "batchnorm eval loss >= layernorm + 0.05 nats/byte (diverged = worse)"
SWEEP_METRIC = "loss"
MIN_GAP = 0.05


def get_config(arg: str | None = None):
  return norm_ablation.get_config("lr=3e-3,steps=300,size=tiny" + (f",{arg}" if arg else ""))


def get_sweep(arg: str | None = None) -> list[grid.Point]:
  del arg
  return grid.grid({"arg.norm": ["layernorm", "batchnorm"]})


def check(cells) -> tuple[str, str]:
  batch = cells.find(norm="batchnorm")
  diverged = batch is not None and batch.runs and batch.failed == batch.runs
  ln = cells.mean("loss", norm="layernorm")
  bn = math.inf if diverged else cells.mean("loss", norm="batchnorm")
  detail = f"layernorm {ln:.3f}, batchnorm {bn:.3f}"
  if math.isnan(ln) or math.isnan(bn):
    return "incomplete", detail
  return ("pass" if bn >= ln + MIN_GAP else "fail"), detail
