"""Where a Pallas kernel runs: interpreted on the CPU, compiled elsewhere, decided per platform.

`per_platform(run, interpret)` calls `run(interpret, platform)` for the platform the program is
*lowered* for (`jax.lax.platform_dependent`), not the one that traced it: a jitted model on the
CPU interprets its kernels, the same model exported for TPU or a GPU from that CPU host lowers the
Mosaic-TPU or Triton kernels, and no global switch is involved. An explicit `interpret` (True,
False, or a `pltpu.InterpretParams`) is used as given on every platform.

Kernel backends: "mosaic_tpu" (TPUs, and the CPU's interpreter by default) and "triton" (GPUs,
NVIDIA through CUDA and AMD through ROCm: Pallas's Triton lowering serves both). `backend_for`
maps a platform to its backend. GPU block sizes are chosen per device kind (`gpu_device_kind`):
the local GPU, or the abstract device of `jax.sharding.use_abstract_mesh` when a program is
lowered for a GPU from another host.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

# Branch per platform family: the CPU interprets; TPUs compile Mosaic; GPUs (the default branch:
# cuda and rocm) compile Triton.
_PLATFORMS = ("cpu", "tpu", "gpu")
BACKENDS = ("mosaic_tpu", "triton")


def per_platform(run: Callable[[Any, str | None], jax.Array], interpret=None) -> jax.Array:
  """`run(interpret, platform)` with interpret=True on the CPU and False on TPU/GPU (see above)."""
  if interpret is not None:
    return run(interpret, None)
  branches = {p: (lambda p=p: run(p == "cpu", p)) for p in _PLATFORMS}
  return jax.lax.platform_dependent(cpu=branches["cpu"], tpu=branches["tpu"],
                                    default=branches["gpu"])


def backend_for(platform: str | None, backend: str | None = None) -> str:
  """The kernel backend for a platform family ("cpu", "tpu", "gpu"; None: this process's
  backend), unless `backend` names one: Triton on GPUs, Mosaic TPU elsewhere (the CPU runs the
  Mosaic-TPU kernel in the interpreter)."""
  if backend is not None:
    if backend not in BACKENDS:
      raise ValueError(f"kernel backend {backend!r}: expected one of {BACKENDS}")
    return backend
  platform = platform or jax.default_backend()
  return "triton" if platform in ("gpu", "cuda", "rocm") else "mosaic_tpu"


def gpu_device_kind() -> str | None:
  """The GPU a program is being lowered for, as its `device_kind` ("NVIDIA H100 80GB HBM3",
  "gfx942", ...): the abstract device of the current `jax.sharding.use_abstract_mesh`, else the
  first local GPU; None when neither is known (block sizes then take their generic defaults)."""
  abstract = jax.sharding.get_abstract_mesh().abstract_device
  if abstract is not None and abstract.platform in ("gpu", "cuda", "rocm"):
    return abstract.device_kind
  if jax.default_backend() == "gpu":
    return jax.devices()[0].device_kind
  return None


def abstract_gpu(device_kind: str = "NVIDIA H100 80GB HBM3"):
  """Context manager naming the GPU to lower for from a host without one (`jax.export` with
  platforms=("cuda",) or ("rocm",)): Pallas's Triton lowering reads the device's compute
  capability from it (jax >= 0.12; older CPU-only jaxlibs refuse GPU Pallas lowering outright).
  An empty mesh: nothing is sharded, only the device is named."""
  mesh = jax.sharding.AbstractMesh((), (), abstract_device=jax.sharding.AbstractDevice(
      device_kind, None, "gpu"))
  return jax.sharding.use_abstract_mesh(mesh)
