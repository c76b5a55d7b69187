"""DeepSeekMoE: fine-grained routed experts plus always-on shared experts.

Routing, per token (float32 unless `router_dtype` says otherwise):
  1. logits = x W_gate; scores s = softmax(logits) or sigmoid(logits) (`scoring_func`).
  2. Choice (`topk_method`):
     - greedy: the K highest scores;
     - group_limited_greedy (V2): experts split in `n_group` groups scored by their best expert;
       only the best `topk_group` groups compete;
     - noaux_tc (V3): choice scores s + b (the `e_score_correction_bias`, steering the choice
       only); groups scored by the sum of their top-2 choice scores; the best `topk_group` groups
       compete.
  3. Weights are the raw scores s of the chosen experts (never s + b), then
     - sigmoid: divided by their sum when `norm_topk_prob`, times `routed_scaling_factor`
       (DeepSeek-V3 and transformers alike);
     - softmax: divided by their sum INSTEAD of scaled when `norm_topk_prob` (and K > 1), else
       times `routed_scaling_factor`. This follows DeepSeek's own V2 code; transformers'
       DeepseekV2 ignores `norm_topk_prob`, and no released V2 config sets it.
Output: shared_experts(x) + sum_k w_k expert_k(x).

`router_dtype="bfloat16"` reproduces DeepSeek's official inference code (deepseek-ai/DeepSeek-V3,
inference/model.py, `Gate` and `MoE`), for evaluating against its published serving numerics:
  logits = bf16(x_bf16 W_bf16) (float32 accumulation, rounded once); sigmoid scores
  s = bf16(sigmoid(logits)), softmax scores float32 of the bf16 logits; the choice s + b in
  float32 (b stays float32); sigmoid weights bf16(w / bf16(sum w)), then bf16(w * scale); softmax
  weights bf16(w * scale). The routed sum starts at zero in bf16 and adds, in ascending expert
  order, bf16(expert_e(x) * w_e), rounding to bf16 after each addition
  (`sum_in_expert_order`). The default float32 router is what transformers computes.

Legend: B batch, T length, N = B*T tokens, D hidden, E experts, K experts per token, G groups, I width.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from deepseek_jax import dispatch, quant
from deepseek_jax.config import DeepseekConfig
from deepseek_jax.expert_parallel import routed_experts
from deepseek_jax.layers import MLP, LoRAParam, dense_init, frozen_weight, lora_init, param_key

_BF16 = jnp.bfloat16


class RouterBias(nnx.Variable):
  """noaux_tc's per-expert correction bias: moved by the balancing rule, never by gradients."""


class RouterOutput(NamedTuple):
  scores: jax.Array       # [..., E] float32 raw scores (softmax or sigmoid)
  topk_idx: jax.Array     # [..., K] int32
  topk_weight: jax.Array  # [..., K] normalised and scaled; float32 (bfloat16 with router_dtype)


def group_scores(cfg: DeepseekConfig, choice: jax.Array) -> jax.Array | None:
  """[N, G] how each group competes (step 2): noaux_tc by the sum of its top-2 choice scores,
  group_limited_greedy by its best score; None for greedy (no groups)."""
  n, e = choice.shape
  grouped = choice.reshape(n, cfg.n_group, e // cfg.n_group)  # [N, G, E/G]
  if cfg.topk_method == "noaux_tc":
    return jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)
  if cfg.topk_method == "group_limited_greedy":
    return jnp.max(grouped, axis=-1)
  return None


def limit_to_groups(choice: jax.Array, scores: jax.Array, keep: int, fill: float) -> jax.Array:
  """choice [N, E] with the experts outside each token's `keep` best groups (by scores [N, G])
  set to `fill`."""
  n, e = choice.shape
  g = scores.shape[-1]
  _, top_groups = jax.lax.top_k(scores, keep)  # [N, keep]
  group_mask = jnp.any(jax.nn.one_hot(top_groups, g, dtype=jnp.bool_), axis=1)  # [N, G]
  return jnp.where(jnp.repeat(group_mask, e // g, axis=1), choice, fill)


def route(cfg: DeepseekConfig, logits: jax.Array, bias: jax.Array | None,
          topk_idx: jax.Array | None = None) -> RouterOutput:
  """Top-k expert choice and weights from router logits [N, E] (see the module docstring;
  with `router_dtype` bfloat16 the logits are expected already rounded to bfloat16).

  `topk_idx` [N, K] (routing replay: the experts an earlier forward chose, e.g. at sampling time
  in RL) replaces step 2's choice; the weights are still computed by step 3 from these logits,
  so they stay differentiable in the router."""
  bf16 = cfg.router_dtype == "bfloat16"
  f32 = logits.astype(jnp.float32)
  if cfg.scoring_func == "sigmoid":
    scores = jax.nn.sigmoid(f32)
    if bf16:
      scores = scores.astype(_BF16).astype(jnp.float32)
  else:
    scores = jax.nn.softmax(f32, -1)
  if cfg.topk_method == "noaux_tc":
    choice, fill = scores + bias.astype(jnp.float32)[None, :], -jnp.inf
  else:
    choice, fill = scores, 0.0
  by_group = group_scores(cfg, choice)
  if by_group is not None and cfg.topk_group < cfg.n_group:
    choice = limit_to_groups(choice, by_group, cfg.topk_group, fill)
  k = cfg.num_experts_per_tok
  if topk_idx is None:
    _, topk_idx = jax.lax.top_k(choice, k)  # [N, K]
  weight = jnp.take_along_axis(scores, topk_idx, axis=-1)
  total = jnp.sum(weight, axis=-1, keepdims=True)
  if cfg.scoring_func == "softmax" and cfg.norm_topk_prob and k > 1:
    weight = weight / (total + 1e-20)  # DeepSeek's V2 code: normalised instead of scaled
  elif bf16 and cfg.scoring_func == "sigmoid":  # as DeepSeek's code rounds: each op in bf16
    if cfg.norm_topk_prob:
      weight = (weight / total.astype(_BF16).astype(jnp.float32)).astype(_BF16)
    weight = (weight.astype(jnp.float32) * cfg.routed_scaling_factor).astype(_BF16)
  else:
    if cfg.norm_topk_prob and cfg.scoring_func == "sigmoid":
      weight = weight / (total + 1e-20)
    weight = weight * cfg.routed_scaling_factor
  if bf16:
    weight = weight.astype(_BF16)
  return RouterOutput(scores, topk_idx.astype(jnp.int32), weight)


def sum_in_expert_order(outputs: jax.Array, topk_idx: jax.Array, topk_weight: jax.Array,
                        dtype=_BF16) -> jax.Array:
  """DeepSeek's inference code's routed sum: per token, starting from zero in `dtype`, add
  round(output_k * w_k) in ascending expert order, rounding to `dtype` after each addition.
  outputs [N, K, D] (each copy's expert output), topk_idx / topk_weight [N, K] -> [N, D]."""
  order = jnp.argsort(topk_idx, axis=-1)                                        # [N, K]
  outs = jnp.take_along_axis(outputs, order[..., None], axis=1).astype(jnp.float32)
  ws = jnp.take_along_axis(topk_weight, order, axis=1).astype(jnp.float32)
  y = jnp.zeros((outputs.shape[0], outputs.shape[2]), dtype)                     # [N, D]
  for k in range(outputs.shape[1]):
    term = (outs[:, k] * ws[:, k, None]).astype(dtype)
    y = (y.astype(jnp.float32) + term.astype(jnp.float32)).astype(dtype)
  return y


class Router(nnx.Module):
  """The `gate`: a bias-free [D, E] projection, plus the correction bias for noaux_tc."""

  def __init__(self, cfg: DeepseekConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.cfg = cfg
    self.kernel = nnx.Param(dense_init(cfg)(
        param_key(rngs), (cfg.hidden_size, cfg.n_routed_experts), param_dtype))
    if cfg.topk_method == "noaux_tc":
      self.e_score_correction_bias = RouterBias(jnp.zeros((cfg.n_routed_experts,), jnp.float32))

  def __call__(self, x: jax.Array, topk_idx: jax.Array | None = None
               ) -> RouterOutput:  # x [N, D]; topk_idx [N, K] replay
    if self.cfg.router_dtype == "bfloat16":
      logits = jnp.einsum("nd,de->ne", x.astype(_BF16), self.kernel[...].astype(_BF16),
                          preferred_element_type=jnp.float32).astype(_BF16)
    else:
      logits = jnp.einsum("nd,de->ne", x.astype(jnp.float32),
                          self.kernel[...].astype(jnp.float32))
    bias = self.e_score_correction_bias[...] if self.cfg.topk_method == "noaux_tc" else None
    return route(self.cfg, logits, bias, topk_idx)


class RoutedExperts(nnx.Module):
  """E SwiGLU experts stored stacked: gate_proj, up_proj [E, D, I]; down_proj [E, I, D].

  Dispatched by `cfg.moe_dispatch`, read when the layer runs ("auto": by the platform it is
  traced for), through the expert-parallel exchange when the active mesh splits experts. With
  `cfg.weight_quant` each projection is stored quantized (`<proj>_scale` beside it) and
  dequantized for the layer's call; with a LoRA adapter ("mlp.experts" in `cfg.lora_targets`)
  each expert has its own `<proj>_lora_a` [E, in, r] and `<proj>_lora_b` [E, r, out], applied
  through the same grouped dispatch as the base weights."""

  PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

  def __init__(self, cfg: DeepseekConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    e, d, i = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    self.cfg = cfg
    self.dtype = dtype
    for name, (k, n) in zip(self.PROJECTIONS, ((d, i), (d, i), (i, d))):
      w, scale = frozen_weight(cfg, (e, k, n), dense_init(cfg), rngs, param_dtype)
      setattr(self, name, w)
      if scale is not None:
        setattr(self, f"{name}_scale", scale)
    self.lora_scale = cfg.lora_scale if cfg.has_lora("mlp.experts") else 0.0
    if self.lora_scale:
      r = cfg.lora_rank
      for name, (k, n) in zip(self.PROJECTIONS, ((d, i), (d, i), (i, d))):
        setattr(self, f"{name}_lora_a", LoRAParam(lora_init(k)(param_key(rngs), (e, k, r),
                                                                jnp.float32)))
        setattr(self, f"{name}_lora_b", LoRAParam(jnp.zeros((e, r, n), jnp.float32)))

  def weights(self, name: str, dtype=None) -> dispatch.ExpertWeights:
    """One projection for the dispatch, in `dtype` (default: the compute dtype): dequantized,
    with its adapter (B scaled by alpha/r)."""
    dtype = dtype or self.dtype
    w = getattr(self, name)[...]
    if self.cfg.weight_quant != "none":
      w = quant.dequantize(w, getattr(self, f"{name}_scale")[...], self.cfg.weight_quant, dtype)
    if not self.lora_scale:
      return dispatch.ExpertWeights(w.astype(dtype))
    a = getattr(self, f"{name}_lora_a")[...].astype(dtype)
    b = getattr(self, f"{name}_lora_b")[...].astype(dtype) * self.lora_scale
    return dispatch.ExpertWeights(w.astype(dtype), a, b)

  def merged(self, name: str, dtype=jnp.float32) -> jax.Array:
    """w + a b · alpha/r [E, in, out]: the projection with its adapter merged in."""
    p = self.weights(name, dtype)
    return p.w if p.a is None else p.w + p.a @ p.b

  def __call__(self, x: jax.Array, route_out: RouterOutput) -> jax.Array:  # x [N, D]
    w = [self.weights(name) for name in self.PROJECTIONS]
    method = dispatch.resolve(self.cfg.moe_dispatch)
    x = x.astype(self.dtype)
    if self.cfg.router_dtype != "bfloat16":
      return routed_experts(x, route_out.topk_idx, route_out.topk_weight, *w, method=method)
    # each copy's output alone (unit weight: exact), then DeepSeek's bf16 sum in expert order
    ones = jnp.ones(route_out.topk_idx.shape[:1] + (1,), jnp.float32)
    outs = jnp.stack([routed_experts(x, route_out.topk_idx[:, k:k + 1], ones, *w, method=method)
                      for k in range(route_out.topk_idx.shape[1])], axis=1)  # [N, K, D]
    return sum_in_expert_order(outs, route_out.topk_idx, route_out.topk_weight).astype(self.dtype)


class MoE(nnx.Module):
  """Router, routed experts and shared experts; returns the output and the routing decision."""

  def __init__(self, cfg: DeepseekConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.cfg = cfg
    self.gate = Router(cfg, param_dtype=param_dtype, rngs=rngs)
    self.experts = RoutedExperts(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if cfg.n_shared_experts:
      self.shared_experts = MLP(cfg, cfg.moe_intermediate_size * cfg.n_shared_experts,
                                name="mlp.shared_experts", dtype=dtype, param_dtype=param_dtype,
                                rngs=rngs)

  def __call__(self, x: jax.Array, topk_idx: jax.Array | None = None
               ) -> tuple[jax.Array, RouterOutput]:  # x [B, T, D]; topk_idx [B, T, K] replay
    flat = x.reshape(-1, x.shape[-1])  # [N, D]
    r = self.gate(flat, None if topk_idx is None else topk_idx.reshape(flat.shape[0], -1))
    y = self.experts(flat, r).reshape(x.shape)
    if self.cfg.n_shared_experts:
      y = y + self.shared_experts(x)
    lead = x.shape[:-1]
    return y, RouterOutput(r.scores.reshape(*lead, -1), r.topk_idx.reshape(*lead, -1),
                           r.topk_weight.reshape(*lead, -1))
