"""Attention ablation on the pystdlib byte LM: MHA / GQA / MQA x positional encoding x heads.

The questions: how much does sharing key/value heads (GQA, Ainslie et al. 2023; MQA, Shazeer
2019) cost in loss at a fixed model size, and does it interact with the positional encoding
(RoPE, ALiBi, T5 buckets, sinusoidal, learned, none: NoPE works in a causal LM, Kazemnejad et
al. 2023) or the number of heads?

Command:  python -m launch.sweep --config experiments/attention_ablation.py --workdir runs/attn \
              --seeds 2 --parallel 2
          python -m launch.sweep --config experiments/attention_ablation.py:runlocal \
              --workdir runs/attn_local --parallel 2                 # 2-variant CPU check
          python -m experiments.main \
              --config experiments/attention_ablation.py:attention=gqa,position=alibi,heads=8 \
              --workdir runs/attn_one
Args:     attention=mha|gqa|mqa (see experiments/presets.ATTENTION; also local, chunked),
          position=rope|alibi|t5|sinusoidal|learned|none, heads=4|8, steps=N, runlocal.
Sweep:    attention {mha, gqa, mqa} x position {rope, alibi, t5, sinusoidal, learned, none} x
          heads {4, 8} = 36 variants (GQA = 2 KV heads at both head counts).
Hardware: each run is the `small` model (4 layers, d_model 128), 600 steps of 16 x 128 bytes:
          ~3-4 min on a 2-core CPU (t5 is the slowest: its bias is a [T, T] gather), under a
          minute on a GPU. 36 variants x 2 seeds: ~2.5 CPU-hours at --parallel 2 (estimate).
Expected: eval loss ~1.4-1.8 nats/byte at 600 steps; MQA within ~0.05 of MHA at this size,
          GQA in between; position=none is the worst by ~0.05-0.15, rope / alibi / t5 the best.
          Bands are estimates until the sweep has run.
"""

import ml_collections

from experiments import common, presets
from launch import grid

SWEEP_METRIC = "loss"
_ARGS = {"attention": "mha", "position": "rope", "heads": 4, "steps": 600, "runlocal": False}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, **_ARGS)
  config = common.base_config()
  config.model.kind = "lm"
  presets.set_size(config, "small")
  presets.set_text_data(config, "pystdlib")
  config.model.num_heads = args.heads
  config.model.position = args.position
  config.data.seq_len = 128
  config.optim.update(name="adamw", learning_rate=3e-3, weight_decay=0.1,
                      warmup_steps=max(1, args.steps // 12), schedule="cosine", end_lr_factor=0.1)
  config.train.update(num_steps=args.steps, batch_size=16, eval_every=max(1, args.steps // 3),
                      eval_steps=16, checkpoint_every=max(1, args.steps // 3),
                      log_every=max(1, args.steps // 30), sample_tokens=0)
  if args.runlocal:
    common.runlocal(config)
    presets.runlocal_steps(config)
    config.model.num_heads = 4  # GQA needs more than 2 query heads to differ from MHA.
  presets.set_attention(config, args.attention)
  presets.fit_lengths(config)
  return config


def get_sweep(arg: str | None = None) -> list[grid.Point]:
  if common.parse_arg(arg, **_ARGS).runlocal:
    return grid.grid({"arg.attention": ["mha", "gqa"]})
  return grid.grid({"arg.attention": ["mha", "gqa", "mqa"],
                    "arg.position": ["rope", "alibi", "t5", "sinusoidal", "learned", "none"],
                    "arg.heads": [4, 8]})
