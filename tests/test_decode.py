"""Decoding: the KV cache reproduces the full forward; sampling and beam search contracts."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attn import decode
from attn.layers import registry
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
  expected = _naive_greedy(model, params, tokens, 5)
  np.testing.assert_array_equal(decode.generate(model, params, tokens, max_new_tokens=5),
                                expected)
  # Sampling settings that must collapse to greedy.
  rng = jax.random.key(3)
  for kwargs in (dict(temperature=0.0, rng=rng), dict(temperature=1.0, top_k=1, rng=rng),
                 dict(temperature=1.0, top_p=1e-6, rng=rng)):
    np.testing.assert_array_equal(
        decode.generate(model, params, tokens, max_new_tokens=5, **kwargs), expected)


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
    np.testing.assert_allclose(wide_scores[row, 0],
                               _teacher_forced_logp(model, params, tokens[row], wide[row, 0]),
                               rtol=1e-4)


def _teacher_forced_logp(model, params, source, seq):
  """log p(seq | source) from the model's full forward (no cache): the reference for scores."""
  if isinstance(model, EncoderDecoder):
    decoder_in = jnp.concatenate([jnp.ones((1,), jnp.int32), seq[:-1]])[None]
    logits = model.apply({"params": params}, source[None], decoder_in)[0]
  else:
    full = jnp.concatenate([source, seq])[None]
    logits = model.apply({"params": params}, full)[0, len(source) - 1:-1]
  return jnp.take_along_axis(jax.nn.log_softmax(logits), seq[:, None], axis=-1).sum()


def test_padded_sources_decode_like_unpadded_ones():
  """Source padding (id 0) is masked in the encoder and in every cross-attention step: greedy
  tokens and beam scores are those of the teacher-forced forward on each source alone,
  unpadded. Attending to the padding (the old all-ones mask) changes the log-probabilities
  (against the old decoding this test fails: 3 of row 0's 6 greedy tokens differ)."""
  model, params, _ = _model("encoder_decoder", num_layers=1)
  rng = np.random.default_rng(2)
  sources = [jnp.asarray(rng.integers(3, 30, size=n), jnp.int32) for n in (4, 7)]
  pad = lambda n: jnp.zeros((n,), jnp.int32)
  # Row 0 right-padded (the pipeline's layout), row 1 padded on both sides.
  padded = jnp.stack([jnp.concatenate([sources[0], pad(6)]),
                      jnp.concatenate([pad(2), sources[1], pad(1)])])
  steps, width = 6, 3
  greedy = np.asarray(decode.generate(model, params, padded, max_new_tokens=steps))
  seqs, scores = decode.beam_search(model, params, padded, beam_size=width,
                                    max_new_tokens=steps, alpha=0)
  forward = jax.jit(lambda source, targets: jax.nn.log_softmax(model.apply(
      {"params": params}, jnp.broadcast_to(source, (len(targets), len(source))),
      jnp.concatenate([jnp.ones((len(targets), 1), jnp.int32), targets[:, :-1]], axis=1))))
  for row, source in enumerate(sources):
    # Teacher-forced on the unpadded source, the greedy tokens are the argmax at every step...
    logp = forward(source, jnp.concatenate([greedy[row:row + 1], seqs[row]]))
    np.testing.assert_array_equal(np.argmax(logp[0], axis=-1), greedy[row])
    # ...and the beam scores are the sequences' log-probabilities, to float32 rounding.
    reference = jnp.take_along_axis(logp[1:], seqs[row][:, :, None], axis=-1).sum((1, 2))
    np.testing.assert_allclose(scores[row], reference, rtol=1e-5, atol=1e-5)
    # The old decoding encoded the padded row whole: its log-probabilities are far off.
    attended = forward(padded[row], jnp.concatenate([greedy[row:row + 1], seqs[row]]))
    assert np.max(np.abs(np.asarray(attended - logp))) > 0.1


@pytest.mark.parametrize("kind", ["lm", "encoder_decoder"])
def test_decode_mode_without_positions_is_an_error(kind):
  model, params, tokens = _model(kind)
  decoder = model.clone(decode=True)
  cache = decoder.init(jax.random.key(0), *((tokens,) if kind == "encoder_decoder" else ()),
                       jnp.zeros((2, 20), jnp.int32))["cache"]
  if kind == "encoder_decoder":
    encoded = model.apply({"params": params}, tokens, method=EncoderDecoder.encode)
    call = lambda: decoder.apply({"params": params, "cache": cache}, encoded, tokens[:, :1],
                                 method=EncoderDecoder.decode_logits, mutable=["cache"])
    name = "targets_positions"
  else:
    call = lambda: decoder.apply({"params": params, "cache": cache}, tokens[:, :1],
                                 mutable=["cache"])
    name = "positions"
  with pytest.raises(ValueError, match=rf"decode=True\) was called without `{name}`"):
    call()


def test_too_long_a_request_is_refused_before_compiling():
  model, params, tokens = _model()
  with pytest.raises(ValueError, match=r"prompt length 6 \+ max_new_tokens 15 exceeds"):
    decode.generate(model, params, tokens, max_new_tokens=15)


RECURRENT_OPTIONS = {"linear": {"chunk_size": 4}, "performer": {"num_features": 16,
                                                               "chunk_size": 4}}


# The registry's recurrent cores (layer-level ones, gated_deltanet, have the same check in
# tests/layers/mechanism_checks.py); small options where a core has them.
RECURRENT_CORES = [name for name, m in registry.mechanisms().items()
                   if m.decoding == "recurrent" and m.level == "core"]


@pytest.mark.parametrize("attention", RECURRENT_CORES)
def test_recurrent_decoding_equals_the_full_forward_and_uncached_greedy(attention):
  """Causal linear / performer decode from their O(1) state ("Transformers are RNNs"): the
  logits of a prefill + single steps equal the full forward, greedy generate equals greedy
  without a cache, and the cache holds no keys or values, so its size ignores max_len."""
  model, params, tokens = _model(attention=attention, num_kv_heads=2, position="rope",
                                 attention_options=RECURRENT_OPTIONS.get(attention, {}))
  target = jnp.asarray(np.random.default_rng(1).integers(3, 30, size=(2, 9)), jnp.int32)
  full = model.apply({"params": params}, target)
  decoder = model.clone(decode=True)
  cache = decoder.init(jax.random.key(0), jnp.zeros((2, 20), jnp.int32))["cache"]
  outputs = []
  step = jax.jit(lambda cache, x, positions: decoder.apply(
      {"params": params, "cache": cache}, x, positions=positions, mutable=["cache"]))
  for start, stop in [(0, 3)] + [(t, t + 1) for t in range(3, 9)]:
    positions = jnp.broadcast_to(jnp.arange(start, stop), (2, stop - start))
    logits, state = step(cache, target[:, start:stop], positions)
    cache = state["cache"]
    outputs.append(logits)
  np.testing.assert_allclose(jnp.concatenate(outputs, axis=1), full, atol=5e-5, rtol=5e-5)

  names = {jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(cache)}
  assert not any("cached_key" in n or "cached_value" in n for n in names), names
  longer = build(ModelConfig(kind="lm", **(SMALL | dict(
      max_len=200, attention=attention, num_kv_heads=2, position="rope",
      attention_options=RECURRENT_OPTIONS.get(attention, {}))))).clone(decode=True)
  sizes = [sum(x.size for x in jax.tree.leaves(jax.eval_shape(
      m.init, jax.random.key(0), jnp.zeros((2, n), jnp.int32))["cache"]))
      for m, n in ((decoder, 20), (longer, 200))]
  assert sizes[0] == sizes[1], sizes

  expected = _naive_greedy(model, params, tokens, 5)
  np.testing.assert_array_equal(decode.generate(model, params, tokens, max_new_tokens=5),
                                expected)


def test_performer_decodes_like_its_uncached_forward_with_features_drawn_once():
  """Through `generate`: greedy performer decoding (its recurrent state) equals decoding
  without a cache, every step's logits equal the full forward's to float32 precision, and no
  step redraws the random features (no QR in the step's program: they are the constant drawn
  once from the seed, the very array training uses)."""
  from attn.layers import variants
  from attn.ops import performer

  model, params, tokens = _model(attention="performer", position="rope",
                                 attention_options={"num_features": 16, "chunk_size": 4})
  out = decode.generate(model, params, tokens, max_new_tokens=6)
  full = jax.jit(model.apply)({"params": params}, out)  # decoding without a cache
  np.testing.assert_array_equal(out[:, 6:], jnp.argmax(full[:, 5:-1], axis=-1))  # greedy

  step, _, cache = decode._decoder_setup(model, params, tokens, bos_id=1, pad_id=0)
  step = jax.jit(step)
  positions = lambda a, b: jnp.broadcast_to(jnp.arange(a, b), (2, b - a))
  logits, cache = step(cache, out[:, :6], positions(0, 6))
  outputs = [logits]
  for t in range(6, out.shape[1]):
    logits, cache = step(cache, out[:, t:t + 1], positions(t, t + 1))
    outputs.append(logits)
  np.testing.assert_allclose(jnp.concatenate(outputs, axis=1), full, atol=2e-5, rtol=2e-5)

  programs = [str(jax.make_jaxpr(step)(cache, out[:, :1], positions(11, 12))),
              str(jax.make_jaxpr(model.apply)({"params": params}, out))]
  assert not any(re.search(r"\bqr\[", p) for p in programs)
  features = variants.seed_features(0, 16, 8)
  assert features is variants.seed_features(0, 16, 8)  # drawn once
  np.testing.assert_allclose(features, jax.jit(performer.orthogonal_random_features,
                                               static_argnums=(1, 2))(jax.random.key(0), 16, 8),
                             atol=1e-6)


@pytest.mark.parametrize("name", registry.supporting("cross_attention"))
def test_every_cross_attention_mechanism_decodes_like_the_full_forward(name):
  """Every registry entry with the `cross_attention` capability works as the encoder-decoder's
  cross-attention (model.cross_attention): packed and padded sources and targets give finite
  logits, a prefill + single steps equal the full forward, and it is not softmax's."""
  model, params, source = _model("encoder_decoder", cross_attention=name, num_layers=1)
  target = jnp.asarray(np.random.default_rng(1).integers(3, 30, size=(2, 9)), jnp.int32)
  apply = jax.jit(model.apply)
  full = apply({"params": params}, source[:, :6], target)
  packed = apply({"params": params}, source[:, :6], target,
                 inputs_segment_ids=jnp.asarray([[1, 1, 1, 2, 2, 2], [1] * 4 + [0] * 2]),
                 targets_segment_ids=jnp.asarray([[1] * 5 + [2] * 4, [1] * 7 + [0] * 2]))
  assert np.isfinite(np.asarray(packed)).all()
  decoder = model.clone(decode=True)
  encoded = model.apply({"params": params}, source[:, :6], method=EncoderDecoder.encode)
  cache = decoder.init(jax.random.key(0), source[:, :6], jnp.zeros((2, 20), jnp.int32))["cache"]
  outputs = []
  for start, stop in [(0, 3)] + [(t, t + 1) for t in range(3, 9)]:
    positions = jnp.broadcast_to(jnp.arange(start, stop), (2, stop - start))
    logits, state = decoder.apply(
        {"params": params, "cache": cache}, encoded, target[:, start:stop],
        targets_positions=positions, method=EncoderDecoder.decode_logits, mutable=["cache"])
    cache, outputs = state["cache"], [*outputs, logits]
  np.testing.assert_allclose(jnp.concatenate(outputs, axis=1), full, atol=3e-5, rtol=3e-5)
  if name != "softmax" and not hasattr(registry.get(name).module, "pattern"):
    # (a sparsity pattern is softmax at this length; tests/models/test_patterns.py)
    softmax, softmax_params, _ = _model("encoder_decoder", num_layers=1)
    same = jax.tree.structure(softmax_params) == jax.tree.structure(params)
    assert not same or np.max(np.abs(softmax.apply({"params": params}, source[:, :6], target)
                                     - full)) > 1e-5
