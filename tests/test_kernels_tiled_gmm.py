"""The plain-XLA tiled grouped matmul against its pure-jnp twin: forward and both gradients, with
unused tiles (the static bound's slack), empty groups and tiles of one group side by side."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from deepseek_jax.kernels_pallas import tiled_gmm, tiled_gmm_reference

T, TILE, K, N, E = 6, 8, 12, 10, 4


def _inputs(seed):
  rng = np.random.default_rng(seed)
  lhs = jnp.asarray(rng.standard_normal((T * TILE, K)), jnp.float32)
  rhs = jnp.asarray(rng.standard_normal((E, K, N)) / np.sqrt(K), jnp.float32)
  cot = jnp.asarray(rng.standard_normal((T * TILE, N)), jnp.float32)
  return lhs, rhs, cot


@jax.jit
def _both(lhs, rhs, cot, tile_group, used):
  def vjp(f):
    out, pull = jax.vjp(lambda a, b: f(a, b, tile_group, used), lhs, rhs)
    return out, *pull(cot)
  return vjp(tiled_gmm), vjp(tiled_gmm_reference)


@settings(max_examples=12, deadline=None)
@given(groups=st.lists(st.integers(0, E - 1), min_size=T, max_size=T), used=st.integers(0, T),
       seed=st.integers(0, 99))
def test_forward_and_gradients_equal_the_reference(groups, used, seed):
  lhs, rhs, cot = _inputs(seed)
  got, want = _both(lhs, rhs, cot, jnp.asarray(sorted(groups), jnp.int32), jnp.int32(used))
  for a, b in zip(got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
  out, _, d_rhs = got
  assert not np.any(np.asarray(out)[used * TILE:])  # rows of unused tiles are zero
  unused = sorted(set(range(E)) - set(sorted(groups)[:used]))
  assert not np.any(np.asarray(d_rhs)[unused])      # groups no used tile holds get no gradient
