"""Device mesh and the sharding rules of the two parallelism modes, in one place.

- `dp`: parameters and optimizer state replicated, each device takes a slice of the batch,
  gradients averaged with `lax.pmean` inside `jax.shard_map` (the pmap pattern).
- `fsdp`: the same batch split, with parameters and optimizer state also sharded over the
  data axis (each array along its largest divisible dimension) under `jax.jit`; XLA
  inserts the all-gathers and reduce-scatters.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh over all devices (of all processes)."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices, (DATA,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], num_shards: int) -> P:
  """Shards the largest dimension that divides evenly; small or indivisible arrays replicate."""
  candidates = [d for d in range(len(shape)) if shape[d] % num_shards == 0 and shape[d] >= num_shards]
  if not candidates or np.prod(shape) < 2 ** 12:
    return P()
  dim = max(candidates, key=lambda d: shape[d])
  return P(*[DATA if d == dim else None for d in range(len(shape))])


def state_shardings(state, mesh: Mesh, parallelism: str):
  """NamedShardings for every array of the train state."""
  if parallelism == "dp":
    return jax.tree.map(lambda _: replicated(mesh), state)
  n = mesh.shape[DATA]
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), n)), state)


def global_batch(local_batch, mesh: Mesh):
  """Assembles each process's rows of a batch into global arrays split over the data axis."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)
