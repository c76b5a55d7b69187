"""Checkpoint conversion: released safetensors (FP8 included) <-> our parameters and Orbax.

`load_hf(path, ...)` streams a released-layout directory into (sharded) jax arrays; the CLIs
`convert.hf_to_orbax`, `convert.orbax_to_hf` and `convert.plan` are built on `convert.to_orbax`,
`convert.to_hf` and `convert.planner`.
"""

from deepseek_jax.convert.load import load_hf

__all__ = ["load_hf"]
