"""Normalization layers with one call signature, picked by name with `make_norm`.

Every norm is called as `norm(x, *, mask=None, deterministic=True)` so a model switches kinds
from the config alone. LayerNorm and RMSNorm are per-token and ignore both keywords; BatchNorm
needs them: the mask keeps padding out of its statistics, and `deterministic` selects the
running averages (eval) instead of the batch statistics (train).

These are flax's `nn.LayerNorm`, `nn.RMSNorm` and `nn.BatchNorm(mask=...)` with our defaults.
Statistics are computed in float32 whatever the input dtype; the output has `dtype` (default:
the input's dtype).

BatchNorm caveat for causal models: in training, the statistics of a batch mix all positions,
so a token's output depends slightly on later tokens of the batch. That is inherent to batch
normalization of sequences (Shen et al. 2020, "PowerNorm", discuss it); it is offered for
ablations, not as a default for language models.

Shape letters:
  B: batch   T: sequence length   D: features (normalized axis, last)
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn.errors import check_choice

__all__ = ["NORMS", "BatchNorm", "LayerNorm", "RMSNorm", "make_norm"]

# Scale and bias carry the logical axis "embed", as every other parameter of the model does.
_SCALE_INIT = nn.with_logical_partitioning(nn.initializers.ones, ("embed",))
_BIAS_INIT = nn.with_logical_partitioning(nn.initializers.zeros, ("embed",))


def _in_dtype(module: nn.Module, x: jax.Array, y: jax.Array) -> jax.Array:
  """flax's result (float32 when dtype is None) cast to `dtype`, by default the input's."""
  return y.astype(module.dtype if module.dtype is not None else x.dtype)


# Subclasses, not wrappers, so the parameters keep their names: {"scale", "bias"} directly under
# the norm, as before flax's modules were used (old checkpoints load unchanged).
class LayerNorm(nn.LayerNorm):
  """flax's LayerNorm (Ba et al. 2016) over the last axis, in float32, two-pass variance.

  `use_fast_variance=False`: E[x^2] - E[x]^2 cancels catastrophically when |mean| >> std.
  """

  epsilon: float = 1e-6
  use_fast_variance: bool = False
  scale_init: Any = _SCALE_INIT
  bias_init: Any = _BIAS_INIT

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None,  # type: ignore[override]
               deterministic: bool = True) -> jax.Array:
    """Normalizes each token of x [..., D]; mask and deterministic are unused (per-token norm)."""
    del mask, deterministic
    return _in_dtype(self, x, super().__call__(x))


class RMSNorm(nn.RMSNorm):
  """flax's RMSNorm (Zhang & Sennrich 2019): no centering, no bias; statistics in float32."""

  epsilon: float = 1e-6
  scale_init: Any = _SCALE_INIT

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None,  # type: ignore[override]
               deterministic: bool = True) -> jax.Array:
    """Normalizes each token of x [..., D]; mask and deterministic are unused (per-token norm)."""
    del mask, deterministic
    return _in_dtype(self, x, super().__call__(x))


class BatchNorm(nn.BatchNorm):
  """flax's BatchNorm (Ioffe & Szegedy 2015) of token sequences, padding excluded.

  In training the mean and (biased) variance of each feature are taken over all non-padding
  tokens of the batch, i.e. over (batch, sequence) where mask is True, and the running averages
  in the `batch_stats` collection move toward them:
  running = momentum * running + (1 - momentum) * batch. In eval the running averages are used.
  Padding tokens are normalized too (with the same statistics) but never contribute to them,
  so their values cannot change any real token's output or the running averages. A batch with
  no real token leaves the running averages unchanged.

  Under jit with a sharded batch the sums are global, so no cross-device axis name is needed.
  `use_running_average`, if set, overrides the call's `deterministic` (True: eval mode).
  """

  momentum: float = 0.99
  epsilon: float = 1e-5
  use_fast_variance: bool = False
  scale_init: Any = _SCALE_INIT
  bias_init: Any = _BIAS_INIT

  def __call__(self, x: jax.Array, *, mask: jax.Array | None = None,  # type: ignore[override]
               deterministic: bool = True) -> jax.Array:
    """Normalizes x [B, T, D] with statistics over the tokens where mask [B, T] is True.

    Args:
      x: activations [B, T, D] (any leading axes; the last is normalized).
      mask: True on real tokens, shape x.shape[:-1]; None means every token is real.
      deterministic: True uses the running averages (eval), False the batch statistics and
        updates the running averages (train; `batch_stats` must be mutable).

    Returns:
      normalized array of x's shape.
    """
    use_running_average = (
      deterministic if self.use_running_average is None else self.use_running_average)
    # flax refuses the flag at call time when the attribute is set.
    call_flag = None if self.use_running_average is not None else use_running_average
    if use_running_average or mask is None:
      return _in_dtype(self, x, super().__call__(x, use_running_average=call_flag))
    if mask.shape != x.shape[:-1]:
      raise ValueError(
        f"BatchNorm: mask shape {mask.shape} must equal x.shape[:-1] = {x.shape[:-1]}.")
    has_tokens = jnp.any(mask)
    before = None
    if self.has_variable("batch_stats", "mean"):
      before = {k: self.get_variable("batch_stats", k) for k in ("mean", "var")}
    # flax's statistics of a batch without a real token are 0/0: take them over every token
    # instead (finite), and below keep the running averages as they were.
    mask_BTD = jnp.broadcast_to(jnp.logical_or(mask, ~has_tokens)[..., None], x.shape)
    y = super().__call__(x, use_running_average=call_flag, mask=mask_BTD)
    if before is not None and not self.is_initializing():
      for k, old in before.items():
        self.put_variable("batch_stats", k,
                          jnp.where(has_tokens, self.get_variable("batch_stats", k), old))
    return _in_dtype(self, x, y)


NORMS: dict[str, type[nn.Module]] = {
  "layernorm": LayerNorm,
  "rmsnorm": RMSNorm,
  "batchnorm": BatchNorm,
}


def make_norm(kind: str, **kwargs: Any) -> nn.Module:
  """Builds the norm named `kind` (a key of NORMS) with the given attributes."""
  check_choice("model.norm", kind, NORMS)
  return NORMS[kind](**kwargs)
