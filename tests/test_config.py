"""DeepseekConfig: presets, Hugging Face round trips, derived figures, validation."""

import json
import logging

import pytest

from deepseek_jax import DeepseekConfig, PRESETS, get_preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_round_trips_through_hf(name, tmp_path):
  cfg = PRESETS[name]
  assert DeepseekConfig.from_hf(cfg.to_hf()) == cfg
  cfg.save(tmp_path)
  assert DeepseekConfig.from_hf(tmp_path) == cfg
  assert DeepseekConfig.from_hf(tmp_path / "config.json") == cfg


@pytest.mark.parametrize("name", ["tiny_v3", "tiny_v2", "tiny_v2_lite"])
def test_transformers_reads_to_hf_and_we_read_what_it_writes(name, tmp_path):
  transformers = pytest.importorskip("transformers")
  cfg = get_preset(name)
  cls = transformers.DeepseekV3Config if cfg.model_type == "deepseek_v3" else transformers.DeepseekV2Config
  hf = cls(**cfg.to_hf())
  assert hf.q_lora_rank == cfg.q_lora_rank and hf.kv_lora_rank == cfg.kv_lora_rank
  hf.save_pretrained(tmp_path)  # transformers 5 writes `rope_parameters`
  written = json.loads((tmp_path / "config.json").read_text())
  assert "rope_parameters" in written
  assert DeepseekConfig.from_hf(tmp_path) == cfg


# Published totals: DeepSeek-V3 671B total / 37B activated; DeepSeek-V2 236B / 21B;
# DeepSeek-V2-Lite 15.7B / 2.4B (model cards). Totals exclude the MTP module.
@pytest.mark.parametrize("name,total,active", [
    ("deepseek_v3", 671e9, 37e9), ("deepseek_r1", 671e9, 37e9),
    ("deepseek_v2", 236e9, 21e9), ("deepseek_v2_lite", 15.7e9, 2.4e9)])
def test_parameter_counts_match_published(name, total, active):
  cfg = PRESETS[name]
  assert cfg.num_params() == pytest.approx(total, rel=0.01)
  # Activated counts are published rounded to two digits; ours counts every parameter a token
  # touches but the embedding lookup (the head's matmul included).
  non_embedding_active = cfg.num_params(active=True) - cfg.vocab_size * cfg.hidden_size
  assert non_embedding_active == pytest.approx(active, rel=0.025)


def test_v3_counts_by_hand():
  cfg = PRESETS["deepseek_v3"]
  d, h = 7168, 128
  attn = d * 1536 + 1536 + 1536 * h * 192 + d * 576 + 512 + 512 * h * 256 + h * 128 * d
  expert = 3 * d * 2048
  dense_layer = attn + 2 * d + 3 * d * 18432
  moe_layer_total = attn + 2 * d + d * 256 + 256 + 257 * expert
  moe_layer_active = attn + 2 * d + d * 256 + 256 + 9 * expert
  embed = 129280 * d
  assert cfg.num_params() == 2 * embed + d + 3 * dense_layer + 58 * moe_layer_total
  assert cfg.num_params(active=True) == 2 * embed + d + 3 * dense_layer + 58 * moe_layer_active
  mtp = 2 * d + 2 * d * d + d + moe_layer_total
  assert cfg.num_params(include_mtp=True) == cfg.num_params() + mtp
  assert cfg.kv_cache_bytes_per_token() == 61 * 576 * 2
  assert cfg.flops_per_token(4096, training=True) == pytest.approx(
      3 * cfg.flops_per_token(4096), rel=1e-12)
  assert cfg.flops_per_token(1) > 2 * 36e9  # at least twice the active matmul parameters


def test_released_v3_config_json_reads():
  raw = {
      "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
      "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
      "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_nextn_predict_layers": 1,
      "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1,
      "n_routed_experts": 256, "ep_size": 1, "routed_scaling_factor": 2.5, "kv_lora_rank": 512,
      "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
      "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8,
      "moe_layer_freq": 1, "first_k_dense_replace": 3, "norm_topk_prob": True,
      "scoring_func": "sigmoid", "hidden_act": "silu", "max_position_embeddings": 163840,
      "initializer_range": 0.02, "rms_norm_eps": 1e-06, "use_cache": True, "bos_token_id": 0,
      "eos_token_id": 1, "rope_theta": 10000, "attention_bias": False, "attention_dropout": 0.0,
      "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.33.1",
      "auto_map": {}, "pretraining_tp": 1,
      "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                              "quant_method": "fp8", "weight_block_size": [128, 128]},
      "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                       "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                       "type": "yarn"},
  }
  assert DeepseekConfig.from_hf(raw) == PRESETS["deepseek_v3"]


def test_unknown_keys_warn_once_listing_them(caplog):
  raw = dict(PRESETS["tiny_v3"].to_hf(), shiny_new_key=1, another=2)
  with caplog.at_level(logging.WARNING):
    DeepseekConfig.from_hf(raw)
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1 and "another" in warnings[0] and "shiny_new_key" in warnings[0]


@pytest.mark.parametrize("field,value", [
    ("n_group", 3),                      # 16 experts not divisible by 3 groups
    ("topk_group", 5),                   # more groups kept than exist (n_group 4)
    ("num_experts_per_tok", 17),         # more than n_routed_experts
    ("topk_method", "random"),
    ("scoring_func", "relu"),
    ("hidden_act", "gelu"),
    ("hidden_size", 0),
    ("kv_lora_rank", -4),
    ("num_hidden_layers", 0),
    ("q_lora_rank", 0),
])
def test_invalid_config_names_its_field(field, value):
  with pytest.raises(ValueError, match=field):
    get_preset("tiny_v3", **{field: value})


def test_bad_config_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    DeepseekConfig.from_hf(tmp_path)
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(ValueError, match="config.json"):
    DeepseekConfig.from_hf(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
  with pytest.raises(ValueError, match="model_type"):
    DeepseekConfig.from_hf(tmp_path)
  with pytest.raises(ValueError, match="unknown preset"):
    get_preset("deepseek_v9")


@pytest.mark.parametrize("edit,says", [
    (lambda r: r.pop("hidden_size"), "missing required field(s) hidden_size"),
    (lambda r: r.pop("num_experts_per_tok"), "missing required field(s) num_experts_per_tok"),
    (lambda r: r.pop("topk_group"), "missing required field(s) topk_group"),
    (lambda r: r.update(rms_norm_eps="1e-6"), "rms_norm_eps='1e-6' (str): expected a finite number"),
    (lambda r: r.update(num_hidden_layers=True), "num_hidden_layers=True (bool): expected an integer"),
    (lambda r: r.update(tie_word_embeddings=1), "tie_word_embeddings=1 (int): expected true or false"),
    (lambda r: r.update(q_lora_rank=32.0), "q_lora_rank=32.0 (float): expected an integer or null"),
    (lambda r: r.update(vocab_size=1e12), "vocab_size=1000000000000.0 (float): expected an integer"),
    (lambda r: r.update(vocab_size=10**12), "TB in bfloat16) is beyond any plausible model"),
    (lambda r: r.update(rope_theta="1e4"), "rope_theta='1e4' (str): expected a number"),
    (lambda r: r.update(routed_scaling_factor=float("nan")), "routed_scaling_factor=nan"),
], ids=["no hidden_size", "no top-k", "no topk_group", "str number", "true as 1", "1 as true",
        "float rank", "float vocab", "1e12 vocab", "str rope_theta", "nan"])
def test_config_json_mistakes_are_named(tmp_path, edit, says):
  """Before: a missing width planned a 7168-wide model, a string number failed with a comparison
  error naming no field, `true` passed as 1 and vocab_size 1e12 planned 1,024 TB silently."""
  raw = get_preset("tiny_v3").to_hf()
  edit(raw)
  (tmp_path / "config.json").write_text(json.dumps(raw))
  with pytest.raises(ValueError) as e:
    DeepseekConfig.from_hf(tmp_path)
  assert says in str(e.value) and str(tmp_path / "config.json") in str(e.value), str(e.value)


def test_v2_defaults_are_transformers_v2_defaults_not_v3s():
  raw = get_preset("tiny_v2_lite").to_hf()
  del raw["routed_scaling_factor"]
  raw.update(n_group=None, topk_group=None)  # what transformers writes for "no groups"
  cfg = DeepseekConfig.from_hf(raw)
  assert cfg.routed_scaling_factor == 1.0 and (cfg.n_group, cfg.topk_group) == (1, 1)
