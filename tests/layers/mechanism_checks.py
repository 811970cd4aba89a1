"""Contracts every layer-level mechanism keeps, checked the same way for each of them.

- decoding: a prompt then one token at a time with decode=True (its cache or recurrent state)
  gives the outputs of the full causal forward pass;
- packing: two sequences packed in one row (segment ids, per-segment positions) give the
  outputs of each sequence alone (equal lengths: one compiled shape serves both).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

B, T, D = 2, 12, 32


def inputs(seed: int = 0, shape=(B, T, D), dtype=jnp.float32) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def init(layer: nn.Module, x: jax.Array):
  return meta.unbox(layer.init(jax.random.key(0), x, is_causal=True))["params"]


def check_decoding_matches_full_forward(layer: nn.Module, *, prompt: int = 5,
                                        atol: float = 2e-5) -> None:
  x = inputs(1)
  params = init(layer, x)
  full = jax.jit(lambda p, x: layer.apply({"params": p}, x, is_causal=True))(params, x)
  decoder = layer.clone(decode=True)
  cache = meta.unbox(decoder.init(jax.random.key(0), x, is_causal=True))["cache"]
  cache = jax.tree.map(jnp.zeros_like, cache)  # as attn.decode starts it

  @jax.jit
  def step(cache, x_new):
    out, state = decoder.apply({"params": params, "cache": cache}, x_new, is_causal=True,
                               mutable=["cache"])
    return out, state["cache"]

  outs = []
  out, cache = step(cache, x[:, :prompt])
  outs.append(out)
  for t in range(prompt, T):
    out, cache = step(cache, x[:, t:t + 1])
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=atol, rtol=1e-4)


def check_packed_matches_separate(layer: nn.Module, *, split: int = T // 2,
                                  atol: float = 2e-5) -> None:
  x = inputs(2, (1, T, D))
  params = init(layer, x)
  segment_ids = jnp.asarray([[1] * split + [2] * (T - split)])
  positions = jnp.asarray([list(range(split)) + list(range(T - split))])
  packed = jax.jit(lambda p, x: layer.apply({"params": p}, x, segment_ids=segment_ids,
                                             q_positions=positions, is_causal=True))(params, x)
  apply = jax.jit(lambda p, x: layer.apply({"params": p}, x, is_causal=True))
  alone = [apply(params, part) for part in (x[:, :split], x[:, split:])]
  np.testing.assert_allclose(packed, jnp.concatenate(alone, axis=1), atol=atol, rtol=1e-5)
