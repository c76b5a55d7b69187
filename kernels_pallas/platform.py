"""Where a Pallas kernel runs: interpreted on the CPU, compiled elsewhere, decided per platform.

`per_platform(run, interpret)` calls `run(interpret, platform)` for the platform the program is
*lowered* for (`jax.lax.platform_dependent`), not the one that traced it: a jitted model on the
CPU interprets its kernels, the same model exported for TPU from that CPU host lowers the Mosaic
kernels, and no global switch is involved. An explicit `interpret` (True, False, or a
`pltpu.InterpretParams`) is used as given on every platform.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

# Branch per platform family: the CPU interprets; TPUs compile Mosaic; GPUs (the default branch)
# get the GPU block sizes.
_PLATFORMS = ("cpu", "tpu", "gpu")


def per_platform(run: Callable[[Any, str | None], jax.Array], interpret=None) -> jax.Array:
  """`run(interpret, platform)` with interpret=True on the CPU and False on TPU/GPU (see above)."""
  if interpret is not None:
    return run(interpret, None)
  branches = {p: (lambda p=p: run(p == "cpu", p)) for p in _PLATFORMS}
  return jax.lax.platform_dependent(cpu=branches["cpu"], tpu=branches["tpu"],
                                    default=branches["gpu"])
