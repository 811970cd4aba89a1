"""Every experiment file: each documented arg builds a valid config and ModelConfig, every
sweep expands to named runs, and `runlocal` trains only on embedded data."""

import os
import subprocess
import sys

import pytest

from attn import models, train
from attn.data import registry
from attn.layers import registry as registry_lib
from launch import sweep

REPO = sweep.REPO
# The args each docstring documents (plus runlocal), per experiment file.
DOCUMENTED = {
  "lm": [None, "data=pystdlib,size=small", "size=base", "data=pystdlib_full,size=medium",
         "attention=gqa,position=alibi,size=small", "attention=mqa,position=t5",
         "attention=local,position=sinusoidal", "attention=chunked,size=tiny",
         "size=large,position=learned", "position=none,steps=50", "runlocal"],
  "translate": [None, "data=wmt14", "data=wmt17,size=base", "data=cldr,lang=fr",
                "data=cldr,lang=ja,position=t5", "data=algorithmic,task=sort",
                "data=algorithmic,task=copy,position=rope", "steps=10", "runlocal"],
  "classify": [None, "data=imdb", "data=sst2,pooling=mean", "data=listops_lra,attention=local",
               "pooling=attention,position=rope", "runlocal"],
  "vit": [None, "data=cifar10,size=small", "data=imagenet2012,size=base", "patch=4",
          "position=sinusoidal,pooling=mean", "runlocal"],
  "mqar": [None, "data=long,width=64,attention=local", "data=tiny,attention=chunked",
           "width=256,attention=gqa,lr=0.003",
           "data=l64,width=64,heads=1,embed_init=scaled,position=learned,tie=False",
           "data=l128,batch=32,warmup=20,sweep=defaults", "runlocal"],
  "norm_ablation": [None, "norm=rmsnorm,place=post", "norm=batchnorm,warmup=False,lr=0.001",
                    "place=sandwich", "runlocal"],
  "attention_ablation": [None, "attention=gqa,position=alibi,heads=8", "attention=mqa,position=t5",
                         "position=none", "attention=linear", "attention=bigbird",
                         "attention=chunked", "grid=positions", "pattern=qwen3_next",
                         "pattern=gemma3", "pattern=gated_deltanet+gated", "grid=patterns",
                         "runlocal"],
}
SWEEPS = {"mqar": 48, "norm_ablation": 24,
          # Every mechanism with a causal form, from the registry, plus MHA / GQA / MQA.
          "attention_ablation": 2 + len([m for m in registry_lib.mechanisms().values()
                                         if m.causal])}


def _config(name, arg):
  module, _ = sweep.load_experiment(os.path.join(REPO, "experiments", f"{name}.py"))
  return module.get_config(arg)


@pytest.mark.parametrize("name,arg", [(n, a) for n, args in DOCUMENTED.items() for a in args])
def test_documented_args_build_valid_configs(name, arg):
  config = _config(name, arg)
  train.validate(config)
  model = models.ModelConfig.from_config(config.model)
  assert model.max_len >= config.data.seq_len or model.kind == "vit"
  registry.parse_name(config.data.name)  # a known dataset


def _readme_commands(module: str) -> list[str]:
  """The README's `python -m <module> ...` commands, continuation lines joined."""
  with open(os.path.join(REPO, "README.md")) as f:
    text = f.read().replace("\\\n", " ")
  return [line[line.index("python -m"):] for line in text.splitlines()
          if f"python -m {module} " in line]


def test_readme_commands_on_remote_data_name_a_data_dir():
  """A README command whose config reads a remote dataset (lm.py trains on lm1b at every size
  unless data=pystdlib) passes the data_dir that holds its preparation; the others use
  embedded data, which needs none."""
  commands = _readme_commands("experiments.main") + _readme_commands("launch.tpu_vm up")
  checked = set()
  for command in commands:
    argv = command.strip("`").split()
    if "--config" not in argv:
      continue
    spec = argv[argv.index("--config") + 1]
    path, _, arg = spec.partition(":")
    name = os.path.splitext(os.path.basename(path))[0]
    _, dataset, _ = registry.parse_name(_config(name, arg or None).data.name)
    checked.add((spec, dataset.embedded))
    assert dataset.embedded or "data_dir=" in command, command
  assert ("experiments/lm.py:size=base", False) in checked
  assert ("experiments/lm.py:data=pystdlib,attention=gqa,position=rope,size=small", True) in checked
  assert _config("lm", "size=small").data.name == "lm1b"  # No fallback to pystdlib at any size.


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_runlocal_uses_embedded_data_and_a_tiny_model(name):
  config = _config(name, "runlocal")
  _, spec, _ = registry.parse_name(config.data.name)
  assert spec.embedded, config.data.name
  assert config.train.num_steps <= 10 and config.model.d_model <= 64
  assert config.data.data_dir is None  # nothing remote


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_unknown_args_are_errors(name):
  with pytest.raises(ValueError, match="Unknown experiment argument"):
    _config(name, "no_such_arg=1")


@pytest.mark.parametrize("name,variants", sorted(SWEEPS.items()))
def test_sweeps_expand_to_valid_named_runs(name, variants):
  path = os.path.join(REPO, "experiments", f"{name}.py")
  runs = sweep.plan(path, seeds=2)
  assert len(runs) == 2 * variants
  assert len({r.variant for r in runs}) == variants
  assert len({r.name for r in runs}) == len(runs)
  module, _ = sweep.load_experiment(path)
  for run in runs[:: max(1, len(runs) // 8)]:  # every point builds a valid ModelConfig
    arg = ",".join(f"{k[4:]}={v}" for k, v in run.point.items() if k.startswith("arg."))
    config = module.get_config(arg or None)
    models.ModelConfig.from_config(config.model)
  local = sweep.plan(path + ":runlocal", seeds=2)
  assert len(local) == 4
  assert all("runlocal" in sweep.child_argv(path + ":runlocal", "w", r.point)[4] for r in local)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_runlocal_trains(name, tmp_path):
  """The smoke run of every experiment, through the real command line."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  proc = subprocess.run(
    [sys.executable, "-m", "experiments.main", "--config", f"experiments/{name}.py:runlocal",
     "--workdir", str(tmp_path), "--config.train.progress_bar=False"],
    cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (tmp_path / "summary.json").exists()


def test_attention_preset_says_what_it_turns_off_and_asking_again_is_a_config_error(
    capsys, tmp_path):
  """`attention=bigbird` (no decoding) turns the LM's sample off and says so in one line; asked
  for again (`--config.train.sample_tokens=8`), the trainer refuses before any data is built.
  A text task with a mechanism that handles neither packing nor padding is an error at once."""
  from attn.errors import ConfigError
  from attn.layers import variants
  from experiments import presets

  default = _config("lm", None).train.sample_tokens
  assert default > 0
  config = _config("lm", "attention=bigbird")
  line = capsys.readouterr().out.strip()
  assert line == (f"attention='bigbird': turned off train.sample_tokens {default} -> 0 "
                  f"('bigbird' cannot decode; registry: attn/layers/registry.py)")
  assert config.train.sample_tokens == 0 and config.data.pack
  _config("lm", "attention=linear")
  assert capsys.readouterr().out == ""  # nothing to turn off
  config.train.sample_tokens = 8
  with pytest.raises(ConfigError, match=r"train.sample_tokens=8 cannot sample; set "
                                        r"train.sample_tokens=0 or use one of \['softmax'"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "checkpoints").exists()

  class NoPadding(variants.Softmax):
    pass

  registry_lib.register(name="no_padding", paper="a test", packed=False, padding=False)(NoPadding)
  try:
    with pytest.raises(ConfigError, match="does not support packed sequences.*pick another"):
      presets.set_attention(_config("lm", None), "no_padding")
  finally:
    registry_lib.unregister("no_padding")


def test_attention_ablation_sweeps_hybrid_layer_patterns():
  """grid=patterns: softmax (pattern=none) and the Qwen3-Next and Gemma 3 stacks, each point a
  valid model whose layers follow the pattern (depth a multiple of its length)."""
  path = os.path.join(REPO, "experiments", "attention_ablation.py")
  module, _ = sweep.load_experiment(path)
  points = module.get_sweep("grid=patterns")
  assert [p["arg.pattern"] for p in points] == ["none", "qwen3_next", "gemma3"]
  expected = {"none": (), "qwen3_next": ("gated_deltanet",) * 3 + ("gated",),
              "gemma3": ("local",) * 5 + ("softmax",)}
  for point in points:
    config = module.get_config(f"pattern={point['arg.pattern']}")
    model = models.ModelConfig.from_config(config.model)
    pattern = expected[point["arg.pattern"]]
    assert model.attention_pattern == pattern
    layers = [model.layer_attention(i) for i in range(model.num_layers)]
    assert layers == list(pattern) * (len(layers) // len(pattern)) if pattern else (
        layers == ["softmax"] * 4)
  gemma = models.ModelConfig.from_config(module.get_config("pattern=gemma3").model)
  assert gemma.num_layers == 6 and gemma.attention_options["window"] == 32  # 128 / 4
  qwen = models.ModelConfig.from_config(module.get_config("pattern=qwen3_next").model)
  assert qwen.num_layers == 4 and qwen.attention_options["chunk_size"] == 32
  runs = sweep.plan(path + ":grid=patterns", seeds=2)
  assert len(runs) == 6 and len({r.variant for r in runs}) == 3
  with pytest.raises(ValueError, match="pattern mechanism"):
    module.get_config("pattern=gated_deltanet+flash")
