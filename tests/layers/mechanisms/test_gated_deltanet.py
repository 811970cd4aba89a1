"""The Gated DeltaNet layer: a NumPy recomputation from its parameters, decoding, packing, bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.layers.mechanisms.gated_deltanet import GatedDeltaNet
from tests.layers import mechanism_checks as checks
from tests.ops.test_gated_deltanet import reference

N, H = 4, 8


def _layer(**kwargs):
  return GatedDeltaNet(num_heads=N, head_dim=H, use_bias=False, chunk_size=4, **kwargs)


def _numpy_layer(p, x, *, decay: bool, conv_size: int = 4):
  """The paper's layer in float64: conv + SiLU on q, k, v, beta, alpha, the recurrence, the
  gated per-head RMSNorm and the output projection."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  x = np.asarray(x, np.float64)
  b, t, _ = x.shape
  qkv = np.concatenate([np.einsum("btd,dnh->btnh", x, p[name]["kernel"]).reshape(b, t, -1)
                        for name in ("query", "key", "value")], axis=-1)
  padded = np.pad(qkv, ((0, 0), (conv_size - 1, 0), (0, 0)))
  conv = sum(padded[:, j:j + t] * p["conv"][j] for j in range(conv_size))
  conv = conv / (1 + np.exp(-conv))
  q, k, v = (conv[..., i * N * H:(i + 1) * N * H].reshape(b, t, N, H) for i in range(3))
  beta = 1 / (1 + np.exp(-np.einsum("btd,dn->btn", x, p["beta"]["kernel"])))
  log_alpha = None
  if decay:
    dt = np.log1p(np.exp(np.einsum("btd,dn->btn", x, p["alpha"]["kernel"]) + p["dt_bias"]))
    log_alpha = -np.exp(p["A_log"]) * dt
  o, _ = reference(q, k, v, beta, log_alpha, scale=H**-0.5)
  o = o / np.sqrt(np.mean(o**2, axis=-1, keepdims=True) + 1e-5) * p["norm_scale"]
  gate = np.einsum("btd,dnh->btnh", x, p["gate"]["kernel"])
  o = o * gate / (1 + np.exp(-gate))
  return np.einsum("btnh,nhd->btd", o, p["out"]["kernel"])


@pytest.mark.parametrize("decay", [True, False], ids=["gated", "deltanet"])
def test_matches_the_float64_layer_recomputed_from_its_parameters(decay):
  layer = _layer(decay=decay)
  x = checks.inputs(0)
  params = checks.init(layer, x)
  assert ("A_log" in params) == decay
  out = jax.jit(lambda p, x: layer.apply({"params": p}, x, is_causal=True))(params, x)
  np.testing.assert_allclose(out, _numpy_layer(params, x, decay=decay), atol=2e-5, rtol=1e-4)


def test_recurrent_decoding_equals_the_chunkwise_forward():
  checks.check_decoding_matches_full_forward(_layer())


def test_packed_segments_restart_the_state_and_the_convolution():
  checks.check_packed_matches_separate(_layer())


def test_bfloat16_compute_keeps_float32_state_and_statistics():
  layer = _layer()
  x = checks.inputs(3)
  params = checks.init(layer, x)
  expected = jax.jit(lambda p, x: layer.apply({"params": p}, x, is_causal=True))(params, x)
  bf16 = layer.clone(dtype=jnp.bfloat16)
  out = jax.jit(lambda p, x: bf16.apply({"params": p}, x, is_causal=True))(
      params, x.astype(jnp.bfloat16))
  assert out.dtype == jnp.bfloat16
  # bf16 keeps ~3 digits; a per-head RMSNorm of a small output magnifies some errors.
  error = np.abs(np.asarray(out, np.float32) - expected)
  assert error.mean() < 0.03 * np.abs(expected).mean() and error.max() < 0.2
  decoder = layer.clone(decode=True, dtype=jnp.bfloat16)
  cache = jax.eval_shape(decoder.init, jax.random.key(0), x)["cache"]
  assert cache["state"].dtype == jnp.float32
