"""Tests of attn/layers/feedforward.py against the NumPy formulas of each kind."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.layers import feedforward

B, T, D, F = 2, 3, 8, 12

_erf = np.vectorize(math.erf)


def _np_gelu(x: np.ndarray) -> np.ndarray:
  return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _np_silu(x: np.ndarray) -> np.ndarray:
  return x / (1.0 + np.exp(-x))


def _np_ffn(kind: str, p: dict, x: np.ndarray) -> np.ndarray:
  """The textbook formulas in float64; biases only where the params hold them."""

  def dense(name: str, h: np.ndarray) -> np.ndarray:
    out = h @ np.asarray(p[name]["kernel"], np.float64)
    return out + np.asarray(p[name]["bias"], np.float64) if "bias" in p[name] else out

  x = x.astype(np.float64)
  if kind == "relu":
    h = np.maximum(dense("wi", x), 0.0)
  elif kind == "gelu":
    h = _np_gelu(dense("wi", x))
  elif kind == "swiglu":
    h = _np_silu(dense("wi_gate", x)) * dense("wi_up", x)
  elif kind == "geglu":
    h = _np_gelu(dense("wi_gate", x)) * dense("wi_up", x)
  return dense("wo", h)


def _x() -> np.ndarray:
  return np.random.default_rng(0).normal(size=(B, T, D)).astype(np.float32)


@pytest.mark.parametrize("use_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("kind", ["relu", "gelu", "swiglu", "geglu"])
def test_kinds_match_numpy(kind, use_bias):
  module = feedforward.FeedForward(hidden_dim=F, kind=kind, use_bias=use_bias)
  variables = module.init(jax.random.key(0), _x())
  params = nn.unbox(variables)["params"]
  if use_bias:
    # Non-zero biases, so that they are tested too.
    params = jax.tree.map(lambda v: v + 0.1 if v.ndim == 1 else v, params)
  got = jax.jit(module.apply)({"params": params}, _x())
  assert got.shape == (B, T, D)
  np.testing.assert_allclose(got, _np_ffn(kind, params, _x()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["relu", "swiglu"])
def test_params_logical_axes_and_sizes(kind):
  module = feedforward.FeedForward(hidden_dim=F, kind=kind)
  variables = module.init(jax.random.key(0), _x())
  specs = jax.tree.map(tuple, nn.get_partition_spec(variables)["params"])
  shapes = jax.tree.map(jnp.shape, nn.unbox(variables)["params"])
  inputs = ["wi_gate", "wi_up"] if kind == "swiglu" else ["wi"]
  assert set(specs) == {*inputs, "wo"}
  for name in inputs:
    assert specs[name] == {"kernel": ("embed", "mlp"), "bias": ("mlp",)}
    assert shapes[name] == {"kernel": (D, F), "bias": (F,)}
  assert specs["wo"] == {"kernel": ("mlp", "embed"), "bias": ("embed",)}
  assert shapes["wo"] == {"kernel": (F, D), "bias": (D,)}


def test_dtype_and_param_dtype():
  module = feedforward.FeedForward(hidden_dim=F, kind="geglu", dtype=jnp.bfloat16)
  variables = module.init(jax.random.key(0), _x())
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nn.unbox(variables)))
  assert module.apply(variables, _x()).dtype == jnp.bfloat16
  half = feedforward.FeedForward(hidden_dim=F, param_dtype=jnp.bfloat16)
  assert all(
    p.dtype == jnp.bfloat16 for p in jax.tree.leaves(nn.unbox(half.init(jax.random.key(0), _x())))
  )


def test_dropout_only_when_not_deterministic():
  module = feedforward.FeedForward(hidden_dim=F, kind="relu", dropout_rate=0.5)
  variables = module.init(jax.random.key(0), _x())
  plain = feedforward.FeedForward(hidden_dim=F, kind="relu")
  np.testing.assert_array_equal(module.apply(variables, _x()), plain.apply(variables, _x()))
  rngs = {"dropout": jax.random.key(1)}
  dropped = module.apply(variables, _x(), deterministic=False, rngs=rngs)
  assert not np.allclose(dropped, plain.apply(variables, _x()))
  again = module.apply(variables, _x(), deterministic=False, rngs=rngs)
  np.testing.assert_array_equal(dropped, again)  # same key, same mask


def test_unknown_kind_lists_valid_ones():
  with pytest.raises(ValueError, match=r"model.ffn='swish' is not one of \[.*'geglu'"):
    feedforward.FeedForward(hidden_dim=F, kind="swish")
