"""Shared fixtures: one data dir per test worker, where the tiny embedded datasets get prepared."""

from collections.abc import Callable

import ml_collections
import pytest

from attn import data


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
  """A fresh TFDS data dir for this pytest worker (xdist workers never share it)."""
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture
def make_cfg(data_dir: str) -> Callable[..., ml_collections.ConfigDict]:
  """Returns `make_cfg(name, **overrides)` -> a `config.data` reading from `data_dir`."""

  def make(name: str, **overrides) -> ml_collections.ConfigDict:
    cfg = data.default_config()
    cfg.name = name
    cfg.data_dir = data_dir
    for key, value in overrides.items():
      cfg[key] = value
    return cfg

  return make
