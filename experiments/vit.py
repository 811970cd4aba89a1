"""Vision Transformer classification: CIFAR-10 / ImageNet remotely, 8x8 digits locally.

Command:  python -m experiments.main --config experiments/vit.py:data=cifar10 \
              --workdir runs/vit_cifar10 --config.data.data_dir=gs://BUCKET/tensorflow_datasets
          python -m experiments.main --config experiments/vit.py --workdir runs/vit_digits
Args:     data=digits|cifar10|imagenet2012 (default digits), size=tiny|small|medium|base|large,
          patch=N (default 2 for digits, 4 for cifar10, 16 for imagenet2012),
          position=learned|sinusoidal|none, pooling=cls|mean|attention, steps=N, runlocal.
Hardware: digits, size=tiny: a 2-core CPU, 1,500 steps of 64 images (16 patches), ~3 min.
          cifar10, size=small: one GPU or a v5litepod-8 host, 40k steps of 128 (64 patches),
          ~1 hour (estimate). imagenet2012 (224 px, patch 16, size=base): a v4-32 / v5p pod slice,
          days; it needs images resized to 224 x 224, which the attn.data pipeline does not do
          yet (the trainer refuses a variable image size with a ConfigError naming it).
Expected: digits: test accuracy ~0.93-0.98 (1,797 images; a linear model gets ~0.95).
          cifar10 small from scratch, no augmentation: ~0.70-0.78 (ViTs need augmentation or
          pre-training to pass ~0.80 here); estimates, not measured here.
          runlocal: a seconds-long smoke run on digits (accuracy well above 0.1 after 4 steps
          is luck, not learning).
"""

import ml_collections

from experiments import common, presets

SWEEP_METRIC = "accuracy"
# data -> (image size, channels, classes, default patch)
_DATA = {"digits": (8, 1, 10, 2), "cifar10": (32, 3, 10, 4), "imagenet2012": (224, 3, 1000, 16)}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, data="digits", size="tiny", patch=0, position="learned",
                          pooling="cls", steps=0, runlocal=False)
  config = common.base_config()
  data = "digits" if args.runlocal else args.data
  image, channels, classes, patch = presets.choose("data", data, _DATA)
  config.data.name = data
  config.data.pack = False
  config.model.update(kind="vit", image_size=image, channels=channels, num_classes=classes,
                      patch_size=args.patch or patch, position=args.position,
                      pooling=args.pooling, dropout_rate=0.1 if data != "digits" else 0.0)
  presets.set_size(config, args.size)
  config.model.max_len = (image // config.model.patch_size) ** 2 + 1  # patches + [CLS]

  config.optim.update(name="adamw", learning_rate=1e-3 if data == "digits" else 3e-4,
                      weight_decay=0.05, warmup_steps=100 if data == "digits" else 2_000,
                      schedule="cosine", end_lr_factor=0.0)
  steps = {"digits": 1_500, "cifar10": 40_000, "imagenet2012": 300_000}[data]
  config.train.update(num_steps=steps, batch_size={"digits": 64, "cifar10": 128}.get(data, 1024),
                      eval_every=steps // 5, eval_steps=0 if data != "imagenet2012" else 50,
                      checkpoint_every=steps // 5, log_every=50, best_metric="accuracy",
                      best_mode="max")
  presets.set_steps(config, args.steps)
  if args.runlocal:
    common.runlocal(config)
    presets.runlocal_steps(config)
  return config
