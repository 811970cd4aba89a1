"""attn.viz: captured weights against the reference attention, and the figures it draws."""

import io
import json
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest

from attn import models, viz
from attn.data import ByteTokenizer
from attn.layers import MultiHeadAttention
from attn.ops import reference


def _tiny(kind: str = "lm", **overrides) -> models.ModelConfig:
  values = dict(kind=kind, d_model=16, num_heads=4, num_kv_heads=2, mlp_dim=32, num_layers=2,
                max_len=32)
  return models.ModelConfig(**{**values, **overrides})


def _init(config: models.ModelConfig, *inputs: jax.Array) -> tuple[nn.Module, dict]:
  model = models.build(config)
  # jit: an eager init dispatches op by op, several times slower on these tiny models.
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), *inputs)
  return model, nn.meta.unbox(variables["params"])


def _attention_inputs(model: nn.Module, params: dict, *inputs: jax.Array) -> dict[str, jax.Array]:
  """The input `[B, T, D]` of every MultiHeadAttention call, by module path."""
  seen = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, MultiHeadAttention) and context.method_name == "__call__":
      seen["/".join(context.module.path)] = args[0]
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    model.apply({"params": params}, *inputs)
  return seen


def _project(x: jax.Array, dense: dict) -> jax.Array:
  return jnp.einsum("btd,dnh->btnh", x, dense["kernel"]) + dense["bias"][None, None]


@pytest.mark.parametrize("implementation", ["xla", "blockwise"])
def test_captured_weights_equal_reference_attention(implementation):
  config = _tiny(attention_impl=implementation)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 7), 3, 259)
  model, params = _init(config, tokens)

  captured = viz.capture_attention(model, params, tokens)

  assert sorted(captured) == ["decoder/layer_0/self_attention", "decoder/layer_1/self_attention"]
  inputs = _attention_inputs(model, params, tokens)
  for path, weights in captured.items():
    p = params["decoder"][path.split("/")[1]]["self_attention"]
    x = inputs[path]
    _, expected = reference.attention(_project(x, p["query"]), _project(x, p["key"]),
                                      _project(x, p["value"]), is_causal=True,
                                      return_weights=True)
    assert weights.shape == (2, 4, 7, 7) and weights.dtype == np.float32
    np.testing.assert_allclose(weights, expected, atol=1e-6)


def test_capture_of_a_scanned_remat_stack_matches_the_looped_one():
  tokens = jax.random.randint(jax.random.PRNGKey(1), (1, 6), 3, 259)
  looped, params = _init(_tiny(), tokens)
  scanned = models.build(_tiny(scan_layers=True, remat="full"))
  layers = [params["decoder"].pop(f"layer_{i}") for i in range(2)]
  scanned_params = dict(params, decoder={**params["decoder"], "layers": jax.tree.map(
      lambda *xs: jnp.stack(xs), *layers)})
  params["decoder"].update({f"layer_{i}": layer for i, layer in enumerate(layers)})

  expected = viz.capture_attention(looped, params, tokens)
  got = viz.capture_attention(scanned, {"params": scanned_params}, tokens)

  assert sorted(got) == sorted(expected)
  for path in expected:
    np.testing.assert_allclose(got[path], expected[path], atol=1e-6)


def test_capture_encoder_decoder_and_stack_layers():
  source, target = jnp.ones((2, 5), jnp.int32), jnp.ones((2, 3), jnp.int32)
  model, params = _init(_tiny("encoder_decoder", num_decoder_layers=3), source, target)

  captured = viz.capture_attention(model, params, source, target)

  cross = viz.stack_layers(captured, "cross_attention")
  assert cross.shape == (3, 2, 4, 3, 5)
  np.testing.assert_allclose(cross.sum(-1), 1.0, atol=1e-5)
  assert viz.stack_layers(captured, stack="encoder").shape == (2, 2, 4, 5, 5)
  decoder_self = viz.stack_layers(captured, stack="decoder")
  assert np.all(np.triu(decoder_self, k=1) == 0.0)  # causal
  with pytest.raises(ValueError, match="several"):
    viz.stack_layers(captured, "self_attention")
  encoded = viz.capture_attention(model, params, source, method=models.EncoderDecoder.encode)
  assert sorted(encoded) == ["encoder/layer_0/self_attention", "encoder/layer_1/self_attention"]


def test_attention_rollout_by_hand():
  uniform = np.full((1, 2, 3, 3), 1 / 3)  # [L, N, T, T]: one layer, two uniform heads
  np.testing.assert_allclose(viz.attention_rollout(uniform), 0.5 * uniform[0, 0] + 0.5 * np.eye(3),
                             atol=1e-6)
  rng = np.random.default_rng(0)
  weights = rng.dirichlet(np.ones(5), size=(3, 2, 4, 5))  # [L, B, N, T, T]
  rollout = viz.attention_rollout(weights, residual=False)
  fused = weights.mean(2)
  np.testing.assert_allclose(rollout, fused[2] @ fused[1] @ fused[0], atol=1e-5)
  np.testing.assert_allclose(rollout.sum(-1), 1.0, atol=1e-5)
  relevance = viz.patch_relevance(weights, (2, 2))
  assert relevance.shape == (2, 2, 2)
  np.testing.assert_allclose(relevance.sum((1, 2)), 1.0, atol=1e-5)


def _images(fig) -> list[np.ndarray]:
  return [np.asarray(image.get_array(), np.float64) for ax in fig.axes for image in ax.images]


def _rendered(fig) -> np.ndarray:
  fig.canvas.draw()
  return np.asarray(fig.canvas.buffer_rgba())


def test_attention_grid_axes_labels_and_pixels():
  rng = np.random.default_rng(0)
  weights = rng.dirichlet(np.ones(6), size=(3, 1, 2, 6))  # [L, B, N, T, S]
  tokens = list("abcdef")

  fig = viz.attention_grid(weights, tokens, title="t")

  assert len(fig.axes) == 3 * 2
  rows = np.array(fig.axes).reshape(3, 2)
  assert [t.get_text() for t in rows[-1, 0].get_xticklabels()] == tokens
  assert [t.get_text() for t in rows[1, 0].get_yticklabels()] == tokens
  assert rows[0, 1].get_yticklabels() == [] and rows[0, 1].get_xticklabels() == []
  assert [ax.get_title() for ax in rows[0]] == ["head 0", "head 1"]
  assert rows[2, 0].get_ylabel() == "layer 2"
  assert all(np.isfinite(image).all() for image in _images(fig))
  pixels = _rendered(fig)
  assert pixels.std() > 0 and np.isfinite(pixels).all()

  shared = viz.attention_grid(weights[:, 0], tokens, layers=[0], heads=[1], vmax=1.0)
  assert len(shared.axes) == 1 + 1  # one panel and its colorbar
  np.testing.assert_allclose(_images(shared)[0], weights[0, 0, 1])


def test_attention_grid_labels_64_tokens_and_thins_longer_ones():
  weights = np.full((1, 1, 64, 64), 1 / 64)
  fig = viz.attention_grid(weights, [f"t{i}" for i in range(64)])
  assert len(fig.axes[0].get_xticklabels()) == 64
  long = viz.attention_grid(np.full((100, 100), 0.01), [str(i) for i in range(100)])
  labels = [t.get_text() for t in long.axes[0].get_xticklabels()]
  assert len(labels) <= viz.MAX_LABELS and labels[:2] == ["0", "2"]
  with pytest.raises(ValueError, match="labels"):
    viz.attention_grid(weights, ["too", "few"])


def test_attention_grid_from_a_capture_dict():
  tokens = jnp.asarray([[1, 5, 6, 7]], jnp.int32)
  model, params = _init(_tiny(), tokens)
  captured = viz.capture_attention(model, params, tokens)
  fig = viz.attention_grid(captured, viz.token_labels(tokens[0], ByteTokenizer()))
  assert len(fig.axes) == 2 * 4
  assert fig.axes[0].get_ylabel() == "decoder/layer_0/self_attention"
  assert [t.get_text() for t in fig.axes[0].get_yticklabels()][0] == "<s>"


def test_token_labels():
  tokenizer = ByteTokenizer()
  ids = [1, *tokenizer.encode("a b\n"), 2, 0]
  assert viz.token_labels(ids, tokenizer) == ["<s>", "a", "\u2423", "b", "\\n", "</s>", "<pad>"]
  assert viz.token_labels(np.array([[7, 8]])) == ["7", "8"]
  # Control bytes have no glyph: escaped, so the figure draws without a missing-glyph warning.
  controls = tokenizer.encode("\x7f\x00\x1b")
  assert viz.token_labels(controls, tokenizer) == ["\\x7f", "\\x00", "\\x1b"]
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    fig = viz.attention_grid(np.full((1, 1, 3, 3), 1 / 3), viz.token_labels(controls, tokenizer))
    fig.savefig(io.BytesIO(), format="png")


def test_cross_attention_figure():
  rng = np.random.default_rng(0)
  weights = rng.dirichlet(np.ones(5), size=(2, 3, 4))  # [L, N, T, S]
  fig = viz.cross_attention_figure(weights, list("abcde"), list("wxyz"), title="alignment")
  assert len(fig.axes) == 2
  assert [t.get_text() for t in fig.axes[1].get_xticklabels()] == list("abcde")
  assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == list("wxyz")
  np.testing.assert_allclose(_images(fig)[1], weights[1].mean(0), atol=1e-6)
  one_head = viz.cross_attention_figure(weights, None, None, layers=[1], head=2)
  assert len(one_head.axes) == 1 and "head 2" in one_head.axes[0].get_title()


def test_vit_rollout_figure_and_png(tmp_path):
  config = _tiny("vit", num_kv_heads=None, image_size=8, patch_size=4, num_classes=3)
  images = jax.random.uniform(jax.random.PRNGKey(2), (3, 8, 8, 1), minval=-1, maxval=1)
  model, params = _init(config, images)
  weights = viz.stack_layers(viz.capture_attention(model, params, images), stack="encoder")
  assert weights.shape == (2, 3, 4, 5, 5)  # CLS + 2 x 2 patches

  fig = viz.vit_rollout_figure(images, weights, patch_size=4, labels=["a", "b", "c"])

  assert len(fig.axes) == 2 * 3
  assert fig.axes[0].get_title() == "a"
  assert all(np.isfinite(image).all() for image in _images(fig))
  path = viz.save_attention_png(model, params, images[0], str(tmp_path / "vit.png"))
  assert np.isfinite(matplotlib.image.imread(path)).all()


def test_save_attention_png_of_a_text(tmp_path):
  tokenizer = ByteTokenizer()
  model, params = _init(_tiny(), jnp.ones((1, 4), jnp.int32))
  path = viz.save_attention_png(model, params, "x = 1  # " + "y" * 60,
                                str(tmp_path / "sub" / "attention.png"), tokenizer=tokenizer)
  pixels = matplotlib.image.imread(path)
  assert pixels.ndim == 3 and pixels.shape[0] > 500 and np.isfinite(pixels).all()
  with pytest.raises(ValueError, match="tokenizer"):
    viz.save_attention_png(model, params, "text", str(tmp_path / "x.png"))


def test_learning_curves(tmp_path):
  records = [{"step": s, "split": "train", "loss": 5.0 / s, "accuracy": 0.1 * s} for s in (1, 2, 3)]
  records += [{"step": 3, "split": "eval", "loss": 2.0, "accuracy": 0.2},
              {"step": 2, "split": "train", "loss": 9.0, "accuracy": 0.0}]  # resumed: wins
  for run in ("a", "b"):
    (tmp_path / run).mkdir()
    (tmp_path / run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records))

  assert [r["loss"] for r in viz.read_metrics(str(tmp_path / "a"))
          if r["split"] == "train"] == [5.0, 9.0, 5.0 / 3]
  fig = viz.learning_curves({"run a": str(tmp_path / "a"), "run b": str(tmp_path / "b")},
                            ["loss", "accuracy"])

  assert len(fig.axes) == 2
  assert [ax.get_ylabel() for ax in fig.axes] == ["loss", "accuracy"]
  assert len(fig.axes[0].lines) == 4  # 2 runs x (train, eval)
  assert fig.axes[0].get_legend() is not None
  _rendered(fig)


def test_ablation_bars(tmp_path):
  rows = ["variant,seed,loss,accuracy", "pre,0,2.0,0.5", "pre,1,2.2,0.6", "post,0,3.0,0.4",
          "sandwich,0,,"]  # a failed run: no metrics
  (tmp_path / "results.csv").write_text("\n".join(rows) + "\n")

  fig = viz.ablation_bars(str(tmp_path), "loss", sort=True)

  ax = fig.axes[0]
  assert len(fig.axes) == 1 and len(ax.patches) == 2
  assert [t.get_text() for t in ax.get_xticklabels()] == ["pre", "post"]
  np.testing.assert_allclose([p.get_height() for p in ax.patches], [2.1, 3.0])
  assert "1 without loss" in ax.get_xlabel() and "lower is better" in ax.get_ylabel()
  by_seed = viz.ablation_bars(viz.read_results(str(tmp_path)), "accuracy", by=["variant", "seed"])
  assert len(by_seed.axes[0].patches) == 3
  with pytest.raises(ValueError, match="no column"):
    viz.ablation_bars(str(tmp_path), "bleu")


def test_mechanism_maps_show_implicit_maps_beside_softmax():
  """Captured from real models: softmax's map and the implicit ones of the linear-time
  mechanisms, one panel each (mean of heads of the last layer), a signed map on a scale
  centred on zero."""
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, 200, size=(1, 10)), jnp.int32)
  captured = {}
  for name in ("softmax", "linear", "gated_deltanet"):
    model, params = _init(_tiny(attention=name, num_layers=1, position="none"), tokens)
    captured[name] = viz.stack_layers(viz.capture_attention(model, params, tokens))
  labels = list("abcdefghij")
  fig = viz.mechanism_maps(captured, labels, title="maps")
  images = _images(fig)
  assert [ax.get_title() for ax in fig.axes[:3]] == [
      "softmax, mean of heads", "linear, mean of heads", "gated_deltanet, mean of heads"]
  for image, name in zip(images, captured, strict=True):
    np.testing.assert_allclose(image, captured[name][-1, 0].mean(0), atol=1e-6)
    assert np.all(np.triu(image, 1) == 0)  # causal: nothing above the diagonal
  np.testing.assert_allclose(images[1].sum(-1), 1.0, atol=1e-5)  # linear: rows sum to 1
  assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == labels
  for ax in fig.axes[:3]:
    low, high = ax.images[0].get_clim()
    signed = (ax.images[0].get_array() < 0).any()
    assert (low == -high) if signed else low == 0.0
  one = viz.mechanism_maps({"linear": captured["linear"]}, None, head=1)
  np.testing.assert_allclose(_images(one)[0], captured["linear"][-1, 0, 1], atol=1e-6)
  assert np.isfinite(_rendered(fig)).all()
