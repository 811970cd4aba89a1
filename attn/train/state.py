"""The train state, created shape-first and sharded.

`jax.eval_shape` gives the state's shapes and the parameters' logical axis names without
allocating anything; the shardings follow from `config.mesh.rules`; then one jitted init with
`out_shardings` materializes every array directly on its devices (a model too big for one device
never exists unsharded). The same abstract state is the restore target for checkpoints.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from attn.train import sharding as sharding_lib
from attn.train.tasks import Task


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; a pytree of arrays (checkpointed as is)."""

  step: jax.Array  # int32 scalar: the number of updates applied
  params: Any
  opt_state: Any
  batch_stats: Any  # BatchNorm statistics; {} for models without BatchNorm
  rng: jax.Array  # uint32[2]; step t's dropout key is fold_in(rng, t)


def _init_variables(model: nn.Module, task: Task, key: jax.Array, batch_size: int) -> Any:
  """Boxed variables (LogicallyPartitioned leaves) from a dummy batch."""
  params_key, dropout_key = jax.random.split(key)
  batch = {k: jnp.asarray(v) for k, v in task.dummy_batch(batch_size).items()}
  args, kwargs = task.inputs(batch)
  return model.init({"params": params_key, "dropout": dropout_key}, *args, **kwargs,
                    deterministic=True)


def make_init_fn(model: nn.Module, task: Task, tx: optax.GradientTransformation,
                 batch_size: int) -> Any:
  """seed -> TrainState (unboxed arrays); pure, so it can be eval_shape'd and jitted."""

  def init(seed: jax.Array) -> TrainState:
    key = jax.random.PRNGKey(seed)
    init_key, dropout_key = jax.random.split(key)
    variables = nn.meta.unbox(_init_variables(model, task, init_key, batch_size))
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      batch_stats=variables.get("batch_stats", {}), rng=dropout_key)

  return init


def state_shardings(model: nn.Module, task: Task, tx: optax.GradientTransformation,
                    abstract: TrainState, mesh: Mesh, axis_rules: Any,
                    batch_size: int) -> TrainState:
  """NamedShardings for every leaf of the state."""
  boxed = jax.eval_shape(
    lambda: _init_variables(model, task, jax.random.PRNGKey(0), batch_size)
  )
  variable_shardings = sharding_lib.logical_shardings(boxed, mesh, axis_rules)
  params_shardings = variable_shardings["params"]
  replicated = NamedSharding(mesh, PartitionSpec())
  return TrainState(
    step=replicated,
    params=params_shardings,
    opt_state=sharding_lib.optimizer_shardings(tx, abstract.params, params_shardings, mesh),
    batch_stats=jax.tree.map(lambda _: replicated, abstract.batch_stats),
    rng=replicated,
  )


def abstract_state(model: nn.Module, task: Task, tx: optax.GradientTransformation, mesh: Mesh,
                   axis_rules: Any, batch_size: int) -> tuple[TrainState, TrainState, Any]:
  """(abstract state with shardings, its shardings, the init function); compiles nothing."""
  init = make_init_fn(model, task, tx, batch_size)
  shapes = jax.eval_shape(init, jnp.zeros((), jnp.uint32))
  shardings = state_shardings(model, task, tx, shapes, mesh, axis_rules, batch_size)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          shapes, shardings)
  return abstract, shardings, init


def create_state(init: Any, shardings: TrainState, seed: int) -> TrainState:
  """Materializes the state, each array created on its own devices."""
  seed_array = jnp.asarray(seed % (2**32), jnp.uint32)
  return jax.jit(init, out_shardings=shardings)(seed_array)
