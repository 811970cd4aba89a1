"""Position-wise feed-forward block: ReLU, GELU and the GLU variants SwiGLU and GeGLU.

Plain kinds (Vaswani et al. 2017; Hendrycks & Gimpel 2016 for GELU):
  FFN(x) = act(x W_in + b_in) W_out + b_out
GLU kinds (Shazeer 2020, "GLU Variants Improve Transformer"):
  FFN(x) = (act(x W_gate) * (x W_up)) W_out, act = Swish_1 (SwiGLU) or GELU (GeGLU)
The GLU kinds have three matrices instead of two; to match a plain FFN's parameter count at the
same width, Shazeer shrinks the hidden size to 2/3 of it. That choice is the caller's:
`hidden_dim` is taken as given.

Dropout (if any) is applied to the hidden activation, as in T5; dropout on the block's output
belongs to the residual connection around it.

Shape letters:
  B: batch   T: sequence length   D: model width   F: hidden (mlp) width
"""

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn.errors import check_choice

__all__ = ["FFN_KINDS", "FeedForward"]

Dtype = jnp.dtype | type
Initializer = jax.nn.initializers.Initializer


def _gelu(x: jax.Array) -> jax.Array:
  # The exact (erf) GELU of the paper, not the tanh approximation that jax.nn.gelu defaults to.
  return jax.nn.gelu(x, approximate=False)


# Name -> (activation, gated). Gated kinds multiply the activation by a second projection.
FFN_KINDS: dict[str, tuple[Callable[[jax.Array], jax.Array], bool]] = {
  "relu": (jax.nn.relu, False),
  "gelu": (_gelu, False),
  "swiglu": (jax.nn.silu, True),
  "geglu": (_gelu, True),
}


class FeedForward(nn.Module):
  """Feed-forward block applied to each token; output width equals the input's.

  Attributes:
    hidden_dim: F, the hidden (mlp) width.
    kind: one of FFN_KINDS: "relu", "gelu", "swiglu", "geglu".
    use_bias: biases on the projections (T5 v1.1 and LLaMA use none).
    dropout_rate: dropout on the hidden activation.
    dtype: computation dtype (None: promoted from inputs and params, as in nn.Dense).
    param_dtype: dtype of the weights.
    kernel_init: initializer of the weight matrices.
    bias_init: initializer of the biases.
  """

  hidden_dim: int
  kind: str = "relu"
  use_bias: bool = True
  dropout_rate: float = 0.0
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros

  def __post_init__(self) -> None:
    # Fail at construction, where the config is built, rather than at the first trace.
    check_choice("model.ffn", self.kind, FFN_KINDS)
    super().__post_init__()

  def _dense(self, features: int, axes: tuple[str, str], name: str) -> nn.Dense:
    return nn.Dense(
      features,
      use_bias=self.use_bias,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=nn.with_logical_partitioning(self.kernel_init, axes),
      bias_init=nn.with_logical_partitioning(self.bias_init, axes[1:]),
      name=name,
    )

  @nn.compact
  def __call__(self, x_BTD: jax.Array, *, deterministic: bool = True) -> jax.Array:
    """Returns FFN(x) [B, T, D]; deterministic=False enables dropout (needs a 'dropout' rng)."""
    activation, gated = FFN_KINDS[self.kind]
    features = x_BTD.shape[-1]
    if gated:
      gate_BTF = self._dense(self.hidden_dim, ("embed", "mlp"), "wi_gate")(x_BTD)
      up_BTF = self._dense(self.hidden_dim, ("embed", "mlp"), "wi_up")(x_BTD)
      h_BTF = activation(gate_BTF) * up_BTF
    else:
      h_BTF = activation(self._dense(self.hidden_dim, ("embed", "mlp"), "wi")(x_BTD))
    h_BTF = nn.Dropout(rate=self.dropout_rate)(h_BTF, deterministic=deterministic)
    return self._dense(features, ("mlp", "embed"), "wo")(h_BTF)
