"""The plan for the published DeepSeek-V3 config.json: 671B parameters, the released names, shapes
and dtypes (FP8 with 128x128 block scales), without touching any weight."""

import json
import os
import subprocess
import sys

import pytest

from deepseek_jax.convert.planner import format_plan, make_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# deepseek-ai/DeepSeek-V3 config.json as published.
V3_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                 "AutoModel": "modeling_deepseek.DeepseekV3Model",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
    "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1,
    "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168,
    "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "model_type": "deepseek_v3", "moe_intermediate_size": 2048,
    "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1,
    "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1,
    "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                     "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                     "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16", "transformers_version": "4.33.1", "use_cache": True,
    "v_head_dim": 128, "vocab_size": 129280,
}

# (name, shape, dtype) as in the released files.
PUBLISHED = [
    ("model.embed_tokens.weight", (129280, 7168), "BF16"),
    ("lm_head.weight", (129280, 7168), "BF16"),
    ("model.norm.weight", (7168,), "BF16"),
    ("model.layers.0.self_attn.q_a_proj.weight", (1536, 7168), "F8_E4M3"),
    ("model.layers.0.self_attn.q_a_proj.weight_scale_inv", (12, 56), "F32"),
    ("model.layers.0.self_attn.q_b_proj.weight", (24576, 1536), "F8_E4M3"),
    ("model.layers.0.self_attn.q_b_proj.weight_scale_inv", (192, 12), "F32"),
    ("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", (576, 7168), "F8_E4M3"),
    ("model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv", (5, 56), "F32"),
    ("model.layers.0.self_attn.kv_b_proj.weight", (32768, 512), "F8_E4M3"),
    ("model.layers.0.self_attn.o_proj.weight", (7168, 16384), "F8_E4M3"),
    ("model.layers.0.mlp.down_proj.weight", (7168, 18432), "F8_E4M3"),
    ("model.layers.0.mlp.down_proj.weight_scale_inv", (56, 144), "F32"),
    ("model.layers.3.mlp.gate.weight", (256, 7168), "BF16"),
    ("model.layers.3.mlp.gate.e_score_correction_bias", (256,), "F32"),
    ("model.layers.3.mlp.experts.255.down_proj.weight", (7168, 2048), "F8_E4M3"),
    ("model.layers.3.mlp.experts.255.down_proj.weight_scale_inv", (56, 16), "F32"),
    ("model.layers.60.mlp.shared_experts.gate_proj.weight", (2048, 7168), "F8_E4M3"),
    ("model.layers.61.eh_proj.weight", (7168, 14336), "BF16"),
    ("model.layers.61.enorm.weight", (7168,), "BF16"),
    ("model.layers.61.shared_head.head.weight", (129280, 7168), "BF16"),
    ("model.layers.61.embed_tokens.weight", (129280, 7168), "BF16"),
    ("model.layers.61.mlp.experts.0.up_proj.weight", (2048, 7168), "F8_E4M3"),
]


@pytest.fixture(scope="module")
def plan():
  return make_plan(V3_CONFIG)


def test_v3_plan_has_the_published_sizes(plan):
  assert round(plan.cfg.num_params() / 1e9) == 671
  assert int(plan.cfg.num_params(active=True) / 1e9) == 37
  rows = {r.hf_name: r for r in plan.rows}
  # The released files hold 685B parameters: 671B main model + 14B MTP (its copies included).
  released = sum(__import__("math").prod(r.hf_shape) for r in plan.rows
                 if not r.hf_name.endswith("_scale_inv"))
  assert 684e9 < released < 686e9  # "685B" on Hugging Face
  for name, shape, dtype in PUBLISHED:
    assert name in rows, name
    assert (rows[name].hf_shape, rows[name].hf_dtype) == (shape, dtype), name
  assert "model.layers.62.enorm.weight" not in rows and "model.layers.2.mlp.gate.weight" not in rows
  e = rows["model.layers.3.mlp.experts.255.down_proj.weight"]
  assert (e.ours, e.our_shape, e.our_dtype) == ("layers.3.mlp.experts.down_proj", (256, 2048, 7168),
                                                "bfloat16")
  assert rows["model.layers.3.mlp.gate.e_score_correction_bias"].our_dtype == "float32"
  assert rows["model.layers.61.eh_proj.weight"].ours == "mtp.0.eh_proj.kernel"
  # ~689 GB of files (FP8 + scales), 1.37 TB as bfloat16 ours.
  assert 680e9 < plan.hf_bytes < 700e9 and 1.3e12 < plan.our_bytes < 1.4e12
  # Host memory: a few copies of the largest tensor (stacked experts, 7.5 GB bf16), not the model.
  largest = 256 * 2048 * 7168 * 2
  assert largest <= plan.host_to_orbax <= 4 * largest and plan.host_to_hf <= 2 * largest


def test_plan_text_and_cli(tmp_path, plan):
  text = format_plan(plan)
  assert "671.0B without MTP" in text and "model.layers.3.mlp.experts.255.down_proj.weight" in text
  (tmp_path / "config.json").write_text(json.dumps(V3_CONFIG))
  out = subprocess.run([sys.executable, "-m", "deepseek_jax.convert.plan", f"--config={tmp_path / 'config.json'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-2000:]
  line = next(l for l in out.stdout.splitlines()
              if l.startswith("model.layers.3.mlp.experts.255.down_proj.weight "))
  assert "[7168, 2048]" in line and "F8_E4M3" in line and "[256, 2048, 7168]" in line


def test_plan_errors_name_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    make_plan(tmp_path)
  (tmp_path / "config.json").write_text("{oops")
  with pytest.raises(ValueError, match="config.json: not valid JSON"):
    make_plan(tmp_path / "config.json")
