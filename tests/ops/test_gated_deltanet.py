"""The gated delta rule against the paper's recurrence, token by token, in float64 NumPy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn.ops import gated_deltanet as gdn
from tests import np_reference

B, T, N, H, HV = 2, 23, 3, 8, 6
# Restarts at 7, 16 (a chunk boundary for C = 4 and 8) and 20; the tail is a padding segment.
SEGMENTS = np.array([[1] * 7 + [2] * 9 + [3] * 4 + [0] * 3,
                     [5] * 11 + [6] * 12])
# Jitted once per static setting: eager dispatch of the scans costs seconds per call on CPU.
rule = jax.jit(gdn.gated_delta_rule,
               static_argnames=("chunk_size", "scale", "normalize_qk", "return_final_state"))
step = jax.jit(gdn.gated_delta_step)


def _inputs(seed: int = 0, decay: tuple[float, float] = (0.5, 1.0)):
  rng = np.random.default_rng(seed)
  q, k = rng.normal(size=(2, B, T, N, H))
  v = rng.normal(size=(B, T, N, HV))
  beta = rng.uniform(0.05, 0.95, size=(B, T, N))
  log_alpha = np.log(rng.uniform(*decay, size=(B, T, N)))
  return q, k, v, beta, log_alpha


def _f32(*xs):
  return tuple(jnp.asarray(x, jnp.float32) for x in xs)


def reference(q, k, v, beta, log_alpha=None, *, segments=None, lengths=None, scale=1.0,
              state=None):
  """S_t = a_t S_{t-1} + b_t (v_t - a_t S_{t-1} k_t) k_t^T, o_t = S_t q_t, one token at a time.

  S is `[Hv, H]` as in the paper; `state` and the returned final state are M = S^T `[H, Hv]`.
  """
  q, k, v, beta = (np.asarray(x, np.float64) for x in (q, k, v, beta))
  alpha = np.ones_like(beta) if log_alpha is None else np.exp(np.asarray(log_alpha, np.float64))
  out = np.zeros(v.shape)
  final = np.zeros((q.shape[0], q.shape[2], q.shape[3], v.shape[3]))
  for b in range(q.shape[0]):
    for n in range(q.shape[2]):
      s = np.zeros((v.shape[3], q.shape[3])) if state is None else np.array(state[b, n]).T
      for t in range(q.shape[1]):
        if lengths is not None and t >= lengths[b]:
          break
        if segments is not None and t > 0 and segments[b, t] != segments[b, t - 1]:
          s = np.zeros_like(s)
        q_t = q[b, t, n] / np.sqrt(q[b, t, n] @ q[b, t, n] + 1e-6)
        k_t = k[b, t, n] / np.sqrt(k[b, t, n] @ k[b, t, n] + 1e-6)
        a, w = alpha[b, t, n], beta[b, t, n]
        s = a * s + w * np.outer(v[b, t, n] - a * s @ k_t, k_t)
        out[b, t, n] = s @ (q_t * scale)
      final[b, n] = s.T
  return out, final


@pytest.mark.parametrize("chunk, jit, segmented", [
    (8, True, False), (5, False, True), (4, True, True)])
def test_chunkwise_and_recurrence_equal_the_token_by_token_reference(chunk, jit, segmented):
  """Chunks of 4, 5 and 8 (none divides T = 23); restarts inside and on chunk edges."""
  q, k, v, beta, log_alpha = _inputs()
  segments = SEGMENTS if segmented else None
  expected, expected_state = reference(q, k, v, beta, log_alpha, segments=segments, scale=0.7)
  kwargs = dict(segment_ids=None if segments is None else jnp.asarray(segments), scale=0.7,
                return_final_state=True)
  chunked = functools.partial(gdn.gated_delta_rule, chunk_size=chunk, **kwargs)
  recurrent = functools.partial(gdn.gated_delta_recurrent, **kwargs)
  for fn in (chunked, recurrent):
    out, state = (jax.jit(fn) if jit else fn)(*_f32(q, k, v, beta, log_alpha))
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(state, expected_state, atol=2e-5, rtol=1e-5)


def test_alpha_one_is_plain_deltanet_and_strong_decay_stays_accurate():
  q, k, v, beta, log_alpha = _inputs(seed=1, decay=(1e-4, 0.05))  # in-chunk products ~1e-20
  for la in (None, log_alpha):
    expected, _ = reference(q, k, v, beta, la)
    out = rule(*_f32(q, k, v, beta), None if la is None else _f32(la)[0], chunk_size=8)
    np.testing.assert_allclose(out, expected, atol=2e-5, rtol=1e-5)


def test_initial_state_continues_a_split_sequence_and_padding_keeps_the_state():
  """The decoding contract: prefix then continuation from its final state == one call."""
  q, k, v, beta, log_alpha = _f32(*_inputs(seed=2))
  whole, whole_state = rule(q, k, v, beta, log_alpha, chunk_size=4,
                                            return_final_state=True)
  cut = 10
  _, state = rule(q[:, :cut], k[:, :cut], v[:, :cut], beta[:, :cut],
                                  log_alpha[:, :cut], chunk_size=4, return_final_state=True)
  rest, rest_state = rule(q[:, cut:], k[:, cut:], v[:, cut:], beta[:, cut:],
                                          log_alpha[:, cut:], chunk_size=4, initial_state=state,
                                          return_final_state=True)
  np.testing.assert_allclose(rest, whole[:, cut:], atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(rest_state, whole_state, atol=2e-5, rtol=1e-5)
  # One token at a time through the decoding step, from the prefix's state.
  for t in range(cut, T):
    out_t, state = step(state, q[:, t], k[:, t], v[:, t], beta[:, t],
                                        log_alpha[:, t])
    np.testing.assert_allclose(out_t, whole[:, t], atol=2e-5, rtol=1e-5)
  # Right padding: the final state is the one after the last valid token.
  lengths = np.array([cut, T])
  _, padded_state = rule(q, k, v, beta, log_alpha, chunk_size=8,
                                         key_value_seq_lengths=jnp.asarray(lengths),
                                         return_final_state=True)
  _, expected_state = reference(q, k, v, beta, log_alpha, lengths=lengths)
  np.testing.assert_allclose(padded_state, expected_state, atol=2e-5, rtol=1e-5)


def test_gradients_match_finite_differences_of_the_float64_reference():
  """Directional derivatives, every input, across restarts and a partial last chunk."""
  inputs = _inputs(seed=3)
  rng = np.random.default_rng(4)
  dout = rng.normal(size=(B, T, N, HV))

  def loss64(*xs):
    return np.sum(reference(*xs, segments=SEGMENTS, scale=0.7)[0] * dout)

  def loss32(*xs):
    out = gdn.gated_delta_rule(*xs, segment_ids=jnp.asarray(SEGMENTS), chunk_size=5, scale=0.7)
    return jnp.sum(out * jnp.asarray(dout, jnp.float32))

  grads = jax.jit(jax.grad(loss32, argnums=tuple(range(5))))(*_f32(*inputs))
  np_reference.check_gradients(loss64, grads, inputs, rng)


def test_restarts_cut_all_gradient_flow_between_segments():
  """d output(t) / d input(s) is exactly zero when s is in an earlier segment or s > t."""
  q, k, v, beta, log_alpha = _f32(*_inputs(seed=5))
  t = 9  # segment 2 of row 0 starts at 7

  def out_t(v):
    out = rule(q, k, v, beta, log_alpha, segment_ids=jnp.asarray(SEGMENTS), chunk_size=4)
    return jnp.sum(out[0, t])

  grad = np.asarray(jax.jit(jax.grad(out_t))(v))[0]
  assert np.all(grad[:7] == 0) and np.all(grad[t + 1:] == 0)
  assert np.all(np.abs(grad[7:t + 1]).sum(-1) > 0)


def test_implicit_attention_matrix_reproduces_the_output():
  q, k, v, beta, log_alpha = _f32(*_inputs(seed=6))
  segments = jnp.asarray(SEGMENTS)
  weights = jax.jit(gdn.gated_delta_weights, static_argnames="scale")(
      q, k, beta, log_alpha, segment_ids=segments, scale=0.7)
  out = rule(q, k, v, beta, log_alpha, segment_ids=segments, chunk_size=8, scale=0.7)
  np.testing.assert_allclose(jnp.einsum("bnts,bsnv->btnv", weights, v), out, atol=2e-5,
                             rtol=1e-5)
  w = np.asarray(weights)
  i, j = np.arange(T)[:, None], np.arange(T)[None, :]
  assert np.all(w[:, :, j > i] == 0)  # causal
  assert np.all(w[0][:, 7:, :7] == 0) and np.abs(w[0][:, 7:16, 7:16]).max() > 0.01


def test_bfloat16_inputs_keep_float32_state():
  q, k, v, beta, log_alpha = _inputs(seed=7)
  expected, _ = reference(q, k, v, beta, log_alpha)
  out, state = rule(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)),
                                    *_f32(beta, log_alpha), chunk_size=8,
                                    return_final_state=True)
  assert out.dtype == jnp.bfloat16 and state.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out, np.float64), expected, atol=5e-2, rtol=5e-2)
