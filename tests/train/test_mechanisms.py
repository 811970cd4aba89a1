"""The end-to-end matrix: every registry mechanism x every model kind, through the trainer.

For each pair the mechanism supports: `train_and_evaluate` on embedded data through the real
task (the experiment file's `runlocal` config, packed where the task packs), loss finite and
below its first step, and `generate` where the mechanism decodes (the LM's sample, the
encoder-decoder's BLEU decoding). Each mechanism also checkpoints and resumes once (its first
kind). Every unsupported pair is a ConfigError raised before the data is built. Parametrized
from the registry: a new mechanism is covered without editing this file.
"""

import json
import math
import os

import pytest

from attn import train
from attn.errors import ConfigError
from attn.layers import registry
from experiments import presets
from launch import sweep
from tests.train.conftest import losses

# Model kind -> the experiment file whose runlocal config trains it on embedded data.
EXPERIMENTS = {"lm": "lm", "encoder_decoder": "translate", "classifier": "classify", "vit": "vit"}
assert tuple(EXPERIMENTS) == registry.KINDS
MECHANISMS = registry.mechanisms()


STEPS = 10  # compiling dominates: steps are nearly free, and 4 were noise for the classifiers


def _config(kind: str, mechanism: str, data_dir: str, *, steps: int = STEPS):
  module, _ = sweep.load_experiment(os.path.join(sweep.REPO, "experiments",
                                                 f"{EXPERIMENTS[kind]}.py"))
  config = module.get_config("runlocal")
  config.data.data_dir = data_dir
  entry = registry.get(mechanism)
  presets.set_attention(config, mechanism)  # data.pack=False where it cannot pack
  config.model.update(d_model=16, num_layers=1, num_heads=2, mlp_dim=32, dropout_rate=0.0)
  # decay_steps fixed, so the resume below (a half run continued to the end) keeps one schedule.
  config.optim.update(learning_rate=1e-2, warmup_steps=0, schedule="constant", clip_norm=1.0,
                      decay_steps=steps)
  config.train.update(num_steps=steps, batch_size=8, eval_every=steps, eval_steps=1,
                      checkpoint_every=steps // 2, log_every=1, progress_bar=False,
                      async_checkpoints=False)
  decodes = entry.decoding is not None
  config.train.sample_tokens = 3 if decodes and kind == "lm" else 0
  config.train.bleu_batches = 1 if decodes and kind == "encoder_decoder" else 0
  if kind == "encoder_decoder":
    config.data.seq_len = config.data.target_len = 16
    presets.fit_lengths(config)
  return config


def _pairs(supported: bool):
  out = []
  for name, entry in MECHANISMS.items():
    for kind in EXPERIMENTS:
      if (kind in entry.kinds) == supported:
        out.append(pytest.param(name, kind, id=f"{name}-{kind}"))
  return out


def _first_kind(name: str) -> str:
  return next(kind for kind in EXPERIMENTS if kind in MECHANISMS[name].kinds)


@pytest.mark.parametrize("name, kind", _pairs(supported=True))
def test_every_mechanism_trains_every_kind_it_supports(name, kind, data_dir, tmp_path):
  entry = MECHANISMS[name]
  workdir = str(tmp_path / "run")
  resume = kind == _first_kind(name)
  config = _config(kind, name, data_dir)
  half = STEPS // 2
  if resume:  # Stop after the half-way checkpoint, then the same command resumes.
    first = config.copy_and_resolve_references()
    first.train.num_steps = half
    assert train.train_and_evaluate(first, workdir)["step"] == half
  result = train.train_and_evaluate(config, workdir)
  assert result["step"] == STEPS
  logged = losses(workdir)
  assert sorted(logged) == list(range(1, STEPS + 1))
  assert all(math.isfinite(v) for v in logged.values())
  # The tiny classifiers start at exactly log(classes) (zero-initialized head) and move slowly
  # at this budget: the contract is that training goes below the first step's loss.
  assert min(logged[s] for s in range(2, STEPS + 1)) < logged[1], logged
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  if resume:
    assert summary["steps_this_run"] == STEPS - half
  if entry.decoding is not None and kind == "lm":
    assert isinstance(summary["sample"], str)
  if entry.decoding is not None and kind == "encoder_decoder":
    assert "chrf" in result


def _no_data(*args, **kwargs):
  raise AssertionError("the data was built before the config error")


@pytest.mark.parametrize("name, kind", _pairs(supported=False))
def test_unsupported_kinds_fail_before_the_data_is_built(name, kind, data_dir, tmp_path):
  config = _config(_first_kind(name), name, data_dir)
  config.model.kind = kind
  with pytest.raises(ConfigError, match=rf"model.attention='{name}' cannot be used in "
                                        rf"model.kind='{kind}'"):
    train.train_and_evaluate(config, str(tmp_path), make_data=_no_data)


@pytest.mark.parametrize("name", [n for n, e in MECHANISMS.items() if e.decoding is None
                                  and "lm" in e.kinds])
def test_sampling_with_a_mechanism_that_cannot_decode_is_a_config_error(name, data_dir, tmp_path):
  config = _config("lm", name, data_dir)
  config.train.sample_tokens = 8
  with pytest.raises(ConfigError, match=rf"model.attention='{name}' cannot decode.*set "
                                        r"train.sample_tokens=0"):
    train.train_and_evaluate(config, str(tmp_path), make_data=_no_data)


@pytest.mark.parametrize("name", [n for n, e in MECHANISMS.items() if not e.packed
                                  and "lm" in e.kinds])
def test_packed_data_with_a_mechanism_that_cannot_pack_is_a_config_error(name, data_dir,
                                                                        tmp_path):
  config = _config("lm", name, data_dir)
  config.data.pack = True
  with pytest.raises(ConfigError, match=rf"model.attention='{name}' does not support packed "
                                        r"sequences.*set data.pack=False"):
    train.train_and_evaluate(config, str(tmp_path), make_data=_no_data)


@pytest.mark.parametrize("name", [n for n, e in MECHANISMS.items() if not e.cross_attention])
def test_cross_attention_without_the_capability_is_a_config_error(name, data_dir, tmp_path):
  """model.cross_attention is read from the registry's `cross_attention` capability: a
  mechanism without it in an encoder-decoder stops the run before the data is built, naming
  the field and the mechanisms that fit (what `python -m experiments.main --config
  experiments/translate.py --config.model.cross_attention=NAME` prints)."""
  config = _config("encoder_decoder", "softmax", data_dir)
  config.model.cross_attention = name
  with pytest.raises(ConfigError, match=rf"model.cross_attention='{name}' cannot attend to "
                                        rf"another sequence.*one of \['softmax'"):
    train.train_and_evaluate(config, str(tmp_path), make_data=_no_data)
