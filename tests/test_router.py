"""Routing from the equations: `norm_topk_prob` with softmax as DeepSeek's V2 code has it, and
`router_dtype="bfloat16"` as DeepSeek's official inference code (deepseek-ai/DeepSeek-V3,
inference/model.py: `Gate.forward` and `MoE.forward`) computes it, written here in numpy with
explicit bfloat16 rounding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from deepseek_jax import get_preset
from deepseek_jax.config import DeepseekConfig
from deepseek_jax.model import DeepseekForCausalLM, replace_config
from deepseek_jax.moe import MoE, route, sum_in_expert_order

BF16 = ml_dtypes.bfloat16


def _bf(x):
  """Rounds to bfloat16 (nearest even), kept as float32."""
  return np.asarray(x, np.float32).astype(BF16).astype(np.float32)


def _top(x, k):
  """Indices of the k largest entries per row, ties to the lower index (as lax.top_k)."""
  return np.argsort(-x, axis=-1, kind="stable")[..., :k]


def official_gate(cfg: DeepseekConfig, logits_bf16: np.ndarray, bias: np.ndarray | None,
                  scores: np.ndarray):
  """DeepSeek's Gate.forward in bf16: `scores` are sigmoid or softmax of the bf16 logits in
  float32 (the primitive's own rounding); everything after is written out here."""
  n, e = logits_bf16.shape
  if cfg.scoring_func == "sigmoid":
    scores = _bf(scores)                                     # scores.sigmoid() on bf16
  original = scores
  choice = scores + bias if bias is not None else scores     # bf16 + f32 bias -> f32
  if cfg.n_group > 1:
    grouped = choice.reshape(n, cfg.n_group, -1)
    if bias is None:
      group_scores = grouped.max(-1)
    else:
      group_scores = np.sort(grouped, -1)[..., -2:].sum(-1)
    keep = _top(group_scores, cfg.topk_group)
    mask = np.ones((n, cfg.n_group), bool)
    np.put_along_axis(mask, keep, False, axis=1)
    choice = np.where(np.repeat(mask, e // cfg.n_group, axis=1), -np.inf, choice)
  idx = _top(choice, cfg.num_experts_per_tok)
  w = np.take_along_axis(original, idx, axis=1)
  if cfg.scoring_func == "sigmoid":
    w = _bf(w / _bf(w.sum(-1, keepdims=True)))              # weights /= weights.sum() in bf16
    w = _bf(w * cfg.routed_scaling_factor)                   # weights *= route_scale in bf16
  else:
    w = _bf(w * cfg.routed_scaling_factor)                   # f32, then .type_as(x)
  return idx, w


def _sorted(idx, w):
  order = np.argsort(idx, -1)
  return np.take_along_axis(idx, order, 1), np.take_along_axis(np.asarray(w, np.float32), order, 1)


@pytest.mark.parametrize("name", ["tiny_v3", "tiny_v2"])
def test_bf16_router_is_deepseeks_gate(name):
  cfg = get_preset(name, router_dtype="bfloat16")
  rng = np.random.RandomState(0)
  logits = (rng.randn(256, cfg.n_routed_experts) * 2).astype(BF16)
  bias = (rng.randn(cfg.n_routed_experts) * 0.3).astype(np.float32) if name == "tiny_v3" else None
  f32 = jnp.asarray(logits.astype(np.float32))
  scores = np.asarray(jax.nn.sigmoid(f32) if cfg.scoring_func == "sigmoid"
                      else jax.nn.softmax(f32, -1))
  want_idx, want_w = _sorted(*official_gate(cfg, logits, bias, scores))
  r = route(cfg, jnp.asarray(logits), None if bias is None else jnp.asarray(bias))
  assert r.topk_weight.dtype == jnp.bfloat16
  got_idx, got_w = _sorted(np.asarray(r.topk_idx), np.asarray(r.topk_weight.astype(jnp.float32)))
  np.testing.assert_array_equal(got_idx, want_idx)
  np.testing.assert_array_equal(got_w, want_w)  # bit for bit
  # and it is not the float32 router: the bf16 scores choose other experts for some tokens
  r32 = route(cfg.replace(router_dtype="float32"), jnp.asarray(logits),
              None if bias is None else jnp.asarray(bias))
  w32 = _sorted(np.asarray(r32.topk_idx), np.asarray(r32.topk_weight))[1]
  assert not np.array_equal(w32, want_w)


def test_expert_sum_is_deepseeks_bf16_accumulation_in_expert_order():
  rng = np.random.RandomState(1)
  n, k, e, d = 64, 4, 16, 32
  idx = np.stack([rng.permutation(e)[:k] for _ in range(n)]).astype(np.int32)
  outs = _bf(rng.randn(n, k, d) * 3)
  w = _bf(rng.rand(n, k) * 2.5)
  want = np.zeros((n, d), np.float32)
  for t in range(n):  # y = zeros_like(x); for i in experts (ascending): y[idx] += out * w
    for j in np.argsort(idx[t]):
      want[t] = _bf(want[t] + _bf(outs[t, j] * w[t, j]))
  got = sum_in_expert_order(jnp.asarray(outs, jnp.bfloat16), jnp.asarray(idx),
                            jnp.asarray(w, jnp.bfloat16))
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), want)
  once = _bf((outs * w[..., None]).sum(1))  # float32 sum rounded once: differs
  assert (once != want).mean() > 0.05


def test_moe_layer_with_bf16_router_follows_deepseeks_moe_forward():
  """The whole layer (router GEMM in bf16, experts one copy at a time, the bf16 sum, shared
  experts) against DeepSeek's MoE.forward written in numpy on the same bf16 weights."""
  cfg = get_preset("tiny_v3", router_dtype="bfloat16", moe_dispatch="dense")
  layer = MoE(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  rng = np.random.RandomState(2)
  for p in (layer.gate.kernel, layer.experts.gate_proj, layer.experts.up_proj,
            layer.experts.down_proj):
    p[...] = jnp.asarray(rng.randn(*p.shape) * 0.15, jnp.bfloat16)
  layer.gate.e_score_correction_bias[...] = jnp.asarray(rng.randn(cfg.n_routed_experts) * 0.05,
                                                        jnp.float32)
  x = jnp.asarray(rng.randn(1, 96, cfg.hidden_size), jnp.bfloat16)
  y, r = layer(x)

  xf = np.asarray(x[0].astype(jnp.float32))
  logits = (xf @ np.asarray(layer.gate.kernel[...].astype(jnp.float32))).astype(BF16)
  scores = np.asarray(jax.nn.sigmoid(jnp.asarray(logits.astype(np.float32))))
  idx, w = official_gate(cfg, logits, np.asarray(layer.gate.e_score_correction_bias[...]), scores)
  wg, wu, wd = (np.asarray(p[...].astype(jnp.float32)) for p in (
      layer.experts.gate_proj, layer.experts.up_proj, layer.experts.down_proj))
  routed = np.zeros_like(xf)
  for t in range(xf.shape[0]):
    for j in np.argsort(idx[t]):
      ex = idx[t, j]
      h = _bf(_bf(_bf(xf[t] @ wg[ex]) / (1 + np.exp(-_bf(xf[t] @ wg[ex])))) * _bf(xf[t] @ wu[ex]))
      routed[t] = _bf(routed[t] + _bf(_bf(h @ wd[ex]) * w[t, j]))
  shared = np.asarray(layer.shared_experts(x)[0].astype(jnp.float32))
  want = _bf(routed + shared)
  got_idx = np.sort(np.asarray(r.topk_idx[0]), -1)
  assert (got_idx == np.sort(idx, -1)).all(-1).mean() == 1.0
  # the expert matmuls accumulate in another order than numpy's: bf16 rounding apart
  got = np.asarray(y[0].astype(jnp.float32))
  assert np.abs(got - want).max() <= 4 * np.abs(want).max() * 2.0**-8


def test_router_dtype_is_a_runtime_field():
  cfg = get_preset("tiny_v3", router_dtype="bfloat16")
  assert "router_dtype" not in cfg.to_hf()
  assert DeepseekConfig.from_hf(cfg.to_hf()) == cfg.replace(router_dtype="float32")
  with pytest.raises(ValueError, match="router_dtype"):
    get_preset("tiny_v3", router_dtype="float16")
  model = DeepseekForCausalLM(get_preset("tiny_v3"), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  official = replace_config(model, router_dtype="bfloat16")
  assert official.cfg.router_dtype == "bfloat16" and model.cfg.router_dtype == "float32"
  x = jnp.asarray(np.random.RandomState(3).randn(512, 64), jnp.bfloat16)
  a, b = model.layers[1].mlp.gate(x), official.layers[1].mlp.gate(x)  # the same weights
  changed = (np.sort(a.topk_idx, -1) != np.sort(b.topk_idx, -1)).any(-1).mean()
  # measured 8.6% of these tokens choose another expert set (DeepSeek: ~7.5% at V3 sizes)
  assert 0.02 < changed < 0.3


@pytest.mark.parametrize("norm,k,want_sum", [(True, 4, 1.0), (False, 4, None), (True, 1, None)])
def test_norm_topk_prob_with_softmax_normalises_instead_of_scaling(norm, k, want_sum):
  """DeepSeek's V2 code: `if top_k > 1 and norm_topk_prob: w /= w.sum() else: w *= scale`
  (ours used to normalise and then scale; transformers ignores the flag)."""
  cfg = get_preset("tiny_v2", norm_topk_prob=norm, num_experts_per_tok=k)
  logits = jnp.asarray(np.random.RandomState(4).randn(32, cfg.n_routed_experts), jnp.float32)
  r = route(cfg, logits, None)
  raw = np.take_along_axis(np.asarray(jax.nn.softmax(logits, -1)), np.asarray(r.topk_idx), 1)
  if want_sum is not None:
    np.testing.assert_allclose(np.asarray(r.topk_weight), raw / raw.sum(-1, keepdims=True),
                               rtol=1e-6)
  else:
    np.testing.assert_allclose(np.asarray(r.topk_weight), raw * cfg.routed_scaling_factor,
                               rtol=1e-6)
  # sigmoid (V3) normalises and then scales
  v3 = get_preset("tiny_v3")
  s = route(v3, logits, jnp.zeros((v3.n_routed_experts,)))
  np.testing.assert_allclose(np.asarray(s.topk_weight).sum(-1), v3.routed_scaling_factor,
                             rtol=1e-6)
