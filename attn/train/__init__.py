"""Training: one trainer for every task, jit + mesh sharding, Orbax checkpoints, metrics.

    from attn import train
    config = train.default_config()           # every section: model, data, optim, train, mesh
    metrics = train.train_and_evaluate(config, "runs/x")
    params = train.checkpoint.load_params("runs/x")   # onto one device, whatever the run's mesh

Modules: config (sections + validation), optimizer, sharding (mesh, rules, placement), state
(shape-first sharded init), tasks (lm / seq2seq / classify), steps (pure train / eval steps),
checkpoint (Orbax + Grain), evaluate (the evaluator), metrics (jsonl, TensorBoard, summary
numbers, throughput), trainer, distributed.
"""

from attn.train import checkpoint
from attn.train.config import ConfigError, default_config, validate
from attn.train.trainer import NonFiniteError, train_and_evaluate

__all__ = [
  "ConfigError",
  "NonFiniteError",
  "checkpoint",
  "default_config",
  "train_and_evaluate",
  "validate",
]
