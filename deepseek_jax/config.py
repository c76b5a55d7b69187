"""DeepSeek-V2/V3/R1 architecture description, read from and written to Hugging Face `config.json`.

`DeepseekConfig` holds every architecture field of the released `config.json` files
(`model_type` deepseek_v2 and deepseek_v3) under their Hugging Face names, plus runtime
choices of ours (`RUNTIME_FIELDS`) that are never written to `config.json`: how the model runs
(`moe_dispatch`, `mla_decode`, `remat`, `lora_alpha`, `router_dtype`), and how its variables are
laid out (`LAYOUT_FIELDS`: `scan_layers`; LoRA adapters `lora_rank`/`lora_targets`; a frozen base
stored in int8 or FP8, `weight_quant`). `read_config_json` is the one reader of `config.json`
files.

Derived figures (parameter counts, KV-cache bytes, FLOPs per token) are computed from the fields,
so presets can be checked against the published totals (671B/37B for V3, 15.7B/2.4B for V2-Lite).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import json
import logging
import math
import os
import typing
from typing import Any, Mapping

from deepseek_jax.json_file import read_json_object

log = logging.getLogger(__name__)

TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SCORING_FUNCS = ("softmax", "sigmoid")
HIDDEN_ACTS = ("silu",)
ROPE_TYPES = ("default", "yarn")
MOE_DISPATCHES = ("auto", "dense", "ragged", "blocked", "capacity", "native", "pallas")
MLA_DECODES = ("auto", "xla", "pallas")
WEIGHT_QUANTS = ("none", "int8", "fp8")
ROUTER_DTYPES = ("float32", "bfloat16")
# Runtime fields that change the variables (their structure or storage), not only how they run.
LAYOUT_FIELDS = ("scan_layers", "lora_rank", "lora_targets", "weight_quant")
RUNTIME_FIELDS = ("moe_dispatch", "mla_decode", "remat", "lora_alpha", "router_dtype",
                  *LAYOUT_FIELDS)
# Where LoRA adapters go by default: every attention projection and every MLP / expert projection
# (`name` patterns: "self_attn.q_a_proj", "mlp.gate_proj", "mlp.shared_experts.up_proj",
# "mlp.experts" for the routed experts). The router ("mlp.gate") never gets one.
LORA_TARGETS = ("self_attn.*", "mlp.*")
MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
# Fields a config.json must give (the dataclass defaults are DeepSeek-V3's: a missing width would
# silently plan a 7168-wide model). Null is a value (q_lora_rank, n_routed_experts).
REQUIRED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                   "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
                   "qk_rope_head_dim", "v_head_dim", "n_routed_experts")
REQUIRED_MOE_FIELDS = ("moe_intermediate_size", "num_experts_per_tok")
REQUIRED_GROUP_FIELDS = ("n_group", "topk_group")  # unless topk_method is greedy
# No model beyond this many parameters is plausible (DeepSeek-V3: 6.7e11): a larger config is a
# typo (vocab_size 1e12) and is refused with its size before anything is planned or allocated.
MAX_PARAMS = 10**13

# Keys of released or transformers-written configs that carry no architecture information (or that
# are read through another key): accepted silently.
_KNOWN_NON_ARCH_KEYS = frozenset({
    "architectures", "auto_map", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "quantization_config", "pretraining_tp", "attention_dropout", "ep_size", "output_router_logits",
    "router_aux_loss_coef", "num_experts", "num_local_experts", "head_dim", "qk_head_dim",
    "rope_scaling", "rope_parameters", "_name_or_path", "return_dict", "output_hidden_states",
    "output_attentions", "tie_encoder_decoder", "chunk_size_feed_forward", "is_encoder_decoder",
    "id2label", "label2id", "problem_type", "tokenizer_class", "mlp_bias", "mlp_layer_types",
    "base_model_tp_plan", "base_model_pp_plan", "experts_implementation",
})


@dataclasses.dataclass(frozen=True)
class DeepseekConfig:
  """Architecture of a DeepSeek-V2/V3 model; field names follow the Hugging Face `config.json`."""

  model_type: str = "deepseek_v3"
  vocab_size: int = 129280
  hidden_size: int = 7168
  intermediate_size: int = 18432          # dense MLP layers
  moe_intermediate_size: int = 2048       # each routed / shared expert
  num_hidden_layers: int = 61
  num_attention_heads: int = 128
  num_key_value_heads: int | None = None  # MLA: always equal to the heads; kept for round trips
  q_lora_rank: int | None = 1536          # None: full q projection (V2-Lite)
  kv_lora_rank: int = 512
  qk_nope_head_dim: int = 128
  qk_rope_head_dim: int = 64
  v_head_dim: int = 128
  n_routed_experts: int | None = 256      # None: every layer dense
  n_shared_experts: int = 1
  num_experts_per_tok: int = 8
  n_group: int = 8
  topk_group: int = 4
  topk_method: str = "noaux_tc"
  scoring_func: str = "sigmoid"
  norm_topk_prob: bool = True
  routed_scaling_factor: float = 2.5
  first_k_dense_replace: int = 3
  moe_layer_freq: int = 1
  hidden_act: str = "silu"
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_type: str = "yarn"                 # "default" or "yarn"
  rope_factor: float = 40.0
  original_max_position_embeddings: int = 4096
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: float = 1.0
  mscale_all_dim: float = 1.0
  rope_interleave: bool = True
  max_position_embeddings: int = 163840
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  num_nextn_predict_layers: int = 1
  bos_token_id: int | None = 0
  eos_token_id: int | None = 1
  pad_token_id: int | None = None
  initializer_range: float = 0.02
  aux_loss_alpha: float = 0.001           # balance-loss weight the release was trained with
  seq_aux: bool = True                    # sequence-wise (True) or batch-wise balance loss
  # Runtime choices of ours; never written to config.json.
  moe_dispatch: str = "auto"              # auto | dense | ragged | blocked | capacity | native | pallas
  mla_decode: str = "auto"                # auto | xla | pallas: absorbed decode-step attention
  scan_layers: bool = False               # stack identical layers and run them with nnx.scan
  remat: bool = False                     # recompute each layer's activations in the backward pass
  lora_rank: int = 0                      # LoRA adapters of this rank (0: none)
  lora_alpha: float = 16.0                # LoRA scale alpha / rank
  lora_targets: tuple[str, ...] = LORA_TARGETS  # fnmatch patterns of projection names
  weight_quant: str = "none"              # none | int8 (per channel) | fp8 (128x128 blocks)
  router_dtype: str = "float32"           # float32 (transformers) | bfloat16 (DeepSeek's inference
                                          # code: router and the routed experts' sum in bf16)

  def __post_init__(self):
    self.validate()

  # ------------------------------------------------------------------ validation
  def validate(self) -> None:
    """Raises ValueError naming the first field of the wrong type or value; then refuses a model
    of more than MAX_PARAMS parameters, stating its size."""
    def need(cond: bool, field: str, what: str):
      if not cond:
        raise ValueError(f"DeepseekConfig.{field}={getattr(self, field)!r}: {what}")

    for f, kinds in _field_kinds().items():
      v = getattr(self, f)
      if v is None and type(None) in kinds:
        continue
      if isinstance(v, bool) and bool not in kinds:  # JSON true is not the number 1
        ok = False
      else:
        ok = isinstance(v, tuple(k for k in kinds if k is not type(None)))
      if ok and isinstance(v, float) and not math.isfinite(v):
        ok = False
      if not ok:
        want = " or ".join({int: "an integer", float: "a finite number", bool: "true or false",
                            str: "a string", tuple: "a tuple", type(None): "null"}[k] for k in kinds
                           if not (k is int and float in kinds))
        raise ValueError(f"DeepseekConfig.{f}={v!r} ({type(v).__name__}): expected {want}")

    for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "kv_lora_rank", "qk_rope_head_dim", "v_head_dim",
              "max_position_embeddings"):
      need(isinstance(getattr(self, f), int) and getattr(self, f) > 0, f, "must be a positive int")
    need(isinstance(self.qk_nope_head_dim, int) and self.qk_nope_head_dim >= 0,
         "qk_nope_head_dim", "must be a non-negative int")
    need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "must be even (RoPE rotates pairs)")
    need(self.q_lora_rank is None or (isinstance(self.q_lora_rank, int) and self.q_lora_rank > 0),
         "q_lora_rank", "must be a positive int or null")
    need(self.model_type in MODEL_TYPES, "model_type", f"must be one of {MODEL_TYPES}")
    need(self.topk_method in TOPK_METHODS, "topk_method", f"must be one of {TOPK_METHODS}")
    need(self.scoring_func in SCORING_FUNCS, "scoring_func", f"must be one of {SCORING_FUNCS}")
    need(self.hidden_act in HIDDEN_ACTS, "hidden_act", f"must be one of {HIDDEN_ACTS}")
    need(self.rope_type in ROPE_TYPES, "rope_type", f"must be one of {ROPE_TYPES}")
    need(self.moe_dispatch in MOE_DISPATCHES, "moe_dispatch", f"must be one of {MOE_DISPATCHES}")
    need(self.mla_decode in MLA_DECODES, "mla_decode", f"must be one of {MLA_DECODES}")
    need(self.weight_quant in WEIGHT_QUANTS, "weight_quant", f"must be one of {WEIGHT_QUANTS}")
    need(isinstance(self.lora_rank, int) and self.lora_rank >= 0, "lora_rank",
         "must be an int >= 0 (0: no adapters)")
    need(self.lora_alpha > 0, "lora_alpha", "must be positive")
    need(isinstance(self.lora_targets, tuple) and all(isinstance(t, str) and t
                                                      for t in self.lora_targets),
         "lora_targets", "must be a tuple of name patterns")
    need(self.router_dtype in ROUTER_DTYPES, "router_dtype", f"must be one of {ROUTER_DTYPES}")
    need(self.rms_norm_eps > 0, "rms_norm_eps", "must be positive")
    need(self.rope_theta > 0, "rope_theta", "must be positive")
    need(self.rope_factor > 0, "rope_factor", "must be positive")
    need(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers", "must be >= 0")
    need(self.first_k_dense_replace >= 0, "first_k_dense_replace", "must be >= 0")
    need(self.moe_layer_freq >= 1, "moe_layer_freq", "must be >= 1")
    if self.num_key_value_heads is not None:
      need(self.num_key_value_heads == self.num_attention_heads, "num_key_value_heads",
           "MLA shares one latent across heads; must equal num_attention_heads or be null")
    if self.n_routed_experts is not None:
      need(isinstance(self.n_routed_experts, int) and self.n_routed_experts > 0,
           "n_routed_experts", "must be a positive int or null")
      need(self.moe_intermediate_size > 0, "moe_intermediate_size", "must be positive")
      need(self.n_shared_experts >= 0, "n_shared_experts", "must be >= 0")
      need(0 < self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok",
           f"must be in [1, n_routed_experts={self.n_routed_experts}]")
      need(self.n_group >= 1, "n_group", "must be >= 1")
      need(self.n_routed_experts % self.n_group == 0, "n_group",
           f"must divide n_routed_experts={self.n_routed_experts}")
      need(1 <= self.topk_group <= self.n_group, "topk_group", f"must be in [1, n_group={self.n_group}]")
      need(self.routed_scaling_factor > 0, "routed_scaling_factor", "must be positive")
      if self.topk_method == "noaux_tc":
        need(self.n_routed_experts // self.n_group >= 2, "n_group",
             "noaux_tc scores a group by its top-2 experts: needs >= 2 experts per group")
    if self.scan_layers and self.is_moe and self.moe_layer_freq != 1:
      raise ValueError("DeepseekConfig.scan_layers=True needs moe_layer_freq=1 "
                       f"(got {self.moe_layer_freq}): scanned layers must be identical")
    n = self.num_params(include_mtp=True)
    if n > MAX_PARAMS:
      raise ValueError(
          f"DeepseekConfig: {n:,} parameters ({n * 2 / 1e12:,.0f} TB in bfloat16) is beyond any "
          f"plausible model (limit {MAX_PARAMS:.0e}; DeepSeek-V3 has 6.7e11): check vocab_size="
          f"{self.vocab_size}, hidden_size={self.hidden_size}, num_hidden_layers="
          f"{self.num_hidden_layers}, n_routed_experts={self.n_routed_experts}, "
          f"moe_intermediate_size={self.moe_intermediate_size}")

  # ------------------------------------------------------------------ structure
  @property
  def is_moe(self) -> bool:
    return self.n_routed_experts is not None

  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim

  def is_moe_layer(self, i: int) -> bool:
    """DeepSeek's rule: MoE from `first_k_dense_replace` on, every `moe_layer_freq` layers."""
    return self.is_moe and i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

  @property
  def num_dense_layers(self) -> int:
    return sum(not self.is_moe_layer(i) for i in range(self.num_hidden_layers))

  @property
  def softmax_scale(self) -> float:
    """qk_head_dim**-0.5, times YaRN's mscale(factor, mscale_all_dim)**2 as DeepSeek does."""
    scale = self.qk_head_dim ** -0.5
    if self.rope_type == "yarn" and self.mscale_all_dim:
      m = yarn_mscale(self.rope_factor, self.mscale_all_dim)
      scale *= m * m
    return scale

  def replace(self, **kw) -> "DeepseekConfig":
    return dataclasses.replace(self, **kw)

  def has_lora(self, name: str) -> bool:
    """Whether the projection `name` (e.g. "self_attn.kv_b_proj", "mlp.experts") carries a LoRA
    adapter: `lora_rank` > 0 and `name` matches one of `lora_targets`."""
    return self.lora_rank > 0 and any(fnmatch.fnmatchcase(name, p) for p in self.lora_targets)

  @property
  def lora_scale(self) -> float:
    return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

  # ------------------------------------------------------------------ derived figures
  def attention_params(self) -> int:
    d, h = self.hidden_size, self.num_attention_heads
    b = int(self.attention_bias)
    if self.q_lora_rank is None:
      q = d * h * self.qk_head_dim
    else:
      r = self.q_lora_rank
      q = d * r + b * r + r + r * h * self.qk_head_dim
    kv_a = self.kv_lora_rank + self.qk_rope_head_dim
    kv = d * kv_a + b * kv_a + self.kv_lora_rank + self.kv_lora_rank * h * (self.qk_nope_head_dim + self.v_head_dim)
    o = h * self.v_head_dim * d + b * d
    return q + kv + o

  def _expert_params(self) -> int:
    return 3 * self.hidden_size * self.moe_intermediate_size

  def _layer_params(self, i: int, active: bool) -> int:
    d = self.hidden_size
    n = self.attention_params() + 2 * d
    if self.is_moe_layer(i):
      e = self.n_routed_experts
      n += d * e + (e if self.topk_method == "noaux_tc" else 0)
      n += (self.num_experts_per_tok if active else e) * self._expert_params()
      n += self.n_shared_experts * self._expert_params()
    else:
      n += 3 * d * self.intermediate_size
    return n

  def _mtp_params(self, active: bool) -> int:
    d = self.hidden_size
    per = 2 * d + 2 * d * d + d + self._layer_params(self.num_hidden_layers, active)
    return self.num_nextn_predict_layers * per

  def num_params(self, *, active: bool = False, include_mtp: bool = False) -> int:
    """Total (or activated per token) parameters; published figures exclude the MTP modules."""
    n = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2) + self.hidden_size
    n += sum(self._layer_params(i, active) for i in range(self.num_hidden_layers))
    if include_mtp:
      n += self._mtp_params(active)
    return n

  def kv_cache_bytes_per_token(self, bytes_per_element: int = 2) -> int:
    """MLA caches one latent (kv_lora_rank) and one rope key (qk_rope_head_dim) per layer."""
    return self.num_hidden_layers * (self.kv_lora_rank + self.qk_rope_head_dim) * bytes_per_element

  def flops_per_token(self, seq_len: int, *, training: bool = False) -> float:
    """Matmul FLOPs per token: 2 x active non-embedding params plus causal attention (mean context
    seq_len/2); x3 for training (forward plus backward)."""
    n = self.num_params(active=True) - self.vocab_size * self.hidden_size  # embedding is a gather
    attn = 2 * self.num_hidden_layers * self.num_attention_heads * (
        self.qk_head_dim + self.v_head_dim) * (seq_len / 2)
    f = 2 * n + attn
    return 3 * f if training else f

  # ------------------------------------------------------------------ Hugging Face config.json
  @classmethod
  def from_hf(cls, path_or_dict: str | os.PathLike | Mapping[str, Any], *, _source: str = "<dict>",
              **overrides) -> "DeepseekConfig":
    """Reads a `config.json` (a path, a directory holding one, or a dict) in the released layout
    (`rope_scaling` + `rope_theta`) or the one newer transformers writes (`rope_parameters`).
    Errors name the file (`_source` names where a dict came from)."""
    if isinstance(path_or_dict, Mapping):
      raw, source = dict(path_or_dict), _source
    else:
      raw, source = read_config_json(path_or_dict)
    fields = {f.name for f in dataclasses.fields(cls)} - set(RUNTIME_FIELDS)
    kw: dict[str, Any] = {}
    for k, v in raw.items():
      if k in fields and k not in ("rope_type", "rope_factor", "beta_fast", "beta_slow", "mscale",
                                   "mscale_all_dim", "original_max_position_embeddings"):
        kw[k] = v
    if "model_type" not in raw:
      raise ValueError(f"{source}: missing 'model_type' (expected one of {MODEL_TYPES})")
    if "n_routed_experts" not in raw:
      for alias in ("num_local_experts", "num_experts"):
        if raw.get(alias) is not None:
          kw["n_routed_experts"] = raw[alias]
    if raw["model_type"] == "deepseek_v2":  # transformers' DeepseekV2Config defaults
      kw.setdefault("scoring_func", "softmax")
      kw.setdefault("topk_method", "greedy")
      kw.setdefault("rope_interleave", True)
      kw.setdefault("first_k_dense_replace", 0)
      kw.setdefault("norm_topk_prob", False)
      kw.setdefault("routed_scaling_factor", 1.0)
      for k in ("n_group", "topk_group"):  # transformers writes null for "no groups"
        if k in kw and kw[k] is None:
          kw[k] = 1
    elif raw["model_type"] == "deepseek_v3":
      kw.setdefault("scoring_func", "sigmoid")
      kw.setdefault("topk_method", "noaux_tc")
    if kw.get("num_key_value_heads") == kw.get("num_attention_heads"):
      kw["num_key_value_heads"] = None  # MLA's only valid value; kept implicit so presets compare equal
    kw.update(_read_rope(raw, source))
    for k in ("eos_token_id", "bos_token_id", "pad_token_id"):
      if isinstance(kw.get(k), list):  # some configs list several; the first is the default
        kw[k] = kw[k][0] if kw[k] else None
    unknown = sorted(set(raw) - fields - _KNOWN_NON_ARCH_KEYS
                     - {"rope_type", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
                        "original_max_position_embeddings", "rope_factor"})
    if unknown:
      log.warning("%s: ignoring keys DeepseekConfig does not use: %s", source, ", ".join(unknown))
    kw.update(overrides)
    missing = [f for f in REQUIRED_FIELDS if f not in kw]
    if kw.get("n_routed_experts", True) is not None:
      missing += [f for f in REQUIRED_MOE_FIELDS if f not in kw]
      if kw.get("topk_method", "noaux_tc") != "greedy":
        missing += [f for f in REQUIRED_GROUP_FIELDS if f not in kw]
    if missing:
      raise ValueError(f"{source}: missing required field(s) {', '.join(missing)} (the defaults "
                       "are DeepSeek-V3's and would describe another model)")
    try:
      return cls(**kw)
    except (TypeError, ValueError) as e:
      raise ValueError(f"{source}: {e}") from e

  def to_hf(self) -> dict[str, Any]:
    """The `config.json` dict in the released layout; transformers' from_pretrained reads it."""
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    for k in (*RUNTIME_FIELDS, "rope_type", "rope_factor", "beta_fast", "beta_slow",
              "mscale", "mscale_all_dim", "original_max_position_embeddings"):
      d.pop(k)
    if d["num_key_value_heads"] is None:
      d["num_key_value_heads"] = self.num_attention_heads
    arch = "DeepseekV3ForCausalLM" if self.model_type == "deepseek_v3" else "DeepseekV2ForCausalLM"
    d["architectures"] = [arch]
    if self.rope_type == "yarn":
      d["rope_scaling"] = {
          "type": "yarn", "rope_type": "yarn", "factor": self.rope_factor,
          "original_max_position_embeddings": self.original_max_position_embeddings,
          "beta_fast": self.beta_fast, "beta_slow": self.beta_slow,
          "mscale": self.mscale, "mscale_all_dim": self.mscale_all_dim,
      }
    else:
      d["rope_scaling"] = None
    return d

  def save(self, directory: str | os.PathLike) -> str:
    """Writes `config.json` atomically into `directory`; returns its path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(os.fspath(directory), "config.json")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(self.to_hf(), f, indent=2)
    os.replace(tmp, path)
    return path


@functools.lru_cache(maxsize=None)
def _field_kinds() -> dict[str, tuple[type, ...]]:
  """{field: the Python types its annotation allows} (int | None -> (int, NoneType))."""
  out = {}
  for f, t in typing.get_type_hints(DeepseekConfig).items():
    kinds = typing.get_args(t) if typing.get_origin(t) in (typing.Union, type(int | None)) else (t,)
    kinds = tuple(typing.get_origin(k) or k for k in kinds)  # tuple[str, ...] -> tuple
    # a float field takes JSON integers (rope_theta: 10000)
    out[f] = tuple(kinds) + ((int,) if float in kinds else ())
  return out


def read_config_json(path: str | os.PathLike) -> tuple[dict[str, Any], str]:
  """(the JSON object, its file path) of a `config.json` file or of the directory holding one."""
  p = os.fspath(path)
  if os.path.isdir(p):
    p = os.path.join(p, "config.json")
  if not os.path.isfile(p):
    raise FileNotFoundError(f"{p}: no config.json there")
  return read_json_object(p), p


def _read_rope(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
  """RoPE fields from `rope_scaling`+`rope_theta` (released) or `rope_parameters` (transformers 5)."""
  out: dict[str, Any] = {}
  rs = raw.get("rope_parameters")
  if rs is None:
    rs = raw.get("rope_scaling")
  if rs is not None and not isinstance(rs, Mapping):
    raise ValueError(f"{source}: rope_scaling/rope_parameters must be an object, got {rs!r}")
  rs = dict(rs or {})
  theta = rs.get("rope_theta", raw.get("rope_theta"))
  for name, v in (("rope_theta", theta), ("rope_scaling.factor", rs.get("factor"))):
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
      raise ValueError(f"{source}: {name}={v!r} ({type(v).__name__}): expected a number")
  if theta is not None:
    out["rope_theta"] = float(theta)
  rtype = rs.get("rope_type", rs.get("type", "default"))
  if rtype not in ROPE_TYPES:
    raise ValueError(f"{source}: rope type {rtype!r} is not supported (expected one of {ROPE_TYPES})")
  out["rope_type"] = rtype
  if rtype == "yarn":
    if rs.get("factor") is None:
      raise ValueError(f"{source}: yarn rope scaling needs 'factor'")
    out["rope_factor"] = float(rs["factor"])
    for k in ("original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
      if rs.get(k) is not None:
        out[k] = rs[k]
    out.setdefault("mscale", 1.0)
    out.setdefault("mscale_all_dim", 0.0)
  return out


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
  """YaRN's attention temperature: 0.1 * mscale * ln(scale) + 1 (1 when scale <= 1)."""
  if scale <= 1:
    return 1.0
  return 0.1 * mscale * math.log(scale) + 1.0
