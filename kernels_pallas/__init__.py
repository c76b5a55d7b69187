"""Pallas kernels with pure-jnp reference twins: grouped matmul (MoE experts) and MLA decode attention."""

from kernels_pallas.gmm import BlockSizes, gmm, gmm_reference, tgmm, tgmm_reference
from kernels_pallas.mla_decode import DecodeBlockSizes, mla_decode_attention, mla_decode_reference

__all__ = [
    "BlockSizes", "DecodeBlockSizes", "gmm", "gmm_reference", "mla_decode_attention",
    "mla_decode_reference", "tgmm", "tgmm_reference",
]
