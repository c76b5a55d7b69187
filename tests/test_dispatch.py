"""Routed-expert dispatch: every method equals the dense reference, forward and gradient."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from deepseek_jax import dispatch

E, D, I = 8, 16, 12


def _weights(seed=0):
  r = np.random.RandomState(seed)
  return [jnp.asarray(r.randn(*s) * 0.3, jnp.float32) for s in ((E, D, I), (E, D, I), (E, I, D))]


def _case(n, k, experts_used, seed):
  r = np.random.RandomState(seed)
  x = jnp.asarray(r.randn(n, D), jnp.float32)
  # k distinct experts per token drawn from `experts_used` (others stay empty)
  idx = np.stack([r.choice(experts_used, size=k, replace=False) for _ in range(n)])
  w = jnp.asarray(r.rand(n, k), jnp.float32)
  return x, jnp.asarray(idx, jnp.int32), w


def _loss(method, tile):
  def f(x, idx, w, wg, wu, wd):
    y = dispatch.moe_experts(x, idx, w, wg, wu, wd, method=method, tile=tile)
    return jnp.sum(jnp.sin(y))
  return f


@settings(max_examples=6, deadline=None)
@given(n=st.integers(1, 40), k=st.integers(1, 3), used=st.integers(3, E), seed=st.integers(0, 999),
       tile=st.sampled_from([8, 16, 128]))
def test_sorted_methods_equal_dense(n, k, used, seed, tile):
  """Random routings, including experts with no tokens and N*K smaller than a tile."""
  x, idx, w = _case(n, k, np.arange(used), seed)
  ws = _weights(seed)
  want = dispatch.moe_experts(x, idx, w, *ws, method="dense")
  g_want = jax.grad(_loss("dense", tile), argnums=(0, 2, 3, 4, 5))(x, idx, w, *ws)
  for method in ("ragged", "blocked", "capacity", "native"):  # jitted: one compile, not per op
    got = jax.jit(functools.partial(dispatch.moe_experts, method=method, tile=tile))(
        x, idx, w, *ws)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    g_got = jax.jit(jax.grad(_loss(method, tile), argnums=(0, 2, 3, 4, 5)))(x, idx, w, *ws)
    for a, b in zip(g_got, g_want):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n,k", [(1, 1), (1, 3), (2, 2), (5, 3)])
def test_few_copies_loop_over_the_chosen_experts(n, k):
  """Up to CHOSEN_LOOP_MAX_COPIES copies (decoding) `blocked` and `capacity` loop over the chosen
  experts, at most min(E, N*K) steps: equal to dense, forward and gradients, including every
  expert chosen (5 x 3 copies over E = 8)."""
  assert n * k <= dispatch.CHOSEN_LOOP_MAX_COPIES
  x, idx, w = _case(n, k, np.arange(E), n * 10 + k)
  ws = _weights(k)
  want = dispatch.moe_experts(x, idx, w, *ws, method="dense")
  g_want = jax.grad(_loss("dense", 8), argnums=(0, 2, 3, 4, 5))(x, idx, w, *ws)
  for method in ("blocked", "capacity", "native"):
    got = jax.jit(functools.partial(dispatch.moe_experts, method=method))(x, idx, w, *ws)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    g_got = jax.jit(jax.grad(_loss(method, 8), argnums=(0, 2, 3, 4, 5)))(x, idx, w, *ws)
    for a, b in zip(g_got, g_want):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["ragged", "blocked", "capacity", "native"])
def test_all_tokens_to_one_expert(method):
  x, _, w = _case(33, 1, np.arange(E), 0)
  idx = jnp.full((33, 1), 5, jnp.int32)
  ws = _weights()
  want = dispatch.moe_experts(x, idx, w, *ws, method="dense")
  got = jax.jit(lambda *a: dispatch.moe_experts(*a, method=method, tile=8))(x, idx, w, *ws)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


def _experts_of(n, k, routing, r):
  """[n, k] distinct expert ids: balanced (uniform), skewed (two experts take most copies), or
  adversarial (every token on experts 0..k-1: one expert takes all n copies when k = 1)."""
  if routing == "adversarial":
    return np.tile(np.arange(k), (n, 1))
  p = np.ones(E) if routing == "balanced" else np.array([12, 8] + [1] * (E - 2), float)
  return np.stack([r.choice(E, size=k, replace=False, p=p / p.sum()) for _ in range(n)])


@pytest.mark.parametrize("routing,k", [("balanced", 2), ("skewed", 2), ("adversarial", 1),
                                       ("adversarial", 2)])
def test_capacity_equals_dense_when_copies_overflow(routing, k):
  """The capacity path (static slots per expert, the rest through the overflow tiles) equals the
  dense reference, forward and gradients, whatever the routing; overflow does happen except in
  the balanced case (checked, so the test cannot pass without exercising it)."""
  n = 96
  r = np.random.RandomState(k)
  idx = _experts_of(n, k, routing, r)
  sizes = np.bincount(idx.reshape(-1), minlength=E)
  c = dispatch.capacity(n * k, E)
  assert n * k >= dispatch.CAPACITY_MIN_COPIES_PER_EXPERT * E  # the bucketed path runs
  assert (sizes.max() > c) == (routing != "balanced"), (sizes, c)
  x = jnp.asarray(r.randn(n, D), jnp.float32)
  w = jnp.asarray(r.rand(n, k), jnp.float32)
  idx = jnp.asarray(idx, jnp.int32)
  ws = _weights(k)
  want = dispatch.moe_experts(x, idx, w, *ws, method="dense")
  got = jax.jit(lambda *a: dispatch.moe_experts(*a, method="capacity"))(x, idx, w, *ws)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
  argnums = (0, 2, 3, 4, 5)
  g_want = jax.grad(_loss("dense", 8), argnums=argnums)(x, idx, w, *ws)
  g_got = jax.jit(jax.grad(_loss("capacity", 8), argnums=argnums))(x, idx, w, *ws)
  for a, b in zip(g_got, g_want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)


def test_sort_and_combine_round_trip():
  idx = jnp.asarray([[2, 0], [0, 1], [2, 2]], jnp.int32)
  order, sizes = dispatch.sort_by_expert(idx, 4)
  np.testing.assert_array_equal(sizes, [2, 1, 3, 0])
  flat = np.asarray(idx).reshape(-1)
  assert list(flat[np.asarray(order)]) == sorted(flat)
  y = jnp.arange(6, dtype=jnp.float32)[:, None] * jnp.ones((1, 2))  # copy j in sorted order -> j
  out = dispatch.combine(y, order, jnp.ones((3, 2)), 3)
  per_copy = np.empty(6)
  per_copy[np.asarray(order)] = np.arange(6)
  np.testing.assert_allclose(np.asarray(out)[:, 0], per_copy.reshape(3, 2).sum(1))


def test_unknown_method():
  x, idx, w = _case(4, 2, np.arange(E), 0)
  with pytest.raises(ValueError, match="warp"):
    dispatch.moe_experts(x, idx, w, *_weights(), method="warp")


def test_default_method_by_platform():
  assert dispatch.default_method("tpu") == "pallas"
  assert dispatch.default_method("gpu") == dispatch.default_method("rocm") == "pallas"
  assert dispatch.default_method("cpu") == "native"
  assert dispatch.resolve("auto", "tpu") == "pallas" and dispatch.resolve("dense") == "dense"
  assert dispatch.resolve("auto") == dispatch.default_method(jax.default_backend())
  with pytest.raises(ValueError, match="warp"):
    dispatch.resolve("warp")


def test_the_config_is_read_when_the_model_runs():
  """moe_dispatch is read at call time: the same weights under replace_config run another
  dispatch (a loop for blocked, none for dense), equal outputs, the original model untouched."""
  from flax import nnx

  from deepseek_jax import get_preset
  from deepseek_jax.model import DeepseekForCausalLM, replace_config
  model = DeepseekForCausalLM(get_preset("tiny_v3", moe_dispatch="blocked"), rngs=nnx.Rngs(0))
  dense = replace_config(model, moe_dispatch="dense")
  assert model.cfg.moe_dispatch == "blocked" and dense.cfg.moe_dispatch == "dense"
  assert dense.layers[1].mlp.experts.cfg.moe_dispatch == "dense"
  assert model.layers[1].mlp.experts.cfg.moe_dispatch == "blocked"
  ids = jnp.asarray(np.random.RandomState(0).randint(0, 512, (2, 9)), jnp.int32)
  assert "while" in str(jax.make_jaxpr(lambda i: model(i))(ids))
  assert "while" not in str(jax.make_jaxpr(lambda i: dense(i))(ids))
  np.testing.assert_allclose(np.asarray(dense(ids)), np.asarray(model(ids)), atol=1e-5)
  with pytest.raises(ValueError, match="scan_layers"):
    replace_config(model, scan_layers=True)


def test_whole_model_with_pallas_dispatch_equals_dense():
  """The Pallas grouped matmul (interpreted on CPU) inside the full model, forward and gradient."""
  from flax import nnx

  from deepseek_jax import get_preset
  from deepseek_jax.model import DeepseekForCausalLM
  from deepseek_jax.params import flat_state, model_from_flat
  cfg = get_preset("tiny_v3")
  flat = flat_state(DeepseekForCausalLM(cfg, rngs=nnx.Rngs(0)))
  ids = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 9)), jnp.int32)
  out = {}
  for method in ("dense", "pallas"):
    model = model_from_flat(cfg.replace(moe_dispatch=method), flat)
    step = nnx.jit(lambda m: (m(ids), *nnx.value_and_grad(lambda m: jnp.mean(m(ids) ** 2))(m)))
    logits, loss, grads = step(model)
    out[method] = (logits, loss, grads.layers[1].mlp.experts.gate_proj[...])
  np.testing.assert_allclose(np.asarray(out["pallas"][0]), np.asarray(out["dense"][0]), atol=1e-5)
  np.testing.assert_allclose(float(out["pallas"][1]), float(out["dense"][1]), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(out["pallas"][2]), np.asarray(out["dense"][2]), atol=1e-6,
                             rtol=1e-4)
