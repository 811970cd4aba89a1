"""A tiny sweep for the launch tests: the norm ablation's runlocal config, two norms, plus one
point whose config cannot build a model (an unknown norm), pinned to seed 0."""

from experiments import norm_ablation
from launch import grid


def get_config(arg=None):
  return norm_ablation.get_config("runlocal" + (f",{arg}" if arg else ""))


def get_sweep():
  return grid.grid({"arg.norm": ["layernorm", "rmsnorm"]}) + [{"arg.norm": "nonsense", "seed": 0}]
