"""Models: analytic parameter counts, causality, padding and packing, scan/remat, sharding."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta
from jax.sharding import NamedSharding, PartitionSpec

from attn.layers import registry
from attn.models import ModelConfig, build, count_params

SMALL = dict(vocab_size=40, d_model=32, num_heads=4, mlp_dim=48, max_len=32, num_layers=2)
POSITIONS = ["sinusoidal", "learned", "rope", "alibi", "t5", "none"]


def _config(**overrides) -> ModelConfig:
  return ModelConfig(**(SMALL | overrides))


def _tokens(seed: int, shape=(2, 12)) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).integers(3, 40, size=shape), jnp.int32)


def _inputs(config: ModelConfig):
  if config.kind == "vit":
    image = np.random.default_rng(0).normal(size=(2, config.image_size, config.image_size,
                                                  config.channels))
    return (jnp.asarray(image, jnp.float32),)
  if config.kind == "encoder_decoder":
    return _tokens(0), _tokens(1, (2, 7))
  return (_tokens(0),)


def expected_param_count(c: ModelConfig) -> int:
  """Written from the architecture, independently of the model code."""
  d, n, k, h, f, v = c.d_model, c.num_heads, c.kv_heads, c.head_size, c.mlp_dim, c.vocab_size
  b = int(c.use_bias)

  def attention(heads=n):
    return d * heads * h + 2 * d * k * h + heads * h * d + b * (heads * h + 2 * k * h + d) + (
        2 * h if c.qk_norm else 0)

  gated = c.ffn in ("swiglu", "geglu")
  ffn = (3 if gated else 2) * d * f + b * ((2 if gated else 1) * f + d)
  norm = d if c.norm == "rmsnorm" else 2 * d
  per_branch = norm * (2 if c.norm_placement == "sandwich" else 1)
  final = 0 if c.norm_placement == "post" else norm

  def stack(layers, cross=False, positions=True):
    block = attention() + ffn + (attention() if cross else 0) + per_branch * (3 if cross else 2)
    pos = 0
    if positions and c.position == "learned":
      pos = c.max_len * d
    if c.position == "t5":
      pos = c.t5_num_buckets * n
    return layers * block + final + pos

  def head():
    pool = {"cls": d, "mean": 0, "attention": d + attention()}[c.pooling]
    return pool + d * c.num_classes + c.num_classes

  embed = v * d
  untied = 0 if c.tie_embeddings else d * v
  if c.kind == "lm":
    return embed + untied + stack(c.num_layers)
  if c.kind == "encoder_decoder":
    return embed + untied + stack(c.num_layers) + stack(c.decoder_layers, cross=True)
  if c.kind == "classifier":
    return embed + stack(c.num_layers) + head()
  grid = c.image_size // c.patch_size
  patch = c.patch_size ** 2 * c.channels * d + d
  pos = grid * grid * d if c.position == "learned" else 0
  return patch + pos + stack(c.num_layers, positions=False) + head()


PARAM_CASES = [
    dict(kind="lm"),
    dict(kind="lm", tie_embeddings=False, ffn="swiglu", num_kv_heads=2, position="learned"),
    dict(kind="lm", norm="rmsnorm", norm_placement="sandwich", use_bias=False, qk_norm=True),
    dict(kind="lm", norm="batchnorm", norm_placement="post", position="t5", num_kv_heads=1),
    dict(kind="classifier", position="learned", ffn="geglu"),
    dict(kind="encoder_decoder", num_decoder_layers=3, position="t5"),
    dict(kind="encoder_decoder", tie_embeddings=False, position="learned", norm="rmsnorm"),
    dict(kind="classifier", pooling="cls", num_classes=5),
    dict(kind="classifier", pooling="attention", num_kv_heads=2),
    dict(kind="classifier", pooling="mean", norm_placement="post"),
    dict(kind="vit", position="learned", pooling="cls", num_classes=10),
    dict(kind="vit", position="sinusoidal", pooling="mean", channels=3, image_size=8),
    dict(kind="lm", scan_layers=True, num_layers=3, head_dim=16),
]


@pytest.mark.parametrize("overrides", PARAM_CASES, ids=lambda o: "-".join(map(str, o.values())))
def test_parameter_count_equals_the_analytic_formula(overrides):
  config = _config(**overrides)
  variables = jax.eval_shape(build(config).init, jax.random.key(0), *_inputs(config))
  assert count_params(variables["params"]) == expected_param_count(config)


@pytest.mark.parametrize("position", POSITIONS)
def test_lm_is_causal_changing_a_later_token_never_changes_earlier_logits(position):
  config = _config(kind="lm", position=position)
  model, tokens = build(config), _tokens(2)
  params = model.init(jax.random.key(0), tokens)
  base = model.apply(params, tokens)
  for s in (3, 7, 11):
    changed = model.apply(params, tokens.at[:, s].set((tokens[:, s] + 1) % 40))
    np.testing.assert_array_equal(changed[:, :s], base[:, :s])
    assert not np.allclose(changed[:, s:], base[:, s:])


# Every causal mechanism of the registry except softmax itself.
CAUSAL = [name for name, m in registry.mechanisms().items() if m.causal and name != "softmax"]


@pytest.mark.parametrize("mechanism", CAUSAL)
def test_lm_with_each_causal_mechanism_is_causal_and_differs_from_softmax(mechanism):
  """A later token never moves earlier logits (to float rounding), and the mechanism replaced
  softmax: different logits on the same parameters, or parameters of its own. Sparsity
  patterns (local, chunked, bigbird, longformer) equal softmax at this length with their
  default sizes; tests/models/test_patterns.py checks them where the pattern matters."""
  config = _config(kind="lm", attention=mechanism, position="none", num_layers=1)
  model, tokens = build(config), _tokens(12)
  params = jax.jit(model.init)(jax.random.key(0), tokens)
  apply = jax.jit(model.apply)
  base = apply(params, tokens)
  changed = apply(params, tokens.at[:, 6].set((tokens[:, 6] + 1) % 40))
  np.testing.assert_allclose(changed[:, :6], base[:, :6], atol=1e-6, rtol=1e-6)
  assert np.max(np.abs(changed[:, 6:] - base[:, 6:])) > 1e-3
  if hasattr(registry.get(mechanism).module, "pattern"):
    return
  softmax = build(_config(kind="lm", position="none", num_layers=1))
  shapes = lambda tree: {jax.tree_util.keystr(path): x.shape for path, x in
                         jax.tree_util.tree_leaves_with_path(meta.unbox(tree))}
  ours, theirs = shapes(params), shapes(jax.eval_shape(softmax.init, jax.random.key(0), tokens))
  if all(ours.get(path) == shape for path, shape in theirs.items()):  # softmax's params and more
    assert np.max(np.abs(base - softmax.apply(params, tokens))) > 1e-5
  else:  # a layer-level mechanism with projections of its own (MLA, Gated DeltaNet, ...)
    assert registry.get(mechanism).level == "layer"


def _segments(lengths, total):
  ids = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] +
                       [np.zeros(total - sum(lengths))])
  pos = np.concatenate([np.arange(n) for n in lengths] + [np.zeros(total - sum(lengths))])
  return jnp.asarray(ids[None], jnp.int32), jnp.asarray(pos[None], jnp.int32)


@pytest.mark.parametrize("norm", ["layernorm", "batchnorm"])
@pytest.mark.parametrize("position", POSITIONS)
def test_packed_lm_rows_equal_the_sequences_run_alone(position, norm):
  config = _config(kind="lm", position=position, norm=norm)
  model = build(config)
  a, b = _tokens(3, (1, 5)), _tokens(4, (1, 4))
  packed = jnp.concatenate([a, b, jnp.zeros((1, 3), jnp.int32)], axis=1)
  segment_ids, positions = _segments([5, 4], 12)
  params = model.init(jax.random.key(0), packed)
  out = model.apply(params, packed, segment_ids=segment_ids, positions=positions)
  np.testing.assert_allclose(out[:, :5], model.apply(params, a), atol=1e-5)
  np.testing.assert_allclose(out[:, 5:9], model.apply(params, b), atol=1e-5)


@pytest.mark.parametrize("pooling", ["cls", "mean", "attention"])
@pytest.mark.parametrize("position", ["sinusoidal", "alibi", "t5"])
def test_classifier_ignores_padding(pooling, position):
  config = _config(kind="classifier", pooling=pooling, position=position, norm="batchnorm")
  model = build(config)
  tokens = _tokens(5, (1, 12))
  segment_ids = jnp.asarray([[1] * 8 + [0] * 4], jnp.int32)
  variables = model.init(jax.random.key(0), tokens, segment_ids=segment_ids)
  # Non-zero head (it is zero-initialized) so that the logits depend on the features.
  variables = jax.tree.map(lambda x: x + 0.1, meta.unbox(variables))
  run = lambda t: model.apply(variables, t, segment_ids=segment_ids, deterministic=False,
                              mutable=["batch_stats"])
  logits, stats = run(tokens)
  other_logits, other_stats = run(tokens.at[:, 8:].set(7))
  np.testing.assert_allclose(other_logits, logits, atol=1e-5)
  jax.tree.map(np.testing.assert_allclose, other_stats, stats)
  alone = model.apply(variables, tokens[:, :8], segment_ids=segment_ids[:, :8],
                      deterministic=False, mutable=["batch_stats"])[0]
  np.testing.assert_allclose(alone, logits, atol=1e-5)


def test_encoder_decoder_packed_equals_separate():
  config = _config(kind="encoder_decoder", position="t5")
  model = build(config)
  src_a, src_b, tgt_a, tgt_b = _tokens(6, (1, 4)), _tokens(7, (1, 5)), _tokens(8, (1, 3)), \
      _tokens(9, (1, 4))
  src = jnp.concatenate([src_a, src_b, jnp.zeros((1, 1), jnp.int32)], axis=1)
  tgt = jnp.concatenate([tgt_a, tgt_b, jnp.zeros((1, 1), jnp.int32)], axis=1)
  src_seg, src_pos = _segments([4, 5], 10)
  tgt_seg, tgt_pos = _segments([3, 4], 8)
  params = model.init(jax.random.key(0), src, tgt)
  packed = model.apply(params, src, tgt, inputs_segment_ids=src_seg, inputs_positions=src_pos,
                       targets_segment_ids=tgt_seg, targets_positions=tgt_pos)
  np.testing.assert_allclose(packed[:, :3], model.apply(params, src_a, tgt_a), atol=1e-5)
  np.testing.assert_allclose(packed[:, 3:7], model.apply(params, src_b, tgt_b), atol=1e-5)


def _stack_layers(params, num_layers):
  """Looped params {layer_i: tree} -> scanned {layers: stacked tree} for the same weights."""
  def convert(tree):
    if isinstance(tree, dict) and "layer_0" in tree:
      rest = {k: convert(v) for k, v in tree.items() if not k.startswith("layer_")}
      layers = [tree[f"layer_{i}"] for i in range(num_layers)]
      return rest | {"layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}
    if isinstance(tree, dict):
      return {k: convert(v) for k, v in tree.items()}
    return tree
  return convert(params)


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_scan_and_remat_compute_the_same_function_and_gradients(remat):
  looped = _config(kind="lm", num_layers=3)
  tokens = _tokens(10)
  params = meta.unbox(build(looped).init(jax.random.key(0), tokens))["params"]
  scanned = _config(kind="lm", num_layers=3, scan_layers=True, remat=remat)
  scanned_params = _stack_layers(params, 3)

  def loss(model, p):
    return jnp.mean(model.apply({"params": p}, tokens) ** 2)

  value, grads = jax.value_and_grad(loss, 1)(build(looped), params)
  scanned_value, scanned_grads = jax.value_and_grad(loss, 1)(build(scanned), scanned_params)
  np.testing.assert_allclose(scanned_value, value, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
               scanned_grads, _stack_layers(grads, 3))


def test_bfloat16_compute_keeps_float32_params_and_logits():
  config = _config(kind="lm", dtype="bfloat16")
  model, tokens = build(config), _tokens(11)
  variables = model.init(jax.random.key(0), tokens)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(meta.unbox(variables)))
  logits = model.apply(variables, tokens)
  full = build(_config(kind="lm")).apply(variables, tokens)
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, full, atol=0.15)


RULES = (("batch", "data"), ("embed", "fsdp"), ("heads", "tensor"), ("kv_heads", "tensor"),
         ("mlp", "tensor"), ("vocab", "tensor"), ("head_dim", None), ("length", None),
         ("layers", None), ("relpos_buckets", None))


@pytest.mark.parametrize("kind", ["lm", "encoder_decoder", "vit"])
def test_sharded_outputs_equal_unsharded_on_8_devices(kind):
  config = _config(kind=kind, scan_layers=kind == "lm", num_kv_heads=2, position="t5"
                   if kind != "vit" else "learned")
  model, inputs = build(config), _inputs(config)
  inputs = tuple(jnp.concatenate([x] * 4) for x in inputs)  # batch 8, divisible by data=2
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  abstract = jax.eval_shape(model.init, jax.random.key(0), *inputs)
  specs = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, RULES)
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    variables = jax.jit(model.init, out_shardings=specs)(jax.random.key(0), *inputs)
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
    sharded_inputs = [jax.device_put(x, batch_sharding) for x in inputs]
    sharded = jax.jit(model.apply)(variables, *sharded_inputs)
  kernel = variables["params"]["embed"]["embedding"]["embedding"] if kind != "vit" else None
  if kernel is not None:
    assert kernel.value.sharding.spec == PartitionSpec("tensor", "fsdp")
  unsharded = model.apply(jax.device_get(meta.unbox(variables)), *inputs)
  np.testing.assert_allclose(sharded, unsharded, atol=2e-5)


@pytest.mark.parametrize("embed_init,std,logit_scale", [("normal", 1.0, 32 ** -0.5),
                                                        ("scaled", 32 ** -0.5, 1.0)])
def test_embed_init_scale_and_tied_logits(embed_init, std, logit_scale):
  """model.embed_init: the token table's std, and tied logits = final hidden . E^T, divided by
  sqrt(D) only for N(0, 1) tables (so both start with unit-scale logits)."""
  config = _config(kind="lm", embed_init=embed_init, vocab_size=2000, position="none")
  model = build(config)
  variables = meta.unbox(model.init(jax.random.key(0), _tokens(0)))
  table = np.asarray(variables["params"]["embed"]["embedding"]["embedding"], np.float64)
  assert abs(table.std() - std) < 0.03 * std
  hidden = {}

  def keep(module, method_name, args, kwargs):  # the input of the tied output projection
    del method_name, kwargs
    if isinstance(module, nn.Embed):
      hidden["x"] = args[0]

  with nn.intercept_methods(lambda f, args, kwargs, ctx: (
      keep(ctx.module, ctx.method_name, args, kwargs) if ctx.method_name == "attend" else None,
      f(*args, **kwargs))[1]):
    logits = model.apply(variables, _tokens(0))
  expected = np.einsum("btd,vd->btv", np.asarray(hidden["x"], np.float64), table) * logit_scale
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_embed_init_is_checked():
  with pytest.raises(ValueError, match="model.embed_init='xavier' is not one of"):
    _config(embed_init="xavier")
