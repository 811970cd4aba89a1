"""Encoder-decoder translation: WMT en->de on a TPU VM, CLDR display names (en->X) locally.

Command:  python -m experiments.main --config experiments/translate.py:data=wmt14 \
              --workdir runs/wmt14 --config.data.data_dir=gs://BUCKET/tensorflow_datasets
          python -m experiments.main --config experiments/translate.py:data=cldr,lang=fr \
              --workdir runs/cldr_fr                                       # embedded, CPU
Args:     data=wmt14|wmt17|cldr|algorithmic (default cldr), lang=de|fr|es|it|pt|nl|ru|ja (cldr),
          task=copy|reverse|sort (algorithmic), size=tiny|small|medium|base|large,
          position=sinusoidal|learned|rope|t5|alibi|none, steps=N, runlocal.
Hardware: wmt14, size=base: a v5litepod-8 (or v4-8) TPU VM, batch 256 x 128 SentencePiece
          tokens each side, 100k steps: about 6 hours (estimate). cldr, size=small: a 2-core CPU,
          3,000 steps of 32 pairs x 64 bytes, ~20 min. algorithmic: ~10 min on a CPU.
Expected: wmt14 base: BLEU ~24-27 on newstest (the Transformer-base range, sacreBLEU on our
          detokenized decode; an estimate, not measured here).
          cldr en->de small: chrF ~35-55, BLEU ~5-20: ~1,300 short names is little data, the
          model learns spellings and shared words (Deutschland, Euro) first.
          algorithmic/reverse: token accuracy > 0.99 (a model that stays below is broken).
          runlocal: a seconds-long smoke run on cldr_translate/en_de (BLEU near 0).
Metrics:  loss, accuracy (teacher-forced), bleu and chrf (greedy decoding of train.bleu_batches
          eval batches).
"""

import ml_collections

from experiments import common, presets

SWEEP_METRIC = "chrf"
_REMOTE = {"wmt14": "wmt14", "wmt17": "wmt17"}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, data="cldr", lang="de", task="reverse", size="small",
                          position="sinusoidal", steps=0, runlocal=False)
  config = common.base_config()
  config.model.kind = "encoder_decoder"
  config.model.position = args.position
  config.model.dropout_rate = 0.1
  presets.set_size(config, args.size)
  data = "cldr" if args.runlocal else args.data
  remote = data in _REMOTE
  if remote:
    presets.set_text_data(config, _REMOTE[data])
    config.data.seq_len = 128
  elif data == "cldr":
    config.data.name = f"cldr_translate/en_{args.lang}"
    config.data.tokenizer = "byte"
    config.model.vocab_size = presets.BYTE_VOCAB
    config.data.seq_len = 64
  elif data == "algorithmic":
    config.data.name = f"algorithmic/{args.task}"
    config.data.tokenizer = "ids"
    config.model.vocab_size = 19  # 16 symbols + pad / bos / eos
    config.data.seq_len = 40  # lengths 4-32, plus eos
  else:
    raise ValueError(f"Unknown data {data!r}; valid: algorithmic, cldr, wmt14, wmt17.")
  config.data.pack = remote  # Short pairs: packing pays off only on WMT's volume.

  config.optim.update(name="adamw", learning_rate=1e-3 if remote else 2e-3, weight_decay=0.01,
                      warmup_steps=4000 if remote else 200, schedule="inverse_sqrt" if remote
                      else "cosine", end_lr_factor=0.0)
  config.train.update(num_steps=100_000 if remote else 3_000, batch_size=256 if remote else 32,
                      eval_every=5_000 if remote else 500, eval_steps=20,
                      checkpoint_every=5_000 if remote else 500, log_every=100 if remote else 50,
                      bleu_batches=4 if remote else 2, best_metric="chrf", best_mode="max")
  presets.set_steps(config, args.steps)
  if args.runlocal:
    common.runlocal(config)
    presets.runlocal_steps(config)
    config.model.dropout_rate = 0.0
  presets.fit_lengths(config)
  return config
