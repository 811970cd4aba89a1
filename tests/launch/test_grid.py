"""launch.grid: expansion (grid, zip, product, seeds), names, filters and early checks."""

import ml_collections
import pytest

from launch import grid


def test_grid_is_the_cartesian_product_first_axis_slowest():
  points = grid.grid({"model.norm": ["layernorm", "rmsnorm"], "optim.learning_rate": [1e-3, 3e-3]})
  assert points == [
    {"model.norm": "layernorm", "optim.learning_rate": 1e-3},
    {"model.norm": "layernorm", "optim.learning_rate": 3e-3},
    {"model.norm": "rmsnorm", "optim.learning_rate": 1e-3},
    {"model.norm": "rmsnorm", "optim.learning_rate": 3e-3},
  ]


def test_zipped_moves_axes_together_and_needs_equal_lengths():
  points = grid.zipped({"model.norm_placement": ["pre", "post"], "optim.warmup_steps": [0, 100]})
  assert points == [{"model.norm_placement": "pre", "optim.warmup_steps": 0},
                    {"model.norm_placement": "post", "optim.warmup_steps": 100}]
  with pytest.raises(ValueError, match="one length"):
    grid.zipped({"a": [1, 2], "b": [1]})


def test_product_merges_and_rejects_a_key_from_two_sweeps():
  points = grid.product(grid.grid({"a": [1, 2]}), grid.zipped({"b": [3, 4], "c": [5, 6]}))
  assert points == [{"a": 1, "b": 3, "c": 5}, {"a": 1, "b": 4, "c": 6},
                    {"a": 2, "b": 3, "c": 5}, {"a": 2, "b": 4, "c": 6}]
  with pytest.raises(ValueError, match="two sweeps"):
    grid.product(grid.grid({"a": [1]}), grid.grid({"a": [2]}))


def test_bad_axes_are_errors():
  with pytest.raises(ValueError, match="list of values"):
    grid.grid({"a": "abc"})
  with pytest.raises(ValueError, match="empty"):
    grid.grid({"a": []})


def test_seeds_multiply_points_except_pinned_ones():
  points = grid.with_seeds([{"a": 1}, {"a": 2, "seed": 7}], range(3))
  assert points == [{"a": 1, "seed": 0}, {"a": 1, "seed": 1}, {"a": 1, "seed": 2},
                    {"a": 2, "seed": 7}]


def test_names_are_readable_short_and_unique():
  points = grid.with_seeds(grid.grid({"model.norm": ["rmsnorm"], "optim.learning_rate": [3e-4],
                                      "arg.size": ["small"]}), [0])
  assert grid.name_runs(points)[0][0] == "norm=rmsnorm,learning_rate=0.0003,size=small,seed=0"
  # Two keys with the same last component keep enough of their path to tell them apart.
  labels = grid.short_keys([{"model.dropout_rate": 0.1, "data.dropout_rate": 0.2}])
  assert labels == {"model.dropout_rate": "model.dropout_rate",
                    "data.dropout_rate": "data.dropout_rate"}
  assert grid.run_name({}) == "base"
  assert (grid.run_name({"model.use_bias": False, "model.x": (1, 2)})
          == "model.use_bias=False,model.x=1x2")
  with pytest.raises(ValueError, match="share the name"):
    grid.name_runs([{"a": 1}, {"a": 1}])


def test_unsafe_characters_are_replaced_and_hashed():
  a = grid.run_name({"train.sample_prompt": 'a b; rm -rf x "q"'})
  b = grid.run_name({"train.sample_prompt": 'a_b;_rm -rf x "q"'})
  assert a != b
  assert all(c.isalnum() or c in "._=,+-" for c in a)
  assert a.startswith("train.sample_prompt=a_b__rm_-rf_x__q_-")
  long = grid.run_name({"k": "v" * 500})
  assert len(long) <= 130


def test_filter_is_a_regex_on_the_name_and_all_must_match():
  named = grid.name_runs(grid.with_seeds(grid.grid({"n": ["layernorm", "rmsnorm"]}), range(2)))
  assert [n for n, _ in grid.select(named, ["rmsnorm"])] == ["n=rmsnorm,seed=0", "n=rmsnorm,seed=1"]
  assert [n for n, _ in grid.select(named, ["layer", "seed=1"])] == ["n=layernorm,seed=1"]
  assert len(grid.select(named, [])) == 4


def test_check_points_catches_typos_and_unpassable_values_early():
  config = ml_collections.ConfigDict({"seed": 0, "model": {"norm": "layernorm"}})
  grid.check_points([{"model.norm": "rmsnorm", "seed": 1, "arg.size": "small"}], config)
  with pytest.raises(ValueError, match="not a field"):
    grid.check_points([{"model.nrom": "rmsnorm"}], config)
  with pytest.raises(ValueError, match="cannot be passed"):
    grid.check_points([{"model.norm": None}], config)
  with pytest.raises(ValueError, match="plain value"):
    grid.check_points([{"arg.size": "a,b"}], config)


def test_merge_arg_appends_the_points_experiment_args():
  point = {"arg.attention": "gqa", "model.norm": "rmsnorm", "arg.lr": 0.001}
  assert grid.merge_arg("runlocal", point) == "runlocal,attention=gqa,lr=0.001"
  assert grid.merge_arg(None, {"model.norm": "x"}) is None
  assert grid.config_overrides(point) == {"model.norm": "rmsnorm"}
