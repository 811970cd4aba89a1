"""attn.errors.check_choice: the one check behind every "pick a name from this table" field."""

import pytest

from attn.errors import ConfigError, check_choice
from attn.layers.feedforward import FeedForward
from attn.train import config as config_lib
from attn.train import optimizer


def test_check_choice_names_the_field_and_lists_the_values_in_order():
  check_choice("model.norm", "rmsnorm", {"layernorm": 1, "rmsnorm": 2})
  with pytest.raises(ConfigError, match=r"^model.norm='x' is not one of \['b', 'a'\]\.$"):
    check_choice("model.norm", "x", ("b", "a"))
  assert issubclass(ConfigError, ValueError)


def test_library_tables_use_it():
  with pytest.raises(ConfigError, match=r"model.ffn='mish' is not one of \["):
    FeedForward(kind="mish", hidden_dim=4)
  optim = config_lib.optim_config()
  optim.schedule = "step"
  with pytest.raises(ConfigError, match=r"config.optim.schedule='step' is not one of \['cosine'"):
    optimizer.make_optimizer(optim, num_steps=10)
