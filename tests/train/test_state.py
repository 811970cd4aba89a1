"""attn.train.state: the optimizer state's shardings come from the parameters' own partitioning
(8 simulated devices, data x fsdp x tensor = 2 x 2 x 2), checked on the materialized arrays."""

import jax
import optax
import pytest
from jax.sharding import PartitionSpec

from attn import models
from attn.data import DataInfo
from attn.train import config as config_lib
from attn.train import sharding as sharding_lib
from attn.train import state as state_lib
from attn.train.optimizer import make_optimizer
from attn.train.tasks import LMTask


def _setup(optim: str):
  config = config_lib.default_config()
  config.mesh.update(data=2, fsdp=2, tensor=2)
  config.model.update(kind="lm", vocab_size=64, d_model=32, num_layers=2, num_heads=4,
                      mlp_dim=64, max_len=16)
  config.optim.update(name=optim, warmup_steps=0, momentum=0.9)
  info = DataInfo(name="fake", task="lm", vocab_size=64, pad_id=0, bos_id=1, eos_id=2,
                  seq_len=16, target_len=16, num_classes=None, image_shape=None, batch_size=8,
                  global_batch_size=8, train_examples=0, eval_examples=0)
  mesh = sharding_lib.make_mesh(config.mesh)
  model = models.build(models.ModelConfig.from_config(config.model))
  tx, _ = make_optimizer(config.optim, num_steps=10)
  with jax.set_mesh(mesh):
    _, shardings, init = state_lib.abstract_state(model, LMTask(info=info), tx, mesh,
                                                  sharding_lib.rules(config.mesh), 8)
    state = state_lib.create_state(init, shardings, seed=0)
  return state


def _param_like(opt_state, params):
  """The subtrees of the optimizer state laid out like the parameters (moments, momentum)."""
  structure = jax.tree.structure(params)
  found = []

  def walk(node):
    if jax.tree.structure(node) == structure:
      found.append(node)
    elif isinstance(node, (tuple, list)):  # optax states are (named) tuples
      for child in node:
        walk(child)
    elif isinstance(node, dict):
      for child in node.values():
        walk(child)

  walk(opt_state)
  return found


@pytest.mark.parametrize("optim,moments", [("adamw", 2), ("lion", 1), ("sgd", 1)])
def test_every_moment_has_its_parameters_sharding(optim, moments):
  state = _setup(optim)
  trees = _param_like(state.opt_state, state.params)
  assert len(trees) == moments
  param_specs = [p.sharding.spec for p in jax.tree.leaves(state.params)]
  for tree in trees:
    assert [m.sharding.spec for m in jax.tree.leaves(tree)] == param_specs
  # Not vacuous: parameters really are split over fsdp and tensor.
  used = {axis for spec in param_specs for part in spec if part
          for axis in (part if isinstance(part, tuple) else (part,))}
  assert {"fsdp", "tensor"} <= used
  if optim == "adamw":
    (adam,) = [s for s in jax.tree.leaves(
      state.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
      if isinstance(s, optax.ScaleByAdamState)]
    assert adam.count.sharding.spec == PartitionSpec()


def test_adafactor_factored_statistics_are_replicated():
  state = _setup("adafactor")
  params = jax.tree.leaves(state.params)
  shapes = {tuple(p.shape) for p in params}
  stats = [x for x in jax.tree.leaves(state.opt_state) if x.ndim]
  # Row / column statistics have other shapes than any parameter and live replicated; a full
  # second moment (vectors) has its parameter's shape and sharding.
  factored = [x for x in stats if tuple(x.shape) not in shapes]
  assert factored and all(x.sharding.spec == PartitionSpec() for x in factored)
