"""Autoregressive decoding: greedy, temperature, top-k, top-p and beam search.

Works for `LanguageModel` (continue a prompt) and `EncoderDecoder` (translate a source, the
decoder starting from `bos_id`). Each entry point is jit-compiled once per input shape and
static setting. Prompts in a batch share one length (no left padding); encoder-decoder sources
may be padded with `pad_id` anywhere (masked, as in training). Prompt + new tokens must fit in
`model.config.max_len`, the size of the KV cache. The cache is what the mechanism's registry
entry says (`decoding`): every key and value, a window's ring buffer, or a recurrent state; a
mechanism that cannot decode is a ConfigError.

Shapes: B batch, P prompt length, S source length, V vocab, W beam width.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attn.errors import ConfigError
from attn.layers import registry
from attn.models import EncoderDecoder

Array = jax.Array


def source_segments(tokens: Array, pad_id: int) -> tuple[Array, Array]:
  """Segment ids and positions of one unpacked source per row: `pad_id` tokens are padding.

  Segment id 1 marks a real token and 0 padding (the data pipeline's convention); positions
  count the real tokens from 0, so a padded source encodes exactly like the unpadded one.
  """
  segment_ids = (tokens != pad_id).astype(jnp.int32)
  positions = jnp.maximum(jnp.cumsum(segment_ids, axis=1) - 1, 0).astype(jnp.int32)
  return segment_ids, positions


def _decoder_setup(model: nn.Module, params: Any, tokens: Array, bos_id: int, pad_id: int):
  """The decode-mode model, a step function, the first decoder inputs and an empty cache."""
  config = model.config
  decoder = model.clone(decode=True)
  batch = tokens.shape[0]
  if isinstance(model, EncoderDecoder):
    # The encoder and every cross-attention step see only the real source tokens, as in
    # training (the pipeline marks padding with segment id 0).
    source_mask, source_positions = source_segments(tokens, pad_id)
    encoded = model.apply({"params": params}, tokens, inputs_segment_ids=source_mask,
                          inputs_positions=source_positions, method=EncoderDecoder.encode)
    prompt = jnp.full((batch, 1), bos_id, jnp.int32)
    shapes = jax.eval_shape(decoder.init, jax.random.key(0), tokens,
                            jnp.zeros((batch, config.max_len), jnp.int32))

    def step(cache, inputs, positions):
      logits, state = decoder.apply(
          {"params": params, "cache": cache}, encoded, inputs, inputs_segment_ids=source_mask,
          targets_positions=positions, method=EncoderDecoder.decode_logits, mutable=["cache"])
      return logits, state["cache"]
  else:
    prompt = tokens
    shapes = jax.eval_shape(decoder.init, jax.random.key(0),
                            jnp.zeros((batch, config.max_len), jnp.int32))

    def step(cache, inputs, positions):
      logits, state = decoder.apply({"params": params, "cache": cache}, inputs,
                                    positions=positions, mutable=["cache"])
      return logits, state["cache"]

  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nn.meta.unbox(shapes["cache"]))
  return step, prompt, cache


def _check_length(model: nn.Module, prompt_len: int, max_new_tokens: int) -> None:
  """The model's mechanism decodes (registry) and prompt + new tokens fit the cache."""
  for name in model.config.mechanisms:
    if registry.get(name).decoding is None:
      raise ConfigError(
          f"model.attention={name!r} cannot decode (no KV cache or recurrent state in its "
          f"registry entry); mechanisms that decode: {registry.supporting('decoding')}.")
  if prompt_len + max_new_tokens > model.config.max_len:
    raise ValueError(
        f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} exceeds the KV cache "
        f"(model.max_len = {model.config.max_len}); shorten them or raise model.max_len.")


def sample_token(logits: Array, rng: Array | None, *, temperature: float | Array = 0.0,
                 top_k: int | None = None, top_p: float | None = None) -> Array:
  """One token per row from `[B, V]` logits; temperature 0 (or no rng) is greedy argmax.

  top-k keeps the k largest logits; top-p (nucleus, Holtzman et al. 2020) keeps the smallest
  set of tokens whose probability reaches p. Both filters apply before sampling.
  """
  if rng is None or (not isinstance(temperature, jax.Array) and temperature == 0.0):
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep a token when the mass before it is still below p; the top token is always kept.
    keep = (jnp.cumsum(sorted_probs, axis=-1) - sorted_probs) < top_p
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def generate(model: nn.Module, params: Any, tokens: Array, *, max_new_tokens: int,
             rng: Array | None = None, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, eos_id: int | None = None, pad_id: int = 0,
             bos_id: int = 1) -> Array:
  """Sample `max_new_tokens` tokens with the KV cache; rows stop at `eos_id` (then `pad_id`).

  Args:
    model: a LanguageModel or EncoderDecoder (the training module; decode mode is derived).
    params: its parameters.
    tokens: LM: the prompt `[B, P]`; encoder-decoder: the source `[B, S]`, one per row,
      `pad_id` tokens being padding that neither the encoder nor cross-attention sees.
    max_new_tokens: tokens to generate.
    rng: PRNG key for sampling (None, or temperature 0, is greedy).
    temperature: softmax temperature.
    top_k: keep only the k most likely tokens.
    top_p: nucleus sampling mass.
    eos_id: stop a row after it emits this token.
    pad_id: written after a row stopped; in an encoder-decoder source, the padding id.
    bos_id: the decoder's first input (encoder-decoder only).

  Returns:
    LM: `[B, P + max_new_tokens]` (prompt then continuation); encoder-decoder:
    `[B, max_new_tokens]` (the target, without bos).
  """
  tokens = jnp.asarray(tokens, jnp.int32)
  prompt_len = 1 if isinstance(model, EncoderDecoder) else tokens.shape[1]
  _check_length(model, prompt_len, max_new_tokens)
  greedy = rng is None or temperature == 0.0
  return _generate(model, params, tokens, jax.random.key(0) if rng is None else rng,
                   jnp.float32(temperature or 1.0), max_new_tokens=max_new_tokens, greedy=greedy,
                   top_k=top_k, top_p=top_p, eos_id=eos_id, pad_id=pad_id, bos_id=bos_id)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "greedy", "top_k",
                                             "top_p", "eos_id", "pad_id", "bos_id"))
def _generate(model, params, tokens, rng, temperature, *, max_new_tokens, greedy, top_k, top_p,
              eos_id, pad_id, bos_id):
  step, prompt, cache = _decoder_setup(model, params, tokens, bos_id, pad_id)
  batch, prompt_len = prompt.shape
  positions = jnp.broadcast_to(jnp.arange(prompt_len), prompt.shape)
  logits, cache = step(cache, prompt, positions)
  out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
  done = jnp.zeros((batch,), bool)

  def not_finished(carry):
    i, _, _, _, done, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, cache, last_logits, rng, done, out = carry
    rng, sub = jax.random.split(rng)
    token = sample_token(last_logits, None if greedy else sub, temperature=temperature,
                         top_k=top_k, top_p=top_p)
    token = jnp.where(done, pad_id, token)
    if eos_id is not None:
      done = done | (token == eos_id)
    out = out.at[:, i].set(token)
    position = jnp.full((batch, 1), prompt_len + i, jnp.int32)
    logits, cache = step(cache, token[:, None], position)
    return i + 1, cache, logits[:, 0], rng, done, out

  carry = (jnp.int32(0), cache, logits[:, -1], rng, done, out)
  out = jax.lax.while_loop(not_finished, body, carry)[-1]
  return out if isinstance(model, EncoderDecoder) else jnp.concatenate([prompt, out], axis=1)


def length_penalty(length: Array, alpha: float) -> Array:
  """GNMT's length normalization ((5 + length) / 6) ** alpha (Wu et al. 2016)."""
  return ((5.0 + length.astype(jnp.float32)) / 6.0) ** alpha


def beam_search(model: nn.Module, params: Any, tokens: Array, *, beam_size: int,
                max_new_tokens: int, alpha: float = 0.6, eos_id: int | None = None,
                pad_id: int = 0, bos_id: int = 1) -> tuple[Array, Array]:
  """Beam search with GNMT length penalty; returns the `beam_size` best per row.

  Args:
    model, params, tokens, max_new_tokens, eos_id, pad_id, bos_id: as in `generate`.
    beam_size: W, hypotheses kept per row.
    alpha: length-penalty exponent (0 = raw log-probability).

  Returns:
    `(sequences [B, W, max_new_tokens], scores [B, W])`, best first: the generated tokens only
    (padded after eos) and their length-normalized log-probabilities.
  """
  tokens = jnp.asarray(tokens, jnp.int32)
  prompt_len = 1 if isinstance(model, EncoderDecoder) else tokens.shape[1]
  _check_length(model, prompt_len, max_new_tokens)
  return _beam_search(model, params, tokens, beam_size=beam_size, max_new_tokens=max_new_tokens,
                      alpha=alpha, eos_id=eos_id, pad_id=pad_id, bos_id=bos_id)


@functools.partial(jax.jit, static_argnames=("model", "beam_size", "max_new_tokens", "alpha",
                                             "eos_id", "pad_id", "bos_id"))
def _beam_search(model, params, tokens, *, beam_size, max_new_tokens, alpha, eos_id, pad_id,
                 bos_id):
  batch, width = tokens.shape[0], beam_size
  # Every row becomes W rows (batch-major), so the cache holds one entry per hypothesis.
  step, prompt, cache = _decoder_setup(model, params, jnp.repeat(tokens, width, axis=0), bos_id,
                                       pad_id)
  prompt_len = prompt.shape[1]
  logits, cache = step(cache, prompt, jnp.broadcast_to(jnp.arange(prompt_len), prompt.shape))
  batch_axis = 1 if model.config.scan_layers else 0  # scanned caches lead with the layer axis

  def gather_beams(tree, parents):
    flat = (jnp.arange(batch)[:, None] * width + parents).reshape(-1)
    return jax.tree.map(
        lambda x: jnp.take(x, flat, axis=batch_axis) if x.ndim > batch_axis + 1 else x, tree)

  neg_inf = jnp.float32(-1e9)
  # Only beam 0 is live at the start, so the first expansion does not pick W copies of one token.
  alive_logp = jnp.tile(jnp.array([0.0] + [neg_inf] * (width - 1)), (batch, 1))
  alive_seqs = jnp.full((batch, width, max_new_tokens), pad_id, jnp.int32)
  done_seqs = jnp.full((batch, width, max_new_tokens), pad_id, jnp.int32)
  done_scores = jnp.full((batch, width), neg_inf)

  def body(i, carry):
    cache, last_logits, alive_logp, alive_seqs, done_seqs, done_scores = carry
    logp = jax.nn.log_softmax(last_logits.astype(jnp.float32)).reshape(batch, width, -1)
    vocab = logp.shape[-1]
    candidates = (alive_logp[:, :, None] + logp).reshape(batch, width * vocab)
    # 2W candidates guarantee W that do not end here, whatever number hit eos.
    top_logp, top_idx = jax.lax.top_k(candidates, 2 * width)
    parents, new_tokens = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
    seqs = jnp.take_along_axis(alive_seqs, parents[:, :, None], axis=1).at[:, :, i].set(
        new_tokens)
    ends = (new_tokens == eos_id) if eos_id is not None else jnp.zeros_like(new_tokens, bool)

    # Finished pool: the best W of the old finished and the ones that just emitted eos.
    scores = jnp.where(ends, top_logp / length_penalty(i + 1, alpha), neg_inf)
    pool_scores = jnp.concatenate([done_scores, scores], axis=1)
    pool_seqs = jnp.concatenate([done_seqs, seqs], axis=1)
    done_scores, keep = jax.lax.top_k(pool_scores, width)
    done_seqs = jnp.take_along_axis(pool_seqs, keep[:, :, None], axis=1)

    # Alive: the best W that did not end.
    alive_logp, keep = jax.lax.top_k(jnp.where(ends, neg_inf, top_logp), width)
    alive_seqs = jnp.take_along_axis(seqs, keep[:, :, None], axis=1)
    alive_parents = jnp.take_along_axis(parents, keep, axis=1)
    cache = gather_beams(cache, alive_parents)
    next_tokens = jnp.take_along_axis(new_tokens, keep, axis=1).reshape(-1, 1)
    position = jnp.full((batch * width, 1), prompt_len + i, jnp.int32)
    logits, cache = step(cache, next_tokens, position)
    return cache, logits[:, 0], alive_logp, alive_seqs, done_seqs, done_scores

  carry = (cache, logits[:, -1], alive_logp, alive_seqs, done_seqs, done_scores)
  _, _, alive_logp, alive_seqs, done_seqs, done_scores = jax.lax.fori_loop(
      0, max_new_tokens, body, carry)
  # Rows with fewer than W finished hypotheses are topped up with the alive ones.
  alive_scores = alive_logp / length_penalty(jnp.int32(max_new_tokens), alpha)
  scores = jnp.concatenate([done_scores, jnp.where(done_scores[:, -1:] > neg_inf / 2,
                                                   neg_inf, alive_scores)], axis=1)
  seqs = jnp.concatenate([done_seqs, alive_seqs], axis=1)
  scores, order = jax.lax.top_k(scores, width)
  return jnp.take_along_axis(seqs, order[:, :, None], axis=1), scores

