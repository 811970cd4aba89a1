"""Decoding: the KV cache reproduces the full forward; sampling and beam search contracts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn import decode
from attn.models import EncoderDecoder, ModelConfig, build

SMALL = dict(vocab_size=30, d_model=32, num_heads=4, mlp_dim=48, max_len=20, num_layers=2)


def _model(kind="lm", **overrides):
  config = ModelConfig(kind=kind, **(SMALL | overrides))
  model = build(config)
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, 30, size=(2, 6)), jnp.int32)
  args = (tokens, tokens[:, :4]) if kind == "encoder_decoder" else (tokens,)
  return model, model.init(jax.random.key(0), *args)["params"], tokens


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
@pytest.mark.parametrize("position", ["sinusoidal", "learned", "rope", "alibi", "t5", "none"])
@pytest.mark.parametrize("kind", ["lm", "encoder_decoder"])
def test_cached_decoding_gives_the_full_forward_logits_at_every_position(kind, position, scan):
  # The encoder-decoder runs a 3-token window (a ring-buffer cache; a full one under ALiBi / T5).
  window = {} if kind == "lm" else dict(attention="local", attention_options={"window": 3})
  model, params, source = _model(kind, position=position, scan_layers=scan, num_kv_heads=2,
                                 **window)
  target = jnp.asarray(np.random.default_rng(1).integers(3, 30, size=(2, 9)), jnp.int32)
  decoder = model.clone(decode=True)
  if kind == "encoder_decoder":
    full = model.apply({"params": params}, source, target)
    encoded = model.apply({"params": params}, source, method=EncoderDecoder.encode)
    cache = decoder.init(jax.random.key(0), source, jnp.zeros((2, 20), jnp.int32))["cache"]
  else:
    full = model.apply({"params": params}, target)
    cache = decoder.init(jax.random.key(0), jnp.zeros((2, 20), jnp.int32))["cache"]
  steps = [(0, 3)] + [(t, t + 1) for t in range(3, 9)]  # a 3-token prefill, then single steps
  outputs = []
  for start, stop in steps:
    positions = jnp.broadcast_to(jnp.arange(start, stop), (2, stop - start))
    if kind == "encoder_decoder":
      logits, state = decoder.apply(
          {"params": params, "cache": cache}, encoded, target[:, start:stop],
          targets_positions=positions, method=EncoderDecoder.decode_logits, mutable=["cache"])
    else:
      logits, state = decoder.apply({"params": params, "cache": cache}, target[:, start:stop],
                                    positions=positions, mutable=["cache"])
    cache = state["cache"]
    outputs.append(logits)
  np.testing.assert_allclose(jnp.concatenate(outputs, axis=1), full, atol=3e-5, rtol=3e-5)


def _naive_greedy(model, params, tokens, steps):
  """Greedy decoding without a cache: the whole sequence through the model at every step."""
  apply = jax.jit(model.apply)  # one compile per length beats op-by-op dispatch here
  if isinstance(model, EncoderDecoder):
    out = jnp.ones((tokens.shape[0], 1), jnp.int32)  # bos
    for _ in range(steps):
      logits = apply({"params": params}, tokens, out)
      out = jnp.concatenate([out, jnp.argmax(logits[:, -1], -1)[:, None]], axis=1)
    return out[:, 1:]
  out = tokens
  for _ in range(steps):
    logits = apply({"params": params}, out)
    out = jnp.concatenate([out, jnp.argmax(logits[:, -1], -1)[:, None]], axis=1)
  return out


@pytest.mark.parametrize("kind", ["lm", "encoder_decoder"])
def test_greedy_generate_equals_uncached_greedy(kind):
  model, params, tokens = _model(kind, position="rope" if kind == "lm" else "t5")
  expected = _naive_greedy(model, params, tokens, 8)
  np.testing.assert_array_equal(decode.generate(model, params, tokens, max_new_tokens=8),
                                expected)
  # Sampling settings that must collapse to greedy.
  rng = jax.random.key(3)
  for kwargs in (dict(temperature=0.0, rng=rng), dict(temperature=1.0, top_k=1, rng=rng),
                 dict(temperature=1.0, top_p=1e-6, rng=rng)):
    np.testing.assert_array_equal(
        decode.generate(model, params, tokens, max_new_tokens=8, **kwargs), expected)


def test_generation_stops_at_eos_and_pads_after_it():
  model, params, tokens = _model()
  free = decode.generate(model, params, tokens, max_new_tokens=10)
  eos = int(free[0, 6 + 2])  # make the third generated token of row 0 the eos
  out = np.asarray(decode.generate(model, params, tokens, max_new_tokens=10, eos_id=eos))
  for row in range(2):
    generated = out[row, 6:]
    hits = np.flatnonzero(generated == eos)
    if hits.size:
      np.testing.assert_array_equal(generated[hits[0] + 1:], 0)
      np.testing.assert_array_equal(generated[:hits[0] + 1], np.asarray(free[row, 6:7 + hits[0]]))
  assert np.flatnonzero(out[0, 6:] == eos)[0] <= 2


def test_sampling_respects_top_k_and_top_p():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
  keys = jax.random.key(0)
  top_k = np.asarray(decode.sample_token(logits, keys, temperature=1.0, top_k=2))
  assert set(np.unique(top_k)) == {0, 1}
  top_p = np.asarray(decode.sample_token(logits, keys, temperature=1.0, top_p=0.7))
  assert set(np.unique(top_p)) == {0, 1}  # 0.5 < 0.7 needs the second token, not the third
  assert abs(np.mean(top_p == 0) - 0.5 / 0.8) < 0.03
  free = np.asarray(decode.sample_token(logits, keys, temperature=1.0))
  np.testing.assert_allclose(np.bincount(free, minlength=4) / 4000, [0.5, 0.3, 0.15, 0.05],
                             atol=0.03)


@pytest.mark.parametrize("kind", ["lm", "encoder_decoder"])
def test_beam_of_one_equals_greedy_and_wider_beams_score_at_least_as_well(kind):
  model, params, tokens = _model(kind)
  greedy = _naive_greedy(model, params, tokens, 6)
  greedy_new = greedy if kind == "encoder_decoder" else greedy[:, 6:]
  seqs, scores = decode.beam_search(model, params, tokens, beam_size=1, max_new_tokens=6, alpha=0)
  np.testing.assert_array_equal(seqs[:, 0], greedy_new)
  wide, wide_scores = decode.beam_search(model, params, tokens, beam_size=4, max_new_tokens=6,
                                         alpha=0)
  assert np.all(np.asarray(wide_scores[:, 0]) >= np.asarray(scores[:, 0]) - 1e-5)
  assert np.all(np.diff(np.asarray(wide_scores), axis=1) <= 1e-6)  # best first
  # The scores are the sequences' log-probabilities under the model.
  for row in range(2):
    seq = wide[row, 0]
    if kind == "encoder_decoder":
      decoder_in = jnp.concatenate([jnp.ones((1,), jnp.int32), seq[:-1]])[None]
      logits = model.apply({"params": params}, tokens[row:row + 1], decoder_in)[0]
    else:
      full = jnp.concatenate([tokens[row], seq])[None]
      logits = model.apply({"params": params}, full)[0, 5:-1]
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), seq[:, None], axis=-1).sum()
    np.testing.assert_allclose(wide_scores[row, 0], logp, rtol=1e-4)


def test_too_long_a_request_is_refused_before_compiling():
  model, params, tokens = _model()
  with pytest.raises(ValueError, match=r"prompt length 6 \+ max_new_tokens 15 exceeds"):
    decode.generate(model, params, tokens, max_new_tokens=15)
