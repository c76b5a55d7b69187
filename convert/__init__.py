"""Checkpoint conversion: released safetensors (FP8 included) <-> our parameters and Orbax.

Modules: `load` (streaming load of a released-layout directory into sharded arrays), `to_orbax`
and `to_hf` (the converters behind the CLIs `deepseek_jax.convert.hf_to_orbax`, `orbax_to_hf`
and `plan`), `fp8` (DeepSeek-V3's FP8 block quantization), `names` (released names <-> ours),
`safetensors_read` / `safetensors_write` / `atomic` (the file format and atomic outputs).
This package's `__init__` imports nothing, so that low floors (the model's quantized weights)
can use `fp8` without loading the converters.
"""
