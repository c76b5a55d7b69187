"""deepseek-jax: DeepSeek-V2/V3/R1 (MLA, DeepSeekMoE, MTP) in JAX and Flax NNX.

Public contract: `from_pretrained(path, dtype=...)` returns a model; `model(input_ids)` maps int32
[B, T] to float32 logits [B, T, vocab]; `generate(model, prompt_ids, max_new_tokens, ...)` returns
the new token ids of each prompt. Subpackages: `deepseek_jax.sharding` (meshes, rules, memory
plans), `deepseek_jax.convert` (released checkpoints), `deepseek_jax.kernels_pallas` (kernels).
"""

from deepseek_jax.config import DeepseekConfig
from deepseek_jax.generation import generate
from deepseek_jax.model import DeepseekForCausalLM, ModelOutput
from deepseek_jax.presets import PRESETS, get_preset
from deepseek_jax.pretrained import from_pretrained

__all__ = ["DeepseekConfig", "DeepseekForCausalLM", "ModelOutput", "PRESETS", "from_pretrained",
           "generate", "get_preset"]
