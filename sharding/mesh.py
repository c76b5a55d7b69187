"""Device meshes over the four parallelism axes, and multi-process start-up.

Axes, outermost first (the order matters on TPU: inner axes get the fastest links):
  data    pure data parallelism (parameters replicated);
  fsdp    data parallelism with parameters, gradients and optimizer state sharded (gathered per
          layer by XLA);
  expert  routed experts sharded; token copies exchanged with all-to-all;
  tensor  attention heads and MLP columns sharded.
Axis types are Auto (GSPMD propagation from the parameter and input shardings).

On a multi-slice TPU pod (devices with `slice_index`), `data` spans the slices (data-centre
network) and the other axes stay within a slice (ICI) unless `dcn=` says otherwise.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils

AXES = ("data", "fsdp", "expert", "tensor")


def resolve_sizes(sizes: dict[str, int], n_devices: int) -> dict[str, int]:
  """Replaces one -1 by what the other axes leave; checks the product is the device count."""
  given = ", ".join(f"{a}={s}" for a, s in sizes.items())
  free = [a for a, s in sizes.items() if s == -1]
  bad = [a for a, s in sizes.items() if s != -1 and s < 1]
  if bad or len(free) > 1:
    raise ValueError(f"mesh {given}: axis sizes must be >= 1, with at most one -1 "
                     f"(the rest of the {n_devices} devices)")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if n_devices % fixed:
      raise ValueError(f"mesh {given}: the fixed axes' product {fixed} does not divide the "
                       f"{n_devices} devices")
    sizes = dict(sizes, **{free[0]: n_devices // fixed})
  total = math.prod(sizes.values())
  if total != n_devices:
    raise ValueError(f"mesh {given}: the axes' product is {total} but there are {n_devices} "
                     "devices; make the product equal the device count (or give one axis -1)")
  return sizes


def device_grid(sizes: dict[str, int], devices: Sequence, dcn: dict[str, int] | None = None
                ) -> np.ndarray:
  """The devices arranged as an array of shape `sizes` (axes in AXES order).

  Granules are TPU slices (`slice_index`); with `dcn` on devices without slices, processes.
  `dcn` ({"data": 2}) says how many granules each axis spans; the rest of each axis lies within a
  granule (fast links). With several slices and no `dcn`, `data` spans them.
  """
  shape = tuple(sizes[a] for a in AXES)
  slices = {getattr(d, "slice_index", 0) or 0 for d in devices}
  if dcn is None and len(slices) > 1:
    dcn = {"data": len(slices)}
  if dcn:
    unknown = set(dcn) - set(AXES)
    if unknown:
      raise ValueError(f"dcn {dcn}: unknown axes {sorted(unknown)}; expected {AXES}")
    granules = len(slices) if len(slices) > 1 else len({d.process_index for d in devices})
    dcn_shape = tuple(int(dcn.get(a, 1)) for a in AXES)
    if math.prod(dcn_shape) != granules:
      kind = "slices" if len(slices) > 1 else "processes"
      raise ValueError(f"dcn {dcn}: its product {math.prod(dcn_shape)} must equal the "
                       f"{granules} {kind} the devices span")
    bad = [a for a, s, g in zip(AXES, shape, dcn_shape) if s % g]
    if bad:
      raise ValueError(f"mesh {sizes} with dcn {dcn}: axes {bad} do not divide by the number of "
                       "granules they span (each granule must hold an equal part)")
    ici_shape = tuple(s // g for s, g in zip(shape, dcn_shape))
    return mesh_utils.create_hybrid_device_mesh(
        ici_shape, dcn_shape, devices, process_is_granule=len(slices) == 1,
        allow_split_physical_axes=True)
  if devices[0].platform in ("tpu", "gpu", "cuda", "rocm"):
    return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  return np.asarray(devices, dtype=object).reshape(shape)


def make_mesh(data: int = 1, fsdp: int = 1, expert: int = 1, tensor: int = 1, *,
              devices: Sequence[jax.Device] | None = None,
              dcn: dict[str, int] | None = None) -> jax.sharding.Mesh:
  """A mesh with axes ("data", "fsdp", "expert", "tensor") over `devices` (default: all).

  Sizes are totals over all devices; one axis may be -1 for "the rest". Raises ValueError naming
  the axes and the device count when their product is not the number of devices. On multi-slice
  TPU pods `dcn` ({"data": 2} by default) says which axes span slices; see `device_grid`.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = resolve_sizes(dict(zip(AXES, (data, fsdp, expert, tensor))), len(devices))
  grid = device_grid(sizes, devices, dcn)
  return jax.sharding.Mesh(grid, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def parse_mesh(text: str) -> dict[str, int]:
  """`"data=1,fsdp=64,expert=4"` -> {"data": 1, "fsdp": 64, "expert": 4, "tensor": 1}."""
  sizes = dict.fromkeys(AXES, 1)
  for item in filter(None, (s.strip() for s in text.split(","))):
    name, sep, value = item.partition("=")
    if not sep or name.strip() not in AXES:
      raise ValueError(f"--mesh item {item!r}: expected axis=size with axis one of {AXES}")
    try:
      size = int(value)
    except ValueError:
      raise ValueError(f"--mesh item {item!r}: size {value!r} is not an integer") from None
    if size < 1 and size != -1:
      raise ValueError(f"--mesh item {item!r}: a size must be >= 1 (or -1 for the rest of the "
                       "devices)")
    sizes[name.strip()] = size
  return sizes


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_device_ids: Sequence[int] | None = None,
               initialization_timeout: int = 300) -> None:
  """Joins a multi-process run (`jax.distributed.initialize`); call before any other JAX use.

  Without arguments the cluster is detected (TPU pods, SLURM, Open MPI); otherwise pass the
  coordinator "host:port", the process count and this process's id. CPU processes exchange
  through gloo collectives.
  """
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kw = {}
  if local_device_ids is not None:
    kw["local_device_ids"] = list(local_device_ids)
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             initialization_timeout=initialization_timeout, **kw)
