"""deepseek-jax: DeepSeek-V2/V3/R1 in JAX and Flax NNX."""

from deepseek_jax.config import DeepseekConfig
from deepseek_jax.presets import PRESETS, get_preset

__all__ = ["DeepseekConfig", "PRESETS", "get_preset"]
