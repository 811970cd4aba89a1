"""Multi-query associative recall (Zoology, Arora et al. 2023): which attention variants recall
key-value pairs, as sequence length, number of pairs and model width grow.

Command:  python -m launch.sweep --config experiments/mqar.py --workdir runs/mqar --parallel 4
          python -m experiments.main --config experiments/mqar.py:data=long,width=128 \
              --workdir runs/mqar_long
Args:     data=tiny|l32|l64|l128|default|long (length x pairs: 32 x 4 (512 / 16,384
          problems), 64 x 8, 128 x 16, 256 x 16, 1024 x 64; the mqar
          builder's configs), width=N (d_model, default 128), attention=mha|gqa|mqa|local|chunked,
          lr=X, steps=N, heads=N (0: max(4, width / 32)), position=rope|learned|...,
          tie=True|False (tied embeddings), embed_init=normal|scaled (model.embed_init),
          batch=N, warmup=N, sweep=grid|defaults, runlocal.
Sweep:    data {default, long} x width {64, 128, 256} x attention {mha, gqa, mqa, local} x
          lr {1e-3, 3e-3} = 48 runs (Zoology sweeps the learning rate and keeps the best).
          `:sweep=defaults` instead changes the embedding init, positions and tying one at a
          time (5 runs; the README's MQAR finding). `:runlocal` shrinks it to 2 runs on
          mqar/tiny (mha vs local) for a CPU check.
Hardware: one GPU or TPU host: 4,000 steps of 64 rows; ~5 min per run at length 256 and ~15
          min at 1024 on an H100 (estimate), so the sweep is ~6 GPU-hours. Each point fits a
          2-core CPU too at ~30 min per default-length run.
Expected: accuracy over the value tokens (the only targets with weight; the reported token
          accuracy): full attention (mha / gqa / mqa) > 0.95 at every width on default and
          long; local attention (window = length / 4) cannot see pairs further back, so it
          stays far lower (~0.2-0.5: only queries whose pair is in the window); Zoology's
          published pattern, not yet measured here.
"""

import ml_collections

from experiments import common, presets
from launch import grid

SWEEP_METRIC = "accuracy"
# data -> (seq_len, vocab)
_DATA = {"tiny": (32, 64), "l32": (32, 64), "l64": (64, 256), "l128": (128, 256),
         "default": (256, 8192), "long": (1024, 8192)}
_ARGS = {"data": "default", "width": 128, "attention": "mha", "lr": 1e-3, "steps": 0,
         "heads": 0, "position": "rope", "tie": True, "embed_init": "normal", "batch": 64,
         "warmup": 200, "sweep": "grid", "runlocal": False}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, **_ARGS)
  config = common.base_config()
  data = "tiny" if args.runlocal else args.data
  seq_len, vocab = presets.choose("data", data, _DATA)
  config.data.name = f"mqar/{data}"
  config.data.tokenizer = "ids"
  config.data.seq_len = seq_len
  config.data.pack = False  # One recall problem per row.
  # Zoology's model: 2 layers; heads of 32 dims, at least 4 so that GQA differs from MHA.
  config.model.update(kind="lm", vocab_size=vocab, d_model=args.width, num_layers=2,
                      num_heads=args.heads or max(4, args.width // 32), mlp_dim=2 * args.width,
                      position=args.position, tie_embeddings=args.tie,
                      embed_init=args.embed_init, dropout_rate=0.0)
  config.optim.update(name="adamw", learning_rate=args.lr, weight_decay=0.1,
                      warmup_steps=args.warmup, schedule="cosine", end_lr_factor=0.0)
  config.train.update(num_steps=4_000, batch_size=args.batch, eval_every=1_000, eval_steps=0,
                      checkpoint_every=1_000, log_every=100, best_metric="accuracy",
                      best_mode="max")
  presets.set_steps(config, args.steps)
  if args.runlocal:
    common.runlocal(config)
    presets.runlocal_steps(config)
    config.data.seq_len = seq_len
    config.model.vocab_size = vocab
  presets.set_attention(config, args.attention)
  presets.fit_lengths(config)
  return config


# sweep=defaults: which model default decides whether a small model learns recall, one setting
# changed at a time from today's defaults (N(0, 1) embeddings, RoPE, tied), then all three.
DEFAULTS_SWEEP = [{}, {"arg.embed_init": "scaled"}, {"arg.position": "learned"},
                  {"arg.tie": False},
                  {"arg.embed_init": "scaled", "arg.position": "learned", "arg.tie": False}]


def get_sweep(arg: str | None = None) -> list[grid.Point]:
  args = common.parse_arg(arg, **_ARGS)
  if args.runlocal:
    return grid.grid({"arg.attention": ["mha", "local"]})
  if args.sweep == "defaults":
    return [{"arg.embed_init": "normal", "arg.position": "rope", "arg.tie": True, **p}
            for p in DEFAULTS_SWEEP]
  return grid.grid({"arg.data": ["default", "long"], "arg.width": [64, 128, 256],
                    "arg.attention": ["mha", "gqa", "mqa", "local"], "arg.lr": [1e-3, 3e-3]})
