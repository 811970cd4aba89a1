"""The device mesh from `config.mesh`, shardings from logical axis names, and batch placement.

Mesh axes: `data` (batch), `fsdp` (batch and parameters), `tensor` (heads, mlp, vocab). The
logical -> mesh mapping is `config.mesh.rules`; parameters carry their logical names, so a
new model needs no sharding code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
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


def _path_key(path: tuple[Any, ...]) -> tuple[str, ...]:
  return tuple(jax.tree_util.keystr((k,), simple=True) for k in path)


def match_param_shardings(tree: Any, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
  """Shardings for an optimizer state: a leaf that ends with a parameter's path and has its
  shape (Adam's moments, momentum) is sharded like that parameter; the rest (counts, Adafactor's
  factored statistics) is replicated. Works for any optax state without knowing its layout."""
  by_path = {}
  for (path, leaf), sharding in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                    jax.tree.leaves(param_shardings), strict=True):
    by_path[_path_key(path)] = (tuple(leaf.shape), sharding)
  replicated = NamedSharding(mesh, PartitionSpec())

  def pick(path: tuple[Any, ...], leaf: Any) -> NamedSharding:
    key = _path_key(path)
    for start in range(len(key)):
      hit = by_path.get(key[start:])
      if hit is not None and hit[0] == tuple(np.shape(leaf)):
        return hit[1]
    return replicated

  return jax.tree_util.tree_map_with_path(pick, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows over data x fsdp, everything else replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def place_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """This process's rows -> global arrays (the global batch is all processes' rows in order)."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}
