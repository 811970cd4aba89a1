"""The default run (`make train`): a small decoder-only LM on the embedded pystdlib corpus.

Command:  make train
          (= python -m experiments.main --config experiments/default.py --workdir runs/default)
Hardware: a 2-core CPU (1 device, no accelerator): 3.5 CPU-minutes, so ~2-3 minutes on an idle
          machine; measured 8 minutes wall on 2 cores shared with two test suites (load ~8).
Model:    4-layer Pre-LN Transformer LM, d_model 128, 4 heads, RoPE, byte-level (vocab 259),
          826K parameters; AdamW, 400 steps of 16 x 128 bytes, warmup 50, cosine decay.
Expected: final eval loss 2.1-2.5 nats/byte (bits_per_byte 3.0-3.6; measured 2.28 / 3.29 at
          seed 0; uniform bytes would be 8 bits); eval at step 200 ~2.6. The sample is
          Python-flavoured byte soup at this size and length.
Args:     `runlocal` shrinks it to a seconds-long smoke run (used by the tests).
"""

import ml_collections

from experiments import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, runlocal=False)
  config = common.base_config()
  config.seed = 0

  config.data.name = "pystdlib/small"
  config.data.seq_len = 128

  config.model.kind = "lm"
  config.model.vocab_size = 259  # the byte tokenizer's
  config.model.d_model = 128
  config.model.num_layers = 4
  config.model.num_heads = 4
  config.model.mlp_dim = 512
  config.model.max_len = 128
  config.model.position = "rope"

  config.optim.name = "adamw"
  config.optim.learning_rate = 3e-3
  config.optim.warmup_steps = 50
  config.optim.schedule = "cosine"
  config.optim.end_lr_factor = 0.1
  config.optim.weight_decay = 0.1

  config.train.num_steps = 400
  config.train.batch_size = 16
  config.train.eval_every = 200
  config.train.eval_steps = 16
  config.train.checkpoint_every = 200
  config.train.log_every = 20
  config.train.sample_tokens = 120
  config.train.sample_temperature = 0.8
  config.train.sample_prompt = "def "

  if args.runlocal:
    common.runlocal(config)
  return config
