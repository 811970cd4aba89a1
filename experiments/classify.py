"""Sequence classification with an encoder: IMDb / SST-2 remotely, ListOps locally.

Command:  python -m experiments.main --config experiments/classify.py:data=imdb \
              --workdir runs/imdb --config.data.data_dir=gs://BUCKET/tensorflow_datasets
          python -m experiments.main --config experiments/classify.py:data=listops \
              --workdir runs/listops                                       # embedded, CPU
Args:     data=imdb|sst2|listops|listops_lra (default listops), size=tiny|small|medium|base|large,
          position=sinusoidal|learned|rope|alibi|t5|none, pooling=cls|mean|attention,
          attention=mha|gqa|mqa|local, steps=N, runlocal.
Hardware: imdb (bytes, length 1024) or sst2 (bytes, length 128), size=small: one TPU VM host or
          GPU, 10k steps of 32 rows, under an hour (estimate). listops/small, size=small: a
          2-core CPU, 2,000 steps of 32 x 512 tokens, ~30 min. listops_lra: length 2048, an
          accelerator (the LRA setting).
Expected: listops/small: accuracy ~0.35-0.50 (10 classes; chance 0.10, the majority class
          ~0.17); listops_lra: ~0.36-0.38, the LRA vanilla-Transformer number (Tay et al. 2021).
          imdb bytes at 1024: accuracy ~0.62-0.66 (LRA text ~0.64); sst2 bytes: ~0.75-0.80.
          All bands are estimates from the cited papers, not measured here.
          runlocal: a seconds-long smoke run on listops/tiny (accuracy near chance).
"""

import ml_collections

from experiments import common, presets

SWEEP_METRIC = "accuracy"
# data -> (TEXT_DATA key, seq_len)
_DATA = {"imdb": ("imdb", 1024), "sst2": ("sst2", 128), "listops": ("listops", 512),
         "listops_lra": ("listops_lra", 2048)}
_LISTOPS_VOCAB = 18  # the listops builder's ids, pad / bos / eos included


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, data="listops", size="small", position="sinusoidal",
                          pooling="cls", attention="mha", steps=0, runlocal=False)
  config = common.base_config()
  config.model.kind = "classifier"
  config.model.position = args.position
  config.model.pooling = args.pooling
  config.model.dropout_rate = 0.1
  presets.set_size(config, args.size)
  key, seq_len = presets.choose("data", args.data, _DATA)
  presets.set_text_data(config, key, vocab=_LISTOPS_VOCAB)
  config.model.num_classes = 10 if key.startswith("listops") else 2
  config.data.seq_len = seq_len
  config.data.pack = False  # one example per row (the pipeline requires it for classify)

  config.optim.update(name="adamw", learning_rate=1e-3, weight_decay=0.05, warmup_steps=200,
                      schedule="cosine", end_lr_factor=0.0)
  remote = key in ("imdb", "sst2")
  config.train.update(num_steps=10_000 if remote else 2_000, batch_size=32,
                      eval_every=1_000 if remote else 500, eval_steps=0 if not remote else 50,
                      checkpoint_every=1_000 if remote else 500, log_every=50,
                      best_metric="accuracy", best_mode="max")
  presets.set_steps(config, args.steps)
  if args.runlocal:
    config.data.name = "listops/tiny"
    common.runlocal(config)
    presets.runlocal_steps(config)
    config.data.seq_len = 64  # listops/tiny's longest expression
    config.model.dropout_rate = 0.0
  presets.set_attention(config, args.attention)
  presets.fit_lengths(config)
  return config
