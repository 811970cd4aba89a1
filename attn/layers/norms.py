"""Normalization layers with one call signature, picked by name with `make_norm`.

Every norm is called as `norm(x, *, mask=None, deterministic=True)` so a model switches kinds
from the config alone. LayerNorm and RMSNorm are per-token and ignore both keywords; BatchNorm
needs them: the mask keeps padding out of its statistics, and `deterministic` selects the
running averages (eval) instead of the batch statistics (train).

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

__all__ = ["NORMS", "BatchNorm", "LayerNorm", "RMSNorm", "make_norm"]

Dtype = jnp.dtype | type


def _output_dtype(dtype: Dtype | None, x: jax.Array) -> Any:
  return dtype if dtype is not None else x.dtype


def _over_features(v_D: jax.Array, ndim: int) -> jax.Array:
  """Reshapes a per-feature [D] vector to broadcast against an ndim array (no rank promotion)."""
  return v_D.astype(jnp.float32).reshape((1,) * (ndim - 1) + v_D.shape)


def _scale_and_shift(module: nn.Module, y: jax.Array, *, use_scale: bool,
                     use_bias: bool) -> jax.Array:
  """y * scale + bias with learned per-feature parameters (axis "embed"), in float32."""
  features = y.shape[-1]
  if use_scale:
    scale = module.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                         (features,), module.param_dtype)
    y = y * _over_features(scale, y.ndim)
  if use_bias:
    bias = module.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                        (features,), module.param_dtype)
    y = y + _over_features(bias, y.ndim)
  return y


class LayerNorm(nn.Module):
  """Layer normalization (Ba et al. 2016) over the last axis.

  Attributes:
    epsilon: added to the variance.
    use_bias: learn an additive bias.
    use_scale: learn a multiplicative scale.
    dtype: output dtype (None: the input's).
    param_dtype: dtype of scale and bias.
  """

  epsilon: float = 1e-6
  use_bias: bool = True
  use_scale: bool = True
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self, x: jax.Array, *, mask: jax.Array | None = None, deterministic: bool = True
  ) -> jax.Array:
    """Normalizes each token of x [..., D]; mask and deterministic are unused (per-token norm)."""
    del mask, deterministic
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    # Two-pass variance: E[x^2] - E[x]^2 cancels catastrophically when |mean| >> std.
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
    return _scale_and_shift(self, y, use_scale=self.use_scale, use_bias=self.use_bias).astype(
      _output_dtype(self.dtype, x)
    )


class RMSNorm(nn.Module):
  """Root-mean-square normalization (Zhang & Sennrich 2019): no centering, no bias.

  Attributes:
    epsilon: added to the mean square.
    use_scale: learn a multiplicative scale.
    dtype: output dtype (None: the input's).
    param_dtype: dtype of the scale.
  """

  epsilon: float = 1e-6
  use_scale: bool = True
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self, x: jax.Array, *, mask: jax.Array | None = None, deterministic: bool = True
  ) -> jax.Array:
    """Normalizes each token of x [..., D]; mask and deterministic are unused (per-token norm)."""
    del mask, deterministic
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
    y = _scale_and_shift(self, y, use_scale=self.use_scale, use_bias=False)
    return y.astype(_output_dtype(self.dtype, x))


class BatchNorm(nn.Module):
  """Batch normalization (Ioffe & Szegedy 2015) of token sequences, padding excluded.

  In training the mean and (biased) variance of each feature are taken over all non-padding
  tokens of the batch, i.e. over (batch, sequence) where mask is True, and the running averages
  in the `batch_stats` collection move toward them:
  running = momentum * running + (1 - momentum) * batch. In eval the running averages are used.
  Padding tokens are normalized too (with the same statistics) but never contribute to them,
  so their values cannot change any real token's output or the running averages. A batch with
  no real token leaves the running averages unchanged.

  Under jit with a sharded batch the sums are global, so no cross-device axis name is needed.

  Attributes:
    momentum: decay of the running averages.
    epsilon: added to the variance.
    use_bias: learn an additive bias.
    use_scale: learn a multiplicative scale.
    use_running_average: if set, overrides the call's `deterministic` (True: eval mode).
    dtype: output dtype (None: the input's).
    param_dtype: dtype of scale and bias (running averages are always float32).
  """

  momentum: float = 0.99
  epsilon: float = 1e-5
  use_bias: bool = True
  use_scale: bool = True
  use_running_average: bool | None = None
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self, x: jax.Array, *, mask: jax.Array | None = None, deterministic: bool = True
  ) -> jax.Array:
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
      deterministic if self.use_running_average is None else self.use_running_average
    )
    features = x.shape[-1]
    x32 = x.astype(jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))

    if use_running_average:
      mean_D, var_D = ra_mean.value, ra_var.value
    else:
      if mask is None:
        mask = jnp.ones(x.shape[:-1], jnp.bool_)
      if mask.shape != x.shape[:-1]:
        raise ValueError(
          f"BatchNorm: mask shape {mask.shape} must equal x.shape[:-1] = {x.shape[:-1]}."
        )
      mask_ = mask.astype(jnp.bool_)[..., None]
      reduce_axes = tuple(range(x.ndim - 1))
      count = jnp.sum(mask_.astype(jnp.float32))
      # where, not multiply: padding may hold inf or NaN, and 0 * inf is NaN.
      mean_D = jnp.sum(jnp.where(mask_, x32, 0.0), axis=reduce_axes) / jnp.maximum(count, 1.0)
      centered = jnp.where(mask_, x32 - _over_features(mean_D, x.ndim), 0.0)
      var_D = jnp.sum(jnp.square(centered), axis=reduce_axes) / jnp.maximum(count, 1.0)
      # Init runs a training-mode call only to create the variables; it must not count as a step.
      if not self.is_initializing():
        has_tokens = count > 0
        m = self.momentum
        ra_mean.value = jnp.where(has_tokens, m * ra_mean.value + (1 - m) * mean_D, ra_mean.value)
        ra_var.value = jnp.where(has_tokens, m * ra_var.value + (1 - m) * var_D, ra_var.value)

    y = (x32 - _over_features(mean_D, x.ndim)) * _over_features(
      jax.lax.rsqrt(var_D + self.epsilon), x.ndim
    )
    return _scale_and_shift(self, y, use_scale=self.use_scale, use_bias=self.use_bias).astype(
      _output_dtype(self.dtype, x)
    )


NORMS: dict[str, type[nn.Module]] = {
  "layernorm": LayerNorm,
  "rmsnorm": RMSNorm,
  "batchnorm": BatchNorm,
}


def make_norm(kind: str, **kwargs: Any) -> nn.Module:
  """Builds the norm named `kind` (a key of NORMS) with the given attributes."""
  if kind not in NORMS:
    raise ValueError(f"Unknown norm kind {kind!r}; valid kinds: {', '.join(sorted(NORMS))}.")
  return NORMS[kind](**kwargs)
