"""Normalization ablation on the pystdlib byte LM: LayerNorm / RMSNorm / BatchNorm x Pre-LN /
Post-LN x warmup on/off x learning rate.

The questions: does BatchNorm, which normalizes over the batch (and, in a causal LM, mixes
statistics across positions), hurt a Transformer as Shen et al. 2020 ("PowerNorm") report? Does
Post-LN need the warmup (Xiong et al. 2020, "On Layer Normalization in the Transformer
Architecture") while Pre-LN trains without it, and at which learning rate does Post-LN break?
Is RMSNorm (Zhang & Sennrich 2019) as good as LayerNorm at a lower cost?

Command:  python -m launch.sweep --config experiments/norm_ablation.py --workdir runs/norm \
              --seeds 3 --parallel 2
          python -m launch.sweep --config experiments/norm_ablation.py:runlocal \
              --workdir runs/norm_local --seeds 2 --parallel 2       # 2-variant CPU check
          python -m experiments.main --config experiments/norm_ablation.py:norm=rmsnorm,place=post \
              --workdir runs/norm_one
Args:     norm=layernorm|rmsnorm|batchnorm, place=pre|post|sandwich, warmup=True|False,
          lr=X (peak), steps=N, size=tiny|small|... (default small), runlocal.
Sweep:    norm {layernorm, rmsnorm, batchnorm} x place {pre, post} x warmup {True, False} x
          lr {1e-3, 3e-3} = 24 variants; x --seeds 3 = 72 runs.
Hardware: each run is the `small` model (4 layers, d_model 128, ~0.8M parameters), 600 steps of
          16 x 128 bytes: ~3-4 min on a 2-core CPU, well under a minute on a GPU. The sweep
          with 3 seeds: ~4 CPU-hours at --parallel 2 (estimate), ~30 min on one GPU at
          --parallel 4.
Expected: eval loss after 600 steps ~1.4-1.8 nats/byte for Pre-LN LayerNorm/RMSNorm at both
          learning rates (within ~0.05 of each other); Post-LN without warmup at lr 3e-3 is the
          worst cell or diverges (NaN: the run fails and the report lists it); BatchNorm
          trails LayerNorm. Bands are estimates until the sweep has run.
"""

import ml_collections

from experiments import common, presets
from launch import grid

SWEEP_METRIC = "loss"
_ARGS = {"norm": "layernorm", "place": "pre", "warmup": True, "lr": 3e-3, "steps": 600,
         "size": "small", "runlocal": False}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, **_ARGS)
  config = common.base_config()
  config.model.kind = "lm"
  config.model.position = "rope"
  presets.set_size(config, args.size)
  presets.set_text_data(config, "pystdlib")
  config.data.seq_len = 128
  config.model.norm = args.norm
  config.model.norm_placement = args.place
  config.optim.update(name="adamw", learning_rate=args.lr, weight_decay=0.1,
                      warmup_steps=max(1, args.steps // 12) if args.warmup else 0,
                      schedule="cosine", end_lr_factor=0.1)
  config.train.update(num_steps=args.steps, batch_size=16, eval_every=max(1, args.steps // 3),
                      eval_steps=16, checkpoint_every=max(1, args.steps // 3),
                      log_every=max(1, args.steps // 30), sample_tokens=0)
  if args.runlocal:
    common.runlocal(config)
    presets.runlocal_steps(config)
    if not args.warmup:
      config.optim.warmup_steps = 0
  presets.fit_lengths(config)
  return config


def get_sweep(arg: str | None = None) -> list[grid.Point]:
  if common.parse_arg(arg, **_ARGS).runlocal:
    return grid.grid({"arg.norm": ["layernorm", "rmsnorm"]})
  return grid.grid({"arg.norm": ["layernorm", "rmsnorm", "batchnorm"], "arg.place": ["pre", "post"],
                    "arg.warmup": [True, False], "arg.lr": [1e-3, 3e-3]})
