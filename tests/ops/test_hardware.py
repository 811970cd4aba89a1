"""The hardware kernels against the float64 oracle, where the hardware is.

cuDNN and the Pallas Triton kernel on NVIDIA GPUs, the splash kernel on TPUs: forward and
gradients in bfloat16 at head_dim 128 with GQA. Skipped where the backend is absent (CI has no
accelerator); there the same kernels run in Pallas interpret mode (test_pallas.py,
test_splash.py) and the cuDNN routing runs against a simulated GPU (test_attention.py).
Run on a GPU host or TPU VM with `pytest tests/ops/test_hardware.py`.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.ops import dispatch, dot_product_attention
from tests import np_reference

B, T, N, K, H = 2, 256, 4, 2, 128
BF16_TOLERANCE = 3e-2  # relative to the largest reference magnitude, as in test_attention.py

ON_NVIDIA_GPU = dispatch.is_nvidia_gpu()
ON_TPU = dispatch.is_tpu()


def _case(name: str) -> tuple[dict, np.ndarray]:
  """(keywords for dot_product_attention, the same mask as a NumPy predicate [B, 1, T, T])."""
  i, j = np_reference.positions(T, T)
  lengths = np.array([T, 100])
  seg = np.repeat([[1, 2, 3], [1, 1, 2]], [100, 100, 56], axis=1)
  cases = {
      "causal": ({"is_causal": True}, j <= i),
      "causal_window": ({"is_causal": True, "local_window_size": (64, 0)},
                        (j <= i) & (i - j <= 64)),
      "kv_lengths": ({"key_value_seq_lengths": lengths},
                     j[None] < lengths[:, None, None]),
      "causal_kv_lengths": ({"is_causal": True, "key_value_seq_lengths": lengths},
                            (j <= i)[None] & (j[None] < lengths[:, None, None])),
      "causal_segments": ({"is_causal": True, "segment_ids": seg},
                          (j <= i)[None] & (seg[:, :, None] == seg[:, None, :])),
  }
  kwargs, mask = cases[name]
  mask = np.broadcast_to(mask, (B, T, T))[:, None]
  return {key: jnp.asarray(x) if isinstance(x, np.ndarray) else x
          for key, x in kwargs.items()}, mask


def _check_against_oracle(implementation: str, name: str) -> None:
  kwargs, mask = _case(name)
  rng = np.random.default_rng(0)
  q = rng.normal(size=(B, T, N, H))
  k, v = rng.normal(size=(B, T, K, H)), rng.normal(size=(B, T, K, H))
  dout = rng.normal(size=(B, T, N, H))
  out, vjp = jax.vjp(
      lambda q, k, v: dot_product_attention(q, k, v, implementation=implementation, **kwargs),
      *(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)))
  grads = vjp(jnp.asarray(dout, jnp.bfloat16))
  # The oracle sees the inputs rounded to bfloat16, as the kernel does.
  rounded = [np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64) for x in (q, k, v, dout)]
  expected, _, expected_grads = np_reference.attention(*rounded[:3], mask=mask,
                                                       dout=rounded[3])
  for got, want in zip((out, *grads), (expected, *expected_grads), strict=True):
    got = np.asarray(got, np.float64)
    assert np.max(np.abs(got - want)) <= BF16_TOLERANCE * np.max(np.abs(want)), name


@pytest.mark.skipif(not ON_NVIDIA_GPU, reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("name", ["causal", "causal_window", "kv_lengths", "causal_kv_lengths"])
def test_cudnn_matches_float64_oracle(name):
  _check_against_oracle("cudnn", name)


@pytest.mark.skipif(not ON_NVIDIA_GPU, reason="needs an NVIDIA GPU")
def test_packed_segments_never_reach_cudnn_and_stay_correct():
  kwargs, _ = _case("causal_segments")
  q = jax.ShapeDtypeStruct((B, T, N, H), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((B, T, K, H), jnp.bfloat16)
  # Auto takes the Triton kernel there (bfloat16, head_dim 128): the check below covers it.
  assert dispatch.choose_implementation(None, query=q, key=k, value=k, **kwargs) == "pallas"
  _check_against_oracle(None, "causal_segments")


@pytest.mark.skipif(not ON_NVIDIA_GPU, reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("name", ["causal", "causal_segments"])
def test_pallas_gpu_kernel_matches_float64_oracle(name):
  _check_against_oracle("pallas", name)


@pytest.mark.skipif(not ON_TPU, reason="needs a TPU")
@pytest.mark.parametrize("name", ["causal", "causal_window", "kv_lengths", "causal_kv_lengths",
                                  "causal_segments"])
def test_splash_matches_float64_oracle(name):
  _check_against_oracle("pallas", name)


# The harness itself, on any backend: our xla path passes every case, and a kernel that ignored
# part of the mask would fail it.
@pytest.mark.parametrize("name", ["causal", "causal_window", "kv_lengths", "causal_kv_lengths",
                                  "causal_segments"])
def test_harness_passes_the_xla_path(name):
  _check_against_oracle("xla", name)


def test_harness_catches_a_kernel_that_ignores_the_window(monkeypatch):
  original = _case

  def window_dropped(name):
    kwargs, mask = original(name)
    kwargs.pop("local_window_size")
    return kwargs, mask

  monkeypatch.setattr(sys.modules[__name__], "_case", window_dropped)
  with pytest.raises(AssertionError, match="causal_window"):
    _check_against_oracle("xla", "causal_window")
