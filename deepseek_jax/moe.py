"""DeepSeekMoE: fine-grained routed experts plus always-on shared experts.

Routing, per token (float32 throughout):
  1. logits = x W_gate; scores s = softmax(logits) or sigmoid(logits) (`scoring_func`).
  2. Choice (`topk_method`):
     - greedy: the K highest scores;
     - group_limited_greedy (V2): experts split in `n_group` groups scored by their best expert;
       only the best `topk_group` groups compete;
     - noaux_tc (V3): choice scores s + b (the `e_score_correction_bias`, steering the choice
       only); groups scored by the sum of their top-2 choice scores; the best `topk_group` groups
       compete.
  3. Weights are the raw scores s of the chosen experts (never s + b); divided by their sum when
     `norm_topk_prob`; times `routed_scaling_factor`.
  (transformers' DeepseekV2 never renormalises; DeepSeek's own V2 code does when norm_topk_prob
  is set, which no released V2 config does. We follow DeepSeek.)
Output: shared_experts(x) + sum_k w_k expert_k(x).

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
from deepseek_jax.layers import MLP, LoRAParam, dense_init, frozen_weight, lora_init


class RouterBias(nnx.Variable):
  """noaux_tc's per-expert correction bias: moved by the balancing rule, never by gradients."""


class RouterOutput(NamedTuple):
  scores: jax.Array       # [..., E] float32 raw scores (softmax or sigmoid)
  topk_idx: jax.Array     # [..., K] int32
  topk_weight: jax.Array  # [..., K] float32, normalised and scaled


def route(cfg: DeepseekConfig, logits: jax.Array, bias: jax.Array | None,
          topk_idx: jax.Array | None = None) -> RouterOutput:
  """Top-k expert choice and weights from router logits [N, E] (see the module docstring).

  `topk_idx` [N, K] (routing replay: the experts an earlier forward chose, e.g. at sampling time
  in RL) replaces step 2's choice; the weights are still computed by step 3 from these logits,
  so they stay differentiable in the router."""
  logits = logits.astype(jnp.float32)
  scores = jax.nn.sigmoid(logits) if cfg.scoring_func == "sigmoid" else jax.nn.softmax(logits, -1)
  n, e = scores.shape
  g = cfg.n_group
  if cfg.topk_method == "noaux_tc":
    choice = scores + bias.astype(jnp.float32)[None, :]
    group_scores = jnp.sum(jax.lax.top_k(choice.reshape(n, g, e // g), 2)[0], axis=-1)  # [N, G]
    fill = -jnp.inf
  elif cfg.topk_method == "group_limited_greedy":
    choice = scores
    group_scores = jnp.max(choice.reshape(n, g, e // g), axis=-1)
    fill = 0.0
  else:
    choice, group_scores, fill = scores, None, None
  if group_scores is not None and cfg.topk_group < g:
    _, top_groups = jax.lax.top_k(group_scores, cfg.topk_group)  # [N, topk_group]
    group_mask = jnp.any(jax.nn.one_hot(top_groups, g, dtype=jnp.bool_), axis=1)  # [N, G]
    expert_mask = jnp.repeat(group_mask, e // g, axis=1)  # [N, E]
    choice = jnp.where(expert_mask, choice, fill)
  if topk_idx is None:
    _, topk_idx = jax.lax.top_k(choice, cfg.num_experts_per_tok)  # [N, K]
  weight = jnp.take_along_axis(scores, topk_idx, axis=-1)
  if cfg.norm_topk_prob:
    weight = weight / (jnp.sum(weight, axis=-1, keepdims=True) + 1e-20)
  weight = weight * cfg.routed_scaling_factor
  return RouterOutput(scores, topk_idx.astype(jnp.int32), weight)


class Router(nnx.Module):
  """The `gate`: a bias-free [D, E] projection, plus the correction bias for noaux_tc."""

  def __init__(self, cfg: DeepseekConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.cfg = cfg
    self.kernel = nnx.Param(dense_init(cfg)(rngs.params(), (cfg.hidden_size, cfg.n_routed_experts),
                                            param_dtype))
    if cfg.topk_method == "noaux_tc":
      self.e_score_correction_bias = RouterBias(jnp.zeros((cfg.n_routed_experts,), jnp.float32))

  def __call__(self, x: jax.Array, topk_idx: jax.Array | None = None) -> RouterOutput:  # x [N, D]
    logits = jnp.einsum("nd,de->ne", x.astype(jnp.float32), self.kernel[...].astype(jnp.float32))
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
        setattr(self, f"{name}_lora_a", LoRAParam(lora_init(k)(rngs.params(), (e, k, r),
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
    return routed_experts(x.astype(self.dtype), route_out.topk_idx, route_out.topk_weight,
                          *map(self.weights, self.PROJECTIONS),
                          method=dispatch.resolve(self.cfg.moe_dispatch))


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
