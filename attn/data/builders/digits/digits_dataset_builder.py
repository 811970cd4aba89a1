"""digits: the real 8x8 handwritten digits that scikit-learn ships (UCI optdigits test set).

What it is: 1,797 grayscale images of the digits 0-9 written by 43 people, downsampled by UCI to
8x8 with 17 intensity levels (0-16). scikit-learn ships them inside its wheel, so no download.
A small but genuine vision task for ViT smoke runs: logistic regression on the raw pixels
reaches ~98% on the test split, so a ViT that does much worse is broken.

Features: `image` uint8 [8, 8, 1] (the 0-16 levels scaled to 0-255) and `label` (0-9).
Splits: `test` = every 6th image in the shipped order (300), `train` = the rest (1,497).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds


def load_digits() -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [N, 8, 8, 1] in 0-255, labels int64 [N]) from scikit-learn's copy."""
  from sklearn.datasets import load_digits as sk_load_digits  # Heavy import: only when building.

  bunch = sk_load_digits()
  images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  return images, bunch.target.astype(np.int64)


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 digits as a TFDS dataset."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      description=__doc__,
      # Tensor, not Image: encoding an Image feature needs TensorFlow.
      features=tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
        "label": tfds.features.ClassLabel(num_classes=10),
      }),
      supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Shipped with scikit-learn: nothing to download.
    images, labels = load_digits()
    test = np.arange(len(labels)) % 6 == 0
    return {"train": self._generate_examples(images[~test], labels[~test]),
            "test": self._generate_examples(images[test], labels[test])}

  def _generate_examples(self, images: np.ndarray, labels: np.ndarray) -> Iterator[tuple]:
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
      yield i, {"image": image, "label": int(label)}
