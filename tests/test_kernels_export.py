"""The kernels lower for real hardware from this CPU host (jax.export with a foreign platform).

TPU: the Pallas calls lower to Mosaic (`tpu_custom_call`). GPUs: they lower to Triton
(`__gpu$xla.gpu.triton`) for CUDA and for ROCm, under `abstract_gpu(device_kind)`, which names
the GPU to lower for (jax >= 0.12 reads its compute capability from it; jax 0.10 assumes sm_90 when
no GPU is attached). This runs the Pallas-to-Mosaic and Pallas-to-Triton lowerings (block shapes,
primitives, the Triton IR that XLA compiles); the compilation to machine code happens on the
device and is not exercised here. No extra package is needed: the CPU jaxlib carries both
lowerings, provided the kernels name their backend through its `CompilerParams`.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

from deepseek_jax.kernels_pallas import BlockSizes, abstract_gpu, gmm, mla_decode_attention, tgmm

# Shapes at TPU-sized tiles, with a ragged M, to exercise the padded paths.
M, K, N, E = 1000, 512, 256, 8
LHS = jax.ShapeDtypeStruct((M, K), jnp.bfloat16)
RHS = jax.ShapeDtypeStruct((E, K, N), jnp.bfloat16)
GRAD = jax.ShapeDtypeStruct((M, N), jnp.bfloat16)
GS = jax.ShapeDtypeStruct((E,), jnp.int32)
# Absorbed-MLA decode at DeepSeek-V3 widths (kv_lora_rank 512 + rope 64), 128 heads, ragged S.
Q = jax.ShapeDtypeStruct((2, 128, 576), jnp.bfloat16)
CACHE = jax.ShapeDtypeStruct((2, 4000, 576), jnp.bfloat16)
LENGTHS = jax.ShapeDtypeStruct((2,), jnp.int32)
TRITON = "__gpu$xla.gpu.triton"
# The Triton custom call has no serialisation-compatibility guarantee; export must be told.
GPU_CHECKS = [jax.export.DisabledSafetyCheck.custom_call(TRITON)]
# (platform, device kind) pairs lowered for: Hopper and Ampere through CUDA, MI300X through ROCm.
GPUS = [("cuda", "NVIDIA H100 80GB HBM3"), ("cuda", "NVIDIA A100-SXM4-80GB"), ("rocm", "gfx942")]


def _gmm_fwd(lhs, rhs, gs):
  return gmm(lhs, rhs, gs)


def _gmm_grad(lhs, rhs, gs):
  loss = lambda a, b: jnp.sum(gmm(a, b, gs).astype(jnp.float32))
  return jax.value_and_grad(loss, (0, 1))(lhs, rhs)


def _tgmm(lhs, grad, gs):
  return tgmm(lhs, grad, gs, preferred_element_type=jnp.float32)


def _decode(q, cache, lengths):
  return mla_decode_attention(q, cache, lengths, kv_lora_rank=512, softmax_scale=0.07)


KERNELS = {
    # name: (function, abstract args, kernels expected in the lowered module: TPU, GPU)
    "gmm": (_gmm_fwd, (LHS, RHS, GS), ["gmm"], ["gmm_triton"]),
    # forward, d_lhs (transposed rhs), d_rhs (tgmm)
    "gmm_grad": (_gmm_grad, (LHS, RHS, GS), ["gmm", "gmm", "tgmm"],
                 ["gmm_triton", "gmm_triton", "tgmm_triton"]),
    "tgmm": (_tgmm, (LHS, GRAD, GS), ["tgmm"], ["tgmm_triton"]),
    "mla_decode": (_decode, (Q, CACHE, LENGTHS), ["mla_decode"], ["mla_decode_triton"]),
}


def custom_calls(text: str) -> list[tuple[str, str]]:
  """(custom-call target, kernel name) of every custom call in an MLIR module's text."""
  found = []
  for line in text.splitlines():
    for target in re.findall(r"custom_call @([\w$.]+)\(", line):
      name = re.search(r'\b(?:kernel_name|name) = "(\w+)"', line)
      found.append((target, name.group(1) if name else ""))
  return found


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_lowers_for_tpu(name):
  fn, args, expected, _ = KERNELS[name]
  exported = jax.export.export(jax.jit(fn), platforms=("tpu",))(*args)
  assert sorted(custom_calls(exported.mlir_module())) == sorted(
      ("tpu_custom_call", k) for k in expected)
  assert exported.platforms == ("tpu",)


@pytest.mark.parametrize("platform,device_kind", GPUS, ids=[f"{p}-{k.split()[-1]}" for p, k in GPUS])
@pytest.mark.parametrize("name", sorted(KERNELS))
def test_lowers_for_gpu(name, platform, device_kind):
  """The same ops, lowered for a GPU: the Triton kernels, with that GPU's block sizes."""
  fn, args, _, expected = KERNELS[name]
  with abstract_gpu(device_kind):
    exported = jax.export.export(jax.jit(fn), platforms=(platform,), disabled_checks=GPU_CHECKS)(*args)
  text = exported.mlir_module()
  assert sorted(custom_calls(text)) == sorted((TRITON, k) for k in expected), custom_calls(text)
  assert exported.platforms == (platform,)
  if name.startswith("gmm"):  # the device kind's launch settings reached the kernel
    warps = BlockSizes.default("gpu", device_kind=device_kind).num_warps
    assert f"num_warps = {warps} : i32" in text
