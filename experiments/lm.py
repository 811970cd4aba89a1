"""Decoder-only language model: lm1b on a TPU VM, the embedded pystdlib corpus locally.

Command:  python -m experiments.main --config experiments/lm.py:size=base --workdir runs/lm \
              --config.data.data_dir=gs://BUCKET/tensorflow_datasets      # lm1b, TPU VM
          python -m experiments.main --config experiments/lm.py:data=pystdlib,size=small \
              --workdir runs/lm_local                                     # embedded, CPU
          python -m launch.tpu_vm run --name NAME --config experiments/lm.py:size=base ...
Args:     data=lm1b|pystdlib|pystdlib_full (default lm1b), size=tiny|small|medium|base|large
          (default base; see experiments/presets.SIZES), attention=mha|gqa|mqa|local|chunked,
          position=rope|sinusoidal|learned|alibi|t5|none, steps=N, runlocal.
Hardware: lm1b, size=base: a v5litepod-8 (or v4-8) TPU VM, ~19M + 16M embedding parameters,
          batch 256 x 128 SentencePiece tokens, 50k steps: about 2 hours (estimate; not measured
          here). data=pystdlib,size=small: a 2-core CPU, 2,000 steps of 16 x 256 bytes, ~25 min.
Expected: lm1b base: eval loss ~3.4-3.8 nats/token (perplexity ~30-45) at 50k steps, an estimate
          from published lm1b baselines of this size, not a measured number.
          pystdlib small: eval bits_per_byte ~1.9-2.3 (a unigram byte model is ~4.8).
          runlocal: a seconds-long smoke run on pystdlib/small (bits_per_byte ~7: it is not
          meant to learn).
"""

import ml_collections

from experiments import common, presets

SWEEP_METRIC = "loss"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, data="lm1b", size="base", attention="mha", position="rope",
                          steps=0, runlocal=False)
  config = common.base_config()
  config.model.kind = "lm"
  config.model.position = args.position
  config.model.ffn = "gelu"
  config.model.dropout_rate = 0.0
  presets.set_size(config, args.size)
  presets.set_text_data(config, "pystdlib" if args.runlocal else args.data)

  remote = config.data.name == "lm1b"
  config.data.seq_len = 128 if remote else 256
  config.optim.update(name="adamw", learning_rate=1e-3 if remote else 3e-3, weight_decay=0.1,
                      warmup_steps=1000 if remote else 100, schedule="cosine", end_lr_factor=0.1)
  config.train.update(num_steps=50_000 if remote else 2_000, batch_size=256 if remote else 16,
                      eval_every=2_000 if remote else 500, eval_steps=50 if remote else 20,
                      checkpoint_every=2_000 if remote else 500, log_every=100 if remote else 50,
                      sample_tokens=64, sample_prompt="The " if remote else "def ")
  presets.set_steps(config, args.steps)
  if args.runlocal:
    common.runlocal(config)
    presets.runlocal_steps(config)
  presets.set_attention(config, args.attention)  # After runlocal: it resizes the heads.
  presets.fit_lengths(config)
  return config
