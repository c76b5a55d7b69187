"""Grouped matmuls and MLA decode attention, each beside a pure-jnp reference twin.

Pallas kernels (Mosaic TPU; interpreted on the CPU, see `platform.per_platform`): `gmm`/`tgmm`
for the experts' grouped matmul and `mla_decode_attention` for absorbed-MLA decode steps.
`tiled_gmm` is the plain-XLA grouped matmul over row tiles used on the CPU.
"""

from deepseek_jax.kernels_pallas.gmm import BlockSizes, gmm, gmm_reference, tgmm, tgmm_reference
from deepseek_jax.kernels_pallas.mla_decode import (DecodeBlockSizes, mla_decode_attention,
                                                    mla_decode_reference)
from deepseek_jax.kernels_pallas.platform import per_platform
from deepseek_jax.kernels_pallas.tiled_gmm import tiled_gmm, tiled_gmm_reference

__all__ = [
    "BlockSizes", "DecodeBlockSizes", "gmm", "gmm_reference", "mla_decode_attention",
    "mla_decode_reference", "per_platform", "tgmm", "tgmm_reference", "tiled_gmm",
    "tiled_gmm_reference",
]
