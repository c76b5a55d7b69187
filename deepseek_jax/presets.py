"""Named configurations: the released models (values from their `config.json`) and tiny test models."""

from __future__ import annotations

from deepseek_jax.config import DeepseekConfig

_V3 = DeepseekConfig()  # the dataclass defaults are DeepSeek-V3's released config

_V2 = DeepseekConfig(
    model_type="deepseek_v2", vocab_size=102400, hidden_size=5120, intermediate_size=12288,
    moe_intermediate_size=1536, num_hidden_layers=60, num_attention_heads=128, q_lora_rank=1536,
    kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    n_routed_experts=160, n_shared_experts=2, num_experts_per_tok=6, n_group=8, topk_group=3,
    topk_method="group_limited_greedy", scoring_func="softmax", norm_topk_prob=False,
    routed_scaling_factor=16.0, first_k_dense_replace=1, moe_layer_freq=1, rms_norm_eps=1e-6,
    rope_theta=10000.0, rope_type="yarn", rope_factor=40.0, original_max_position_embeddings=4096,
    beta_fast=32.0, beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707,
    max_position_embeddings=163840, num_nextn_predict_layers=0, bos_token_id=100000,
    eos_token_id=100001, aux_loss_alpha=0.003, seq_aux=True)

_V2_LITE = _V2.replace(
    hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27,
    num_attention_heads=16, q_lora_rank=None, n_routed_experts=64, n_shared_experts=2,
    num_experts_per_tok=6, n_group=1, topk_group=1, topk_method="greedy",
    routed_scaling_factor=1.0, aux_loss_alpha=0.001)

# Tiny models for tests and demos: every architectural feature on, every size small.
_TINY = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
    num_hidden_layers=3, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32,
    qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
    num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1, rope_factor=4.0,
    original_max_position_embeddings=64, max_position_embeddings=256, bos_token_id=0,
    eos_token_id=1)
# Group-limited routing that can go wrong visibly (as in the releases: V2 160 experts in 8 groups,
# top-3 groups, top-6): 4 experts per group, so a group's top-2 sum differs from its sum and from
# its best expert, and top-k larger than topk_group, so the k experts come from several groups
# but not from all of them.
_TINY_GROUPS = dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)

# mscale != mscale_all_dim: the cos/sin attention factor differs from 1 (the releases keep it 1).
_TINY_V3 = _V3.replace(**{**_TINY, **_TINY_GROUPS}, n_shared_experts=1, mscale=1.0,
                       mscale_all_dim=0.707, num_nextn_predict_layers=1)

_TINY_V2 = _V2.replace(**{**_TINY, **_TINY_GROUPS}, n_shared_experts=2, routed_scaling_factor=2.0)

_TINY_V2_LITE = _V2.replace(**{**_TINY, "q_lora_rank": None, "n_group": 1, "topk_group": 1},
                            n_shared_experts=2, topk_method="greedy", routed_scaling_factor=1.0)

PRESETS: dict[str, DeepseekConfig] = {
    "deepseek_v3": _V3,
    "deepseek_r1": _V3,  # R1 shares V3's architecture; only the weights differ
    "deepseek_v2": _V2,
    "deepseek_v2_lite": _V2_LITE,
    "tiny_v3": _TINY_V3,
    "tiny_v2": _TINY_V2,
    "tiny_v2_lite": _TINY_V2_LITE,
}


def get_preset(name: str, **overrides) -> DeepseekConfig:
  """A named preset, optionally with some fields replaced."""
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
