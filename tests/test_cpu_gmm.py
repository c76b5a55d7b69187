"""The CPU grouped matmul (`cpu_gmm`): built on first use, equal to a NumPy reference forward and
in its gradients, run by the `native` dispatch (and by `capacity` below its threshold) on the CPU
with float32 weights, kept out of other platforms' lowerings and of bf16 or LoRA weights, and
falling back to XLA where it cannot be built."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import cpu_gmm, dispatch

E, D, I = 8, 16, 12


def _weights(seed=0, dtype=jnp.float32):
  r = np.random.RandomState(seed)
  return [jnp.asarray(r.randn(*s) * 0.3, dtype) for s in ((E, D, I), (E, D, I), (E, I, D))]


def test_it_builds_here():
  """CI and Colab have a C++ compiler: the custom call must be there, not silently replaced by
  the XLA path."""
  assert cpu_gmm.available()
  assert cpu_gmm.library_path().is_file()


def _cpu_flags() -> set[str]:
  with open("/proc/cpuinfo") as f:
    return {flag for line in f if line.startswith("flags") for flag in line.split(":")[1].split()}


@pytest.mark.skipif(platform.machine() != "x86_64", reason="reads x86 /proc/cpuinfo flags")
def test_register_tiles_fit_this_cpu():
  """Built for this CPU (-march=native): tiles of 16-float vectors with AVX-512's 32 registers,
  8-float ones with AVX2's 16. Tiles of 16-float vectors on an AVX2 machine spilled their sums at
  every step and ran at 7 GFLOP/s, 15x slower than XLA's own dot."""
  flags = _cpu_flags()
  want = (16, 32) if "avx512f" in flags else (8, 16) if "avx" in flags else (4, 16)
  assert cpu_gmm.vector_tiles() == want


@pytest.mark.parametrize("sizes,n", [
    ([1, 2, 3, 4, 5, 6, 7, 8, 0, 9, 12], 100),  # every one-pass row count, then panels (9, 12);
    ([3, 0, 5, 1], 12),                          # 100 columns: register tiles plus single ones
    ([70, 2], 20),                               # a group split into work items of 64 rows
    ([13, 7, 9], 100),                           # past 8 rows: passes of 6 over packed panels
                                                 # (64 or 16 columns), then the rest one by one
    ([0, 0, 0, 0], 64), ([2, 0, 0, 1], 33), ([9, 0, 0, 0], 5),
    ([3, 1], 600)])                              # a few rows' columns split into work items
def test_grouped_matmul_equals_numpy(sizes, n):
  """Groups in order, empty groups skipped, rows past the last group zero."""
  r = np.random.RandomState(sum(sizes) + n)
  m, k = max(sum(sizes), 9) + 3, 20
  x = r.randn(m, k).astype(np.float32)
  w = r.randn(len(sizes), k, n).astype(np.float32)
  want = np.zeros((m, n), np.float32)
  start = 0
  for e, size in enumerate(sizes):
    want[start:start + size] = x[start:start + size] @ w[e]
    start += size
  got = jax.jit(cpu_gmm.grouped_matmul)(x, w, jnp.asarray(sizes, jnp.int32))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sizes,k,n", [
    ([3, 0, 5, 1], 20, 40),        # an empty group; rows past the last group
    ([40, 2, 0, 17], 50, 100),     # groups over several work items; tiles plus single columns
    ([20, 5, 0], 70, 80),          # packed panels (of w^T for dx), plus the rest
    ([0, 0, 0], 8, 16),            # no rows at all: every weight gradient zero
    ([1, 9], 33, 600)])            # wide: column items
def test_grouped_matmul_gradients_equal_numpy(sizes, k, n):
  """dx = dy @ w_e^T on each group's rows (zero past the last group), dw_e = x_e^T @ dy_e (zero
  for an empty group), through the two backward custom calls."""
  r = np.random.RandomState(k + n)
  m = sum(sizes) + 3
  x, dy = r.randn(m, k).astype(np.float32), r.randn(m, n).astype(np.float32)
  w = r.randn(len(sizes), k, n).astype(np.float32)
  dx_want, dw_want = np.zeros_like(x), np.zeros_like(w)
  start = 0
  for e, size in enumerate(sizes):
    rows = slice(start, start + size)
    dx_want[rows], dw_want[e] = dy[rows] @ w[e].T, x[rows].T @ dy[rows]
    start += size
  loss = lambda x, w: jnp.sum(cpu_gmm.grouped_matmul(x, w, jnp.asarray(sizes)) * dy)  # noqa: E731
  grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
  assert cpu_gmm.TARGET_T in grad.lower(x, w).as_text()
  dx, dw = grad(x, w)
  np.testing.assert_allclose(np.asarray(dx), dx_want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(dw), dw_want, rtol=1e-4, atol=1e-4)


def test_grouped_matmul_rejects_other_dtypes_and_shapes():
  x, w = jnp.zeros((4, 3)), jnp.zeros((2, 3, 5))
  with pytest.raises(ValueError, match="float32 x"):
    cpu_gmm.grouped_matmul(x.astype(jnp.bfloat16), w, jnp.zeros((2,), jnp.int32))
  with pytest.raises(ValueError, match=r"sizes \[2\]"):
    cpu_gmm.grouped_matmul(x, w, jnp.zeros((3,), jnp.int32))


def _routing(n, k, adversarial, seed):
  r = np.random.RandomState(seed)
  x = jnp.asarray(r.randn(n, D), jnp.float32)
  idx = (np.tile(np.arange(k), (n, 1)) if adversarial
         else np.stack([r.choice(E, size=k, replace=False) for _ in range(n)]))
  return x, jnp.asarray(idx, jnp.int32), jnp.asarray(r.rand(n, k), jnp.float32)


def _loss(method):
  return lambda x, idx, w, *ws: jnp.sum(jnp.sin(dispatch.moe_experts(x, idx, w, *ws,
                                                                    method=method)))


@pytest.mark.parametrize("n,k,adversarial", [(1, 2, False), (7, 3, False), (31, 1, False),
                                             (15, 2, True)])
def test_capacity_few_copies_runs_it_and_equals_dense(n, k, adversarial):
  """Below `capacity`'s threshold the compiled program calls the custom call, and equals the
  dense reference forward and in every gradient, also with every token on the same experts."""
  assert n * k < dispatch.CAPACITY_MIN_COPIES_PER_EXPERT * E
  x, idx, w = _routing(n, k, adversarial, n + k)
  ws = _weights(k)
  fn = jax.jit(lambda *a: dispatch.moe_experts(*a, method="capacity"))
  assert cpu_gmm.TARGET in fn.lower(x, idx, w, *ws).as_text()
  want = dispatch.moe_experts(x, idx, w, *ws, method="dense")
  np.testing.assert_allclose(np.asarray(fn(x, idx, w, *ws)), np.asarray(want), atol=1e-5,
                             rtol=1e-5)
  argnums = (0, 2, 3, 4, 5)
  g_want = jax.grad(_loss("dense"), argnums=argnums)(x, idx, w, *ws)
  g_got = jax.jit(jax.grad(_loss("capacity"), argnums=argnums))(x, idx, w, *ws)
  for a, b in zip(g_got, g_want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n,k,adversarial", [(2, 2, False), (96, 2, False), (96, 1, True),
                                             (64, 3, True)])
def test_native_runs_it_forward_and_backward_and_equals_dense(n, k, adversarial):
  """The `native` dispatch: both custom calls in the gradient's program, equal to the dense
  reference forward and in every gradient, whatever the routing (all copies on the same
  experts too)."""
  x, idx, w = _routing(n, k, adversarial, n + k)
  ws = _weights(k)
  argnums = (0, 2, 3, 4, 5)
  grad = jax.jit(jax.grad(_loss("native"), argnums=argnums))
  text = grad.lower(x, idx, w, *ws).as_text()
  assert cpu_gmm.TARGET in text and cpu_gmm.TARGET_T in text
  want = dispatch.moe_experts(x, idx, w, *ws, method="dense")
  got = jax.jit(lambda *a: dispatch.moe_experts(*a, method="native"))(x, idx, w, *ws)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
  g_want = jax.grad(_loss("dense"), argnums=argnums)(x, idx, w, *ws)
  for a, b in zip(grad(x, idx, w, *ws), g_want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method,n", [("capacity", 3), ("native", 3), ("native", 96)])
def test_not_used_for_bf16_lora_or_other_platforms(method, n):
  """bf16 weights, a LoRA adapter and another platform's lowering take the XLA path."""
  x, idx, w = _routing(n, 2, False, 0)
  text = lambda *a: jax.jit(  # noqa: E731
      lambda *b: dispatch.moe_experts(*b, method=method)).lower(*a).as_text()
  assert cpu_gmm.TARGET not in text(x.astype(jnp.bfloat16), idx, w,
                                    *_weights(dtype=jnp.bfloat16))
  wg, wu, wd = _weights()
  lora = dispatch.ExpertWeights(wg, jnp.zeros((E, D, 2)), jnp.zeros((E, 2, I)))
  assert cpu_gmm.TARGET not in text(x, idx, w, lora, wu, wd)
  exported = jax.export.export(jax.jit(lambda *a: dispatch.moe_experts(*a, method=method)),
                               platforms=["tpu"])(x, idx, w, wg, wu, wd)
  assert cpu_gmm.TARGET not in exported.mlir_module()


def _python(code: str, tmp_path, **env) -> subprocess.CompletedProcess:
  environ = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu",
             **env}
  return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=300, env=environ, cwd=tmp_path)


def test_built_into_the_cache_atomically(tmp_path):
  """A fresh cache directory gets the library and nothing else (no temporary file left)."""
  r = _python("from deepseek_jax import cpu_gmm\n"
              "assert cpu_gmm.available()\nprint(cpu_gmm.library_path())", tmp_path)
  assert r.returncode == 0, r.stderr[-3000:]
  built = sorted(p.name for p in (tmp_path / "cache" / "deepseek_jax").iterdir())
  assert built == [os.path.basename(r.stdout.strip())], built


def test_falls_back_with_a_warning_without_a_compiler(tmp_path):
  """No compiler (or the switch off): unavailable, the reason logged once, and `capacity` and
  `native` still compute (through `blocked` and `capacity`)."""
  code = ("import jax, jax.numpy as jnp\nfrom deepseek_jax import cpu_gmm, dispatch\n"
          "assert not cpu_gmm.available()\n"
          "x, w = jnp.ones((2, 4)), jnp.ones((2, 1))\nidx = jnp.zeros((2, 1), jnp.int32)\n"
          "ws = [jnp.ones((3, 4, 5)), jnp.ones((3, 4, 5)), jnp.ones((3, 5, 4))]\n"
          "for m in ('capacity', 'native'):\n"
          "  f = jax.jit(lambda *a: dispatch.moe_experts(*a, method=m))\n"
          "  assert cpu_gmm.TARGET not in f.lower(x, idx, w, *ws).as_text()\n"
          "  print(float(f(x, idx, w, *ws)[0, 0]))\n")
  r = _python(code, tmp_path, CXX=os.path.join(str(tmp_path), "no-such-compiler"))
  assert r.returncode == 0, r.stderr[-3000:]
  assert [float(v) for v in r.stdout.split()] == pytest.approx(
      [4 * 5 * 4 * (1 / (1 + np.exp(-4.0)))] * 2)
  assert "cpu_gmm unavailable" in r.stderr and "no-such-compiler" in r.stderr
  r = _python(code, tmp_path, DEEPSEEK_JAX_NATIVE="0")
  assert r.returncode == 0 and "unavailable" not in r.stderr, r.stderr[-3000:]
