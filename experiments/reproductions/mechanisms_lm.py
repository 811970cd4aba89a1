"""Attention mechanisms on the embedded byte LM: bits per byte after a fixed budget, against the
ordering the papers report.

Claim:    softmax attention and its close relatives (attention sinks, sigmoid attention, cosine
          attention) model bytes about equally well; sliding-window (local) attention is close
          behind at short context; linear attention and Performer (FAVOR+) are clearly worse.
Paper:    Vaswani et al. 2017 (softmax); Xiao et al. 2023 (sinks); Ramapuram et al. 2024
          (sigmoid, matches softmax); Liu et al. 2022 / Swin-v2 (cosine); Beltagy et al. 2020
          (local); Katharopoulos et al. 2020 (linear) and Choromanski et al. 2021 (Performer),
          both behind softmax on language modelling (e.g. Schlag et al. 2021, table 2).
Band:     eval bits/byte: sinks, sigmoid, cosine within 0.15 of softmax; local within 0.25 of
          softmax; linear and performer >= softmax + 0.10. Stated before the first run.
Budget:   experiments/lm.py:data=pystdlib,size=tiny (2 layers, d_model 64), 400 steps of
          16 x 256 bytes, AdamW lr 3e-3.
Command:  python -m experiments.reproduce --only mechanisms_lm [--seeds 3]
Hardware: a 2-core CPU: 7 runs of ~2-3 min each unloaded (estimate).
"""

import math

from experiments import lm
from launch import grid

ORDER = 5
TITLE = "Bits per byte after 400 steps (pystdlib, tiny LM)"
PAPER = "see docstring (7 papers)"
BAND = ("sinks / sigmoid / cosine within 0.15 of softmax; local within 0.25; linear, performer "
        ">= softmax + 0.10 bits/byte")
SWEEP_METRIC = "bits_per_byte"
CLOSE = {"sinks": 0.15, "sigmoid": 0.15, "cosine": 0.15, "local": 0.25}
BEHIND = {"linear": 0.10, "performer": 0.10}


def get_config(arg: str | None = None):
  return lm.get_config("data=pystdlib,size=tiny,steps=400" + (f",{arg}" if arg else ""))


def get_sweep(arg: str | None = None) -> list[grid.Point]:
  del arg
  return grid.grid({"arg.attention": ["mha", *CLOSE, *BEHIND]})


def check(cells) -> tuple[str, str]:
  bpb = {name: cells.mean("bits_per_byte", attention=name) for name in ["mha", *CLOSE, *BEHIND]}
  detail = ", ".join(f"{k} {v:.3f}" for k, v in sorted(bpb.items(), key=lambda kv: kv[1]))
  if any(math.isnan(v) for v in bpb.values()):
    return "incomplete", detail
  ok = (all(bpb[k] <= bpb["mha"] + d for k, d in CLOSE.items())
        and all(bpb[k] >= bpb["mha"] + d for k, d in BEHIND.items()))
  return ("pass" if ok else "fail"), detail
