"""Sparse patterns reach the op inside the real model, and windowed mechanisms decode with a
cache bounded by the window.

At T = 300 (longer than every window, chunk and block here) the gradient of the stack's output
at t with respect to its input at s is exactly zero outside the pattern (composed over the two
layers) and nonzero inside it; the patterns are rebuilt here in NumPy from their definitions.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from attn import decode
from attn.models import ModelConfig, build
from attn.models.transformer import TransformerStack
from attn.ops import sparse
from tests.test_decode import _naive_greedy

T = 300
SMALL = dict(vocab_size=40, d_model=16, num_heads=2, mlp_dim=32, num_layers=2, max_len=T)
QUERIES = np.array([0, 5, 17, 63, 64, 130, 199, 255, 299])


def _band(left: int, right: int) -> np.ndarray:
  t, s = np.arange(T)[:, None], np.arange(T)[None, :]
  return (s >= t - left) & (s <= t + right)


def _pattern(name: str, options: dict, causal: bool) -> np.ndarray:
  """[T, T] one-layer pattern, from the mechanism's definition."""
  t, s = np.arange(T)[:, None], np.arange(T)[None, :]
  if name == "local":
    p = _band(options["window"], options["window"])
  elif name == "chunked":
    p = (t // options["chunk_size"]) == (s // options["chunk_size"])
  elif name == "longformer":
    g = options["num_global_tokens"]
    p = _band(options["window"], options["window"]) | (s < g) | (t < g)
  else:  # bigbird: its random blocks are drawn by the op (tested against its own reference)
    p = np.asarray(sparse.bigbird_mask(T, T, **options))[0, 0]
  return p & (s <= t) if causal else p


CASES = [
    ("local", {"window": 16}, True),
    ("chunked", {"chunk_size": 32}, True),
    ("bigbird", {"block_size": 16, "num_random_blocks": 1}, True),
    ("bigbird", {"block_size": 16, "num_random_blocks": 1}, False),
    ("longformer", {"window": 8, "num_global_tokens": 2}, True),
    ("longformer", {"window": 8, "num_global_tokens": 2}, False),
    ("local", {"window": 16}, False),
]


@pytest.mark.parametrize("name, options, causal", CASES,
                         ids=[f"{n}-{'causal' if c else 'bidirectional'}" for n, _, c in CASES])
def test_gradient_is_zero_exactly_outside_the_pattern_inside_the_model(name, options, causal):
  config = ModelConfig(attention=name, attention_options=options, **SMALL)
  stack = TransformerStack(config, config.num_layers, causal=causal)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, T, 16)), jnp.float32)
  params = stack.init(jax.random.key(0), x)
  out, vjp = jax.vjp(lambda x: stack.apply(params, x), x)
  probe = jnp.asarray(np.random.default_rng(1).normal(size=out.shape[-1]), jnp.float32)

  def grad_at(t):
    cotangent = jnp.zeros_like(out).at[0, t].set(probe)
    return jnp.abs(vjp(cotangent)[0][0]).sum(-1)  # [T]: |d out_t / d x_s|

  grads = np.asarray(jax.jit(jax.vmap(grad_at))(jnp.asarray(QUERIES)))
  one = _pattern(name, options, causal).astype(np.int64)
  reach = (one @ one) > 0  # two layers: t reaches s through some r in both patterns
  np.testing.assert_array_equal(grads == 0, ~reach[QUERIES])


@pytest.mark.parametrize("name, options", [("local", {"window": 16}),
                                           ("chunked", {"chunk_size": 32})])
def test_windowed_lm_logits_differ_from_softmax_exactly_where_the_window_binds(name, options):
  tokens = jnp.asarray(np.random.default_rng(2).integers(3, 40, size=(1, T)), jnp.int32)
  softmax = build(ModelConfig(**SMALL))
  params = softmax.init(jax.random.key(0), tokens)
  windowed = build(ModelConfig(attention=name, attention_options=options, **SMALL))
  a, b = softmax.apply(params, tokens), windowed.apply(params, tokens)
  sees_all = 17 if name == "local" else 32  # positions whose window covers the whole past
  np.testing.assert_allclose(a[:, :sees_all], b[:, :sees_all], atol=2e-5)
  assert np.all(np.abs(np.asarray(a - b)[0, sees_all:]).max(-1) > 1e-4)


@pytest.mark.parametrize("name, options, slots, scan", [("local", {"window": 4}, 4, False),
                                                        ("local", {"window": 4}, 4, True),
                                                        ("chunked", {"chunk_size": 5}, 4, False)],
                         ids=["local-loop", "local-scan", "chunked-loop"])
def test_window_cache_is_bounded_and_decodes_like_no_cache(name, options, slots, scan):
  config = ModelConfig(attention=name, attention_options=options, scan_layers=scan,
                       **(SMALL | dict(max_len=24)))
  model = build(config)
  prompt = jnp.asarray(np.random.default_rng(3).integers(3, 40, size=(2, 7)), jnp.int32)
  params = model.init(jax.random.key(0), prompt)["params"]
  cache = model.clone(decode=True).init(jax.random.key(0), jnp.zeros((2, 24), jnp.int32))
  leaves = meta.unbox(cache["cache"])["decoder"]
  layer = leaves["layers" if scan else "layer_0"]["self_attention"]
  assert layer["cached_key"].shape[-3] == slots  # the window, not max_len = 24
  out = decode.generate(model, params, prompt, max_new_tokens=9)
  np.testing.assert_array_equal(out, _naive_greedy(model, params, prompt, 9))
