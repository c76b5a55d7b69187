"""Grouped matmul kernels (interpret mode) against their pure-jnp reference: forward, gradients,
tgmm; each test runs both backends, the Mosaic-TPU kernels and the Triton (GPU) kernels.

Shapes are fixed per test so each jitted function compiles once; hypothesis draws the group sizes
(traced values), with the edge cases pinned as explicit examples.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from deepseek_jax.kernels_pallas import (BlockSizes, abstract_gpu, gmm, gmm_reference, tgmm,
                                         tgmm_reference)

# M is not a multiple of tm; K and N span two (padded) tiles each, so every kernel path is taken.
M, K, N, E = 200, 48, 40, 6
BLOCKS = BlockSizes(tm=64, tk=32, tn=32)
TOL = {jnp.float32: dict(rtol=1e-5, atol=1e-4), jnp.bfloat16: dict(rtol=2e-2, atol=6e-2)}
HYP = settings(max_examples=15, deadline=None)
BACKENDS = pytest.mark.parametrize("backend", ["mosaic_tpu", "triton"])


def _sizes(cuts: list[int], fill: bool) -> np.ndarray:
  """Group sizes from E-1 cut points in [0, total]; total = M when `fill`, else the largest cut."""
  cuts = sorted(cuts)
  total = M if fill else cuts[-1]
  return np.diff(np.array([0, *cuts[:-1], total])).astype(np.int32)


group_sizes_st = st.builds(_sizes, st.lists(st.integers(0, M), min_size=E, max_size=E), st.booleans())

EDGE_CASES = {
    "all_in_one": [0, 0, M, 0, 0, 0],
    "all_empty": [0] * E,
    "first_only": [M, 0, 0, 0, 0, 0],
    "last_only": [0, 0, 0, 0, 0, M],
    "partial_fill": [5, 0, 17, 0, 0, 30],
    "boundaries_inside_tiles": [1, 63, 2, 70, 1, 63],
    "tile_aligned": [64, 0, 64, 64, 0, 8],
    "overflowing_sum_is_cut": [150, 100, 0, 0, 0, 0],
}


def _inputs(dtype, seed=0):
  rng = np.random.default_rng(seed)
  lhs = jnp.asarray(rng.standard_normal((M, K)), dtype)
  rhs = jnp.asarray(rng.standard_normal((E, K, N)) / np.sqrt(K), dtype)
  cot = jnp.asarray(rng.standard_normal((M, N)), dtype)
  return lhs, rhs, cot


@functools.cache
def _fwd_and_grads(dtype, backend):
  """Kernel and reference outputs and (d_lhs, d_rhs) of <out, cot>; the reference in float32."""

  def run(fn, lhs, rhs, gs, cot):
    def loss(a, b):
      out = fn(a, b, gs)
      return jnp.sum(out.astype(jnp.float32) * cot.astype(jnp.float32)), out
    (_, out), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(lhs, rhs)
    return out, *grads

  kernel = functools.partial(gmm, block_sizes=BLOCKS, interpret=True, backend=backend)
  reference = lambda a, b, g: gmm_reference(a.astype(jnp.float32), b.astype(jnp.float32), g)
  return jax.jit(functools.partial(run, kernel)), jax.jit(functools.partial(run, reference))


def _check_gmm(dtype, group_sizes, backend):
  lhs, rhs, cot = _inputs(dtype)
  gs = jnp.asarray(group_sizes, jnp.int32)
  kernel, reference = _fwd_and_grads(dtype, backend)
  got, want = kernel(lhs, rhs, gs, cot), reference(lhs, rhs, gs, cot)
  assert got[0].dtype == dtype and got[1].dtype == dtype and got[2].dtype == dtype
  for name, g, w in zip(("out", "d_lhs", "d_rhs"), got, want):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w), **TOL[dtype], err_msg=name)
  # Rows past the last group are exact zeros, and receive no gradient.
  used = int(min(np.sum(group_sizes), M))
  assert not np.any(np.asarray(got[0][used:], np.float32))
  assert not np.any(np.asarray(got[1][used:], np.float32))


@BACKENDS
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", sorted(EDGE_CASES))
def test_gmm_edge_cases(dtype, case, backend):
  _check_gmm(dtype, np.array(EDGE_CASES[case], np.int32), backend)


@BACKENDS
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_gmm_drawn_group_sizes(dtype, backend):
  @HYP
  @given(group_sizes_st)
  @example(np.array([0, 0, 0, 0, 0, 0], np.int32))
  def check(group_sizes):
    _check_gmm(dtype, group_sizes, backend)

  check()


@functools.cache
def _tgmm_pair(backend):
  kernel = jax.jit(functools.partial(tgmm, block_sizes=BLOCKS, interpret=True, backend=backend,
                                     preferred_element_type=jnp.float32))
  return kernel, jax.jit(tgmm_reference)


@BACKENDS
def test_tgmm_against_reference(backend):
  @HYP
  @given(group_sizes_st)
  @example(np.array([0, M, 0, 0, 0, 0], np.int32))
  @example(np.array([0, 0, 0, 0, 0, 0], np.int32))
  def check(group_sizes):
    _check_tgmm(group_sizes, backend)

  check()


def _check_tgmm(group_sizes, backend):
  lhs, _, cot = _inputs(jnp.float32, seed=1)
  gs = jnp.asarray(group_sizes, jnp.int32)
  kernel, reference = _tgmm_pair(backend)
  got = kernel(lhs, cot, gs)
  assert got.shape == (E, K, N) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), np.asarray(reference(lhs, cot, gs)), **TOL[jnp.float32])
  empty = np.flatnonzero(np.asarray(group_sizes) == 0)
  assert not np.any(np.asarray(got)[empty])


@BACKENDS
def test_default_block_sizes_and_tiny_problem(backend):
  """Default (interpret) tiles larger than the problem: one tile per dim, still exact (the
  Triton kernel pads K and N to its minimum tile of 16)."""
  assert BlockSizes.default("cpu").tm >= 128 and BlockSizes.default("tpu").tk >= 128
  rng = np.random.default_rng(2)
  lhs = jnp.asarray(rng.standard_normal((5, 3)), jnp.float32)
  rhs = jnp.asarray(rng.standard_normal((3, 3, 2)), jnp.float32)
  gs = jnp.array([2, 0, 3], jnp.int32)
  out = gmm(lhs, rhs, gs, interpret=True, backend=backend)
  want = np.concatenate([np.asarray(lhs[:2] @ rhs[0]), np.asarray(lhs[2:] @ rhs[2])])
  np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise():
  lhs = jnp.zeros((8, 4))
  with pytest.raises(ValueError, match="rhs"):
    gmm(lhs, jnp.zeros((2, 5, 3)), jnp.array([4, 4], jnp.int32), interpret=True)
  with pytest.raises(ValueError, match="group_sizes"):
    gmm(lhs, jnp.zeros((2, 4, 3)), jnp.array([4.0, 4.0]), interpret=True)
  with pytest.raises(ValueError, match="tm"):
    BlockSizes(tm=0)
  with pytest.raises(ValueError, match="num_warps"):
    BlockSizes(num_warps=0)
  with pytest.raises(ValueError, match="backend"):
    gmm(lhs, jnp.zeros((2, 4, 3)), jnp.array([4, 4], jnp.int32), interpret=True, backend="cuda")


def test_gpu_block_sizes_by_device_kind():
  """Triton tiles follow the GPU family named by the device kind; unknown GPUs get small tiles."""
  from deepseek_jax.kernels_pallas import gpu_block_sizes
  from deepseek_jax.kernels_pallas.gmm import GPU_FALLBACK
  hopper, ampere, cdna = (gpu_block_sizes(k) for k in ("NVIDIA H100 80GB HBM3",
                                                       "NVIDIA A100-SXM4-80GB", "gfx942"))
  assert hopper.tk == 64 and hopper.num_warps == 8 and ampere.tk == 32 and cdna.num_stages == 2
  assert gpu_block_sizes(None) == gpu_block_sizes("Some GPU") == GPU_FALLBACK
  with abstract_gpu("NVIDIA A100-SXM4-80GB"):  # the device a cross-platform export names
    assert BlockSizes.default("gpu") == ampere


def test_tpu_semantics_interpreter():
  """The Mosaic-TPU kernels under the TPU-semantics interpreter (uninitialised memory is NaN,
  out-of-bounds reads and races checked): revisited output tiles and the empty-group zero blocks
  must be written before they are read back; forward, d_lhs (transposed weights) and tgmm."""
  from jax.experimental.pallas import tpu as pltpu
  interp = pltpu.InterpretParams(uninitialized_memory="nan", detect_races=True)
  lhs, rhs, cot = _inputs(jnp.float32, seed=4)
  gs = jnp.array([1, 63, 0, 70, 1, 30], jnp.int32)  # boundaries inside tiles, an empty group, a tail
  kernel = lambda a, b: gmm(a, b, gs, block_sizes=BLOCKS, interpret=interp, backend="mosaic_tpu")
  out, pull = jax.vjp(kernel, lhs, rhs)
  want, pull_want = jax.vjp(lambda a, b: gmm_reference(a, b, gs), lhs, rhs)
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), **TOL[jnp.float32])
  for got, ref in zip(pull(cot), pull_want(cot)):  # d_lhs through gmm(grad, rhs^T), d_rhs tgmm
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), **TOL[jnp.float32])


def test_interpret_is_chosen_by_the_platform_the_program_is_lowered_for():
  """interpret=None: interpreted where lowered for the CPU (runs here), the Mosaic kernel where
  lowered for TPU and the Triton kernel where lowered for CUDA (the same function exported from
  this CPU host); no switch is flipped."""
  lhs, rhs, _ = _inputs(jnp.float32, seed=5)
  gs = jnp.array([50, 0, 60, 40, 30, 20], jnp.int32)
  f = jax.jit(lambda a, b: gmm(a, b, gs))  # block sizes per platform too
  np.testing.assert_allclose(np.asarray(f(lhs, rhs)), np.asarray(gmm_reference(lhs, rhs, gs)),
                             **TOL[jnp.float32])
  text = jax.export.export(f, platforms=("tpu",))(lhs, rhs).mlir_module()
  assert "tpu_custom_call" in text and "triton" not in text
  with abstract_gpu():
    text = jax.export.export(f, platforms=("cuda",), disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(lhs, rhs).mlir_module()
  assert "__gpu$xla.gpu.triton" in text and "tpu_custom_call" not in text
  cpu_text = jax.jit(f).lower(lhs, rhs).as_text()
  assert "tpu_custom_call" not in cpu_text and "triton" not in cpu_text
