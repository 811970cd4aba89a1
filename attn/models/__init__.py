"""Models built from a validated ModelConfig: `build(ModelConfig.from_config(config.model))`."""

import flax.linen as nn
import jax

from attn.models.config import ModelConfig, default_config
from attn.models.models import (
    EncoderDecoder,
    LanguageModel,
    SequenceClassifier,
    ViT,
)

MODELS: dict[str, type[nn.Module]] = {
    "lm": LanguageModel,
    "encoder_decoder": EncoderDecoder,
    "classifier": SequenceClassifier,
    "vit": ViT,
}


def build(config: ModelConfig, *, decode: bool = False) -> nn.Module:
  """The model named by `config.kind`; `decode=True` gives the KV-cache variant (lm and
  encoder_decoder only)."""
  model_cls = MODELS[config.kind]
  if decode:
    if config.kind not in ("lm", "encoder_decoder"):
      raise ValueError(f"decode=True needs model.kind 'lm' or 'encoder_decoder', got "
                       f"{config.kind!r}.")
    return model_cls(config, decode=True)
  return model_cls(config)


def count_params(params) -> int:
  """Number of scalars in a parameter tree (boxed or not)."""
  return sum(x.size for x in jax.tree.leaves(nn.meta.unbox(params)))


__all__ = [
    "MODELS",
    "EncoderDecoder",
    "LanguageModel",
    "ModelConfig",
    "SequenceClassifier",
    "ViT",
    "build",
    "count_params",
    "default_config",
]
