"""Device mesh and the sharding rules of the two parallelism modes, in one place.

- `dp`: parameters and optimizer state replicated, each device takes a slice of the batch,
  gradients averaged with `lax.pmean` inside `jax.shard_map` (the pmap pattern).
- `fsdp`: the same batch split, with parameters and optimizer state also sharded over the
  data axis (each array along its largest divisible dimension) under `jax.jit`; XLA
  inserts the all-gathers and reduce-scatters.
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"


MAX_CPU_DEVICES = 8


def cpu_device_count(cores: int, batch_sizes: tuple[int, ...]) -> int:
  """The most devices (at most one per core, MAX_CPU_DEVICES) that divide every batch size."""
  common = math.gcd(*batch_sizes)
  return max(d for d in range(1, min(cores, MAX_CPU_DEVICES) + 1) if common % d == 0)


def split_cpu_into_devices(*batch_sizes: int) -> int:
  """Makes the host CPU one XLA device per core, so a single-process run is data parallel
  across cores. For small models this beats XLA:CPU's threading inside each op: 1.5x on the
  gpt_shakespeare:baby step on 2 cores (benchmarks/results/gpt_vs_pytorch.md). Call it before
  JAX first touches a device; an explicit device count in XLA_FLAGS wins. Returns the count."""
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" in flags:
    count = int(flags.split("xla_force_host_platform_device_count=")[1].split()[0])
  else:
    count = cpu_device_count(len(os.sched_getaffinity(0)), batch_sizes)
    flags = f"{flags} --xla_force_host_platform_device_count={count}"
  os.environ["XLA_FLAGS"] = patient_cpu_collectives(flags)
  return count


def patient_cpu_collectives(flags: str) -> str:
  """`flags` plus long XLA:CPU collective timeouts, unless they are set. Each CPU device is a
  thread; on a loaded host one can reach an all-reduce tens of seconds after the others, and
  XLA:CPU's default then aborts the process after 40 s (measured: a busy 2-core machine
  killed a 2-device speedrun run this way)."""
  for name, seconds in (("xla_cpu_collective_call_terminate_timeout_seconds", 3600),
                        ("xla_cpu_collective_call_warn_stuck_timeout_seconds", 600)):
    if name not in flags:
      flags = f"{flags} --{name}={seconds}"
  return flags.strip()


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


def global_batch(batch, mesh: Mesh):
  """A whole batch (the same on every process) as global arrays split over the data axis;
  each process copies only the rows of its own devices."""
  sharding = batch_sharding(mesh)

  def place(x):
    x = np.asarray(x)
    if x.shape[0] % mesh.size:
      raise ValueError(f"a batch of {x.shape[0]} rows does not split over {mesh.size} devices")
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(place, batch)
