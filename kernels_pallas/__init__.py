"""Grouped matmuls and MLA decode attention, each beside a pure-jnp reference twin.

Pallas kernels, one public op each with the backend chosen by the platform the program is
lowered for (`platform.per_platform`, `platform.backend_for`): Mosaic TPU on TPUs, Triton on
GPUs (NVIDIA through CUDA, AMD through ROCm), interpreted on the CPU. `gmm`/`tgmm` are the
experts' grouped matmul (`gmm_mosaic`, `gmm_triton`), `mla_decode_attention` the absorbed-MLA
decode step (`mla_decode_mosaic`, `mla_decode_triton`). `tiled_gmm` is the plain-XLA grouped
matmul over row tiles used on the CPU. `abstract_gpu` names the GPU to lower for from a host
without one (`jax.export`).
"""

from deepseek_jax.kernels_pallas.gmm import (BlockSizes, gmm, gmm_reference, gpu_block_sizes, tgmm,
                                             tgmm_reference)
from deepseek_jax.kernels_pallas.mla_decode import (DecodeBlockSizes, mla_decode_attention,
                                                    mla_decode_reference)
from deepseek_jax.kernels_pallas.platform import abstract_gpu, backend_for, per_platform
from deepseek_jax.kernels_pallas.tiled_gmm import tiled_gmm, tiled_gmm_reference

__all__ = [
    "BlockSizes", "DecodeBlockSizes", "abstract_gpu", "backend_for", "gmm", "gmm_reference",
    "gpu_block_sizes", "mla_decode_attention", "mla_decode_reference", "per_platform", "tgmm",
    "tgmm_reference", "tiled_gmm", "tiled_gmm_reference",
]
