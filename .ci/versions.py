"""One line naming a stack: its Python and the versions that define it (run by `make test`)."""
import platform
import sys
from importlib import metadata

DISTS = ["jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "torch", "transformers"]


def version(dist: str) -> str:
  try:
    return metadata.version(dist)
  except metadata.PackageNotFoundError:
    return "-"


name = sys.argv[1] if len(sys.argv) > 1 else "stack"
print(f"== {name}: Python {platform.python_version()} "
      + " ".join(f"{d} {version(d)}" for d in DISTS), flush=True)
