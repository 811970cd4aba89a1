"""The device mesh from `config.mesh`, shardings from logical axis names, and batch placement.

Mesh axes: `data` (batch), `fsdp` (batch and parameters), `tensor` (heads, mlp, vocab). The
logical -> mesh mapping is `config.mesh.rules`; parameters carry their logical names, so a
new model needs no sharding code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from attn.train.config import MESH_AXES, ConfigError

BATCH_AXES = ("data", "fsdp")


def mesh_shape(cfg: Any, num_devices: int) -> tuple[int, ...]:
  """Resolves -1 and checks that the axis sizes use exactly `num_devices` devices."""
  sizes = [int(cfg[a]) for a in MESH_AXES]
  given = dict(zip(MESH_AXES, sizes, strict=True))
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(
        f"config.mesh {given}: the fixed axes ({known} devices) do not divide the "
        f"{num_devices} available devices."
      )
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    # jax.make_mesh would silently use a subset of the devices: a run that wastes hardware.
    raise ConfigError(
      f"config.mesh {dict(zip(MESH_AXES, sizes, strict=True))} uses {math.prod(sizes)} "
      f"devices but {num_devices} are available; make the sizes multiply to {num_devices} "
      "(or set one to -1)."
    )
  return tuple(sizes)


def make_mesh(cfg: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The mesh over all devices (or `devices`), with Auto axes so jit propagates shardings."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def rules(cfg: Any) -> tuple[tuple[str, Any], ...]:
  """`config.mesh.rules` as the tuple of pairs flax expects."""
  return tuple((str(name), tuple(axes) if isinstance(axes, list) else axes)
               for name, axes in cfg.rules)


def check_model_fits(mesh: Mesh, model_cfg: Any, *, batch_size: int, grad_accum_steps: int,
                     process_count: int) -> None:
  """Divisibility of the batch and the sharded model dimensions by the mesh axes."""
  batch_ways = mesh.shape["data"] * mesh.shape["fsdp"]
  micro = batch_size // grad_accum_steps
  if micro % batch_ways:
    raise ConfigError(
      f"config.train.batch_size ({batch_size}) / grad_accum_steps ({grad_accum_steps}) = {micro} "
      f"rows per micro-batch must be divisible by mesh data x fsdp = {batch_ways}."
    )
  if batch_size % process_count:
    raise ConfigError(f"config.train.batch_size ({batch_size}) must be divisible by the "
                      f"number of processes ({process_count}).")
  tensor = mesh.shape["tensor"]
  if tensor > 1:
    for name in ("num_heads", "kv_heads", "mlp_dim", "vocab_size"):
      value = getattr(model_cfg, name)
      if value % tensor:
        field = "num_kv_heads" if name == "kv_heads" else name
        raise ConfigError(f"config.model.{field} ({value}) must be divisible by "
                          f"config.mesh.tensor ({tensor}); change one of them.")
  fsdp = mesh.shape["fsdp"]
  if fsdp > 1 and model_cfg.d_model % fsdp:
    raise ConfigError(f"config.model.d_model ({model_cfg.d_model}) must be divisible by "
                      f"config.mesh.fsdp ({fsdp}).")


def logical_shardings(boxed_tree: Any, mesh: Mesh, axis_rules: Any) -> Any:
  """NamedShardings for a tree of (abstract) LogicallyPartitioned leaves; others replicated."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, axis_rules)


@flax.struct.dataclass
class _Tagged:
  """A parameter carrying its sharding and shape through `tx.init` (as pytree metadata)."""

  value: Any
  sharding: NamedSharding = flax.struct.field(pytree_node=False)
  shape: tuple[int, ...] = flax.struct.field(pytree_node=False)


def optimizer_shardings(tx: optax.GradientTransformation, abstract_params: Any,
                        param_shardings: Any, mesh: Mesh) -> Any:
  """Shardings for `tx.init(params)`, derived from the parameters' (flax's sharding guide).

  `tx.init` runs under `jax.eval_shape` (nothing is allocated) on the parameters, each tagged
  with its sharding; optax builds its per-parameter state by mapping over the parameter tree,
  so every leaf made from a parameter comes back with that parameter's tag (as flax's
  LogicallyPartitioned boxes carry axis names through `tx.init`). Such a leaf of the
  parameter's shape (Adam's moments, momentum) gets the parameter's sharding; the rest
  (step counts, Adafactor's factored row / column statistics) is replicated.
  """
  tagged = jax.tree.map(lambda p, s: _Tagged(p, s, tuple(p.shape)), abstract_params,
                        param_shardings)
  state = jax.eval_shape(tx.init, tagged)
  replicated = NamedSharding(mesh, PartitionSpec())

  def pick(leaf: Any) -> NamedSharding:
    if isinstance(leaf, _Tagged) and tuple(leaf.value.shape) == leaf.shape:
      return leaf.sharding
    return replicated

  return jax.tree.map(pick, state, is_leaf=lambda x: isinstance(x, _Tagged))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows over data x fsdp, everything else replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def place_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """This process's rows -> global arrays (the global batch is all processes' rows in order)."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}
