"""The kernels lower for real hardware from this CPU host (jax.export with a foreign platform).

TPU: the Pallas calls lower to Mosaic (`tpu_custom_call`). That runs the Pallas-to-Mosaic lowering
(block shapes, primitives, scalar prefetch); Mosaic's own compilation happens on a TPU and is not
exercised here. CUDA: these kernels are written for Mosaic TPU (scalar prefetch, sequential grid
revisits), so lowering them for a GPU is expected to fail; the strict xfail turns into a failure
the day they do lower, and the control test shows the CPU jaxlib can lower Pallas for CUDA at all.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas import triton as pltriton

from deepseek_jax.kernels_pallas import BlockSizes, gmm, mla_decode_attention, tgmm

# Shapes at TPU-sized tiles, with a ragged M, to exercise the padded paths.
M, K, N, E = 1000, 512, 256, 8
LHS = jax.ShapeDtypeStruct((M, K), jnp.bfloat16)
RHS = jax.ShapeDtypeStruct((E, K, N), jnp.bfloat16)
GRAD = jax.ShapeDtypeStruct((M, N), jnp.bfloat16)
GS = jax.ShapeDtypeStruct((E,), jnp.int32)
TPU_BLOCKS = BlockSizes.default("tpu")
# Absorbed-MLA decode at DeepSeek-V3 widths (kv_lora_rank 512 + rope 64), 128 heads, ragged S.
Q = jax.ShapeDtypeStruct((2, 128, 576), jnp.bfloat16)
CACHE = jax.ShapeDtypeStruct((2, 4000, 576), jnp.bfloat16)
LENGTHS = jax.ShapeDtypeStruct((2,), jnp.int32)


def _gmm_fwd(lhs, rhs, gs):
  return gmm(lhs, rhs, gs, block_sizes=TPU_BLOCKS)


def _gmm_grad(lhs, rhs, gs):
  loss = lambda a, b: jnp.sum(gmm(a, b, gs, block_sizes=TPU_BLOCKS).astype(jnp.float32))
  return jax.value_and_grad(loss, (0, 1))(lhs, rhs)


def _tgmm(lhs, grad, gs):
  return tgmm(lhs, grad, gs, block_sizes=TPU_BLOCKS, preferred_element_type=jnp.float32)


def _decode(q, cache, lengths):
  return mla_decode_attention(q, cache, lengths, kv_lora_rank=512, softmax_scale=0.07)


KERNELS = {
    # name: (function, abstract args, Pallas calls expected in the lowered module)
    "gmm": (_gmm_fwd, (LHS, RHS, GS), 1),
    "gmm_grad": (_gmm_grad, (LHS, RHS, GS), 3),  # forward, d_lhs (transposed rhs), d_rhs (tgmm)
    "tgmm": (_tgmm, (LHS, GRAD, GS), 1),
    "mla_decode": (_decode, (Q, CACHE, LENGTHS), 1),
}


def _custom_calls(exported) -> list[str]:
  return re.findall(r"custom_call @([\w$.]+)\(", exported.mlir_module())


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_lowers_for_tpu(name):
  fn, args, expected = KERNELS[name]
  exported = jax.export.export(jax.jit(fn), platforms=("tpu",))(*args)
  calls = _custom_calls(exported)
  assert calls.count("tpu_custom_call") == expected, calls
  assert exported.platforms == ("tpu",)


@pytest.mark.xfail(strict=True, raises=ValueError, reason="Mosaic-TPU kernels: no GPU lowering yet")
@pytest.mark.parametrize("name", sorted(KERNELS))
def test_lowers_for_cuda(name):
  fn, args, _ = KERNELS[name]
  jax.export.export(jax.jit(fn), platforms=("cuda",))(*args)


def _abstract_gpu():
  """jax >= 0.11 lowers Pallas for a GPU from a CPU host only for a named abstract GPU device
  ("No supported GPU devices found, please specify an abstract GPU device using AbstractDevice");
  jax 0.10 accepts the same context and needs none."""
  dev = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=None, platform="gpu")
  mesh = jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Explicit,),
                                   abstract_device=dev)
  return jax.sharding.use_abstract_mesh(mesh)


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
@pytest.mark.parametrize("backend", ["mosaic_gpu", "triton"])
def test_cpu_jaxlib_lowers_pallas_for_cuda(backend):
  """Control: an elementwise Pallas kernel lowers for CUDA here, through either GPU backend
  (Mosaic GPU through `plgpu.kernel`: jax 0.12 dropped it from `pl.pallas_call`)."""

  def double(x_ref, o_ref):
    o_ref[...] = x_ref[...] * 2

  out = jax.ShapeDtypeStruct((16, 128), jnp.float32)
  if backend == "triton":
    f = lambda x: pl.pallas_call(double, out_shape=out, compiler_params=pltriton.CompilerParams())(x)
  else:
    f = lambda x: plgpu.kernel(double, out_type=out)(x)
  # The Triton custom call has no serialisation guarantee; export needs to be told so.
  checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  with _abstract_gpu():
    exported = jax.export.export(jax.jit(f), platforms=("cuda",), disabled_checks=checks)(out)
  want = "triton" if backend == "triton" else "mosaic_gpu"
  assert any(want in c for c in _custom_calls(exported)), _custom_calls(exported)
