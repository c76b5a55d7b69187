"""The name table: released (Hugging Face) tensor names <-> our parameter paths, with transforms.

One declarative table per scope (top level, decoder layer, MTP module) plus three transforms:
  copy       same array (norm scales, embeddings, biases, the router correction bias);
  transpose  torch Linear [out, in] <-> our kernel [in, out];
  experts    E per-expert tensors `…experts.{e}.<proj>.weight` [out, in] <-> one stacked [E, in, out].
Entries are derived from the model's own parameter list for a config, so every parameter has
exactly one rule (a parameter without one is an error, not a silent skip).

The released MTP layer k lives at HF index num_hidden_layers + k and also carries copies of the
embedding (`embed_tokens`) and output head (`shared_head.head`); ours shares the main ones, so
those two are written on export (`mtp_copies`) and only checked for presence on import.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from deepseek_jax.config import DeepseekConfig
from deepseek_jax.params import variable_specs

COPY, TRANSPOSE, EXPERTS = "copy", "transpose", "experts"

# (our suffix, HF suffix, transform), inside one decoder layer (`layers.{i}.` / `model.layers.{i}.`).
_LAYER = (
    ("input_layernorm.scale", "input_layernorm.weight", COPY),
    ("post_attention_layernorm.scale", "post_attention_layernorm.weight", COPY),
    ("self_attn.q_proj.kernel", "self_attn.q_proj.weight", TRANSPOSE),
    ("self_attn.q_a_proj.kernel", "self_attn.q_a_proj.weight", TRANSPOSE),
    ("self_attn.q_a_proj.bias", "self_attn.q_a_proj.bias", COPY),
    ("self_attn.q_a_layernorm.scale", "self_attn.q_a_layernorm.weight", COPY),
    ("self_attn.q_b_proj.kernel", "self_attn.q_b_proj.weight", TRANSPOSE),
    ("self_attn.kv_a_proj_with_mqa.kernel", "self_attn.kv_a_proj_with_mqa.weight", TRANSPOSE),
    ("self_attn.kv_a_proj_with_mqa.bias", "self_attn.kv_a_proj_with_mqa.bias", COPY),
    ("self_attn.kv_a_layernorm.scale", "self_attn.kv_a_layernorm.weight", COPY),
    ("self_attn.kv_b_proj.kernel", "self_attn.kv_b_proj.weight", TRANSPOSE),
    ("self_attn.o_proj.kernel", "self_attn.o_proj.weight", TRANSPOSE),
    ("self_attn.o_proj.bias", "self_attn.o_proj.bias", COPY),
    ("mlp.gate_proj.kernel", "mlp.gate_proj.weight", TRANSPOSE),
    ("mlp.up_proj.kernel", "mlp.up_proj.weight", TRANSPOSE),
    ("mlp.down_proj.kernel", "mlp.down_proj.weight", TRANSPOSE),
    ("mlp.gate.kernel", "mlp.gate.weight", TRANSPOSE),
    ("mlp.gate.e_score_correction_bias", "mlp.gate.e_score_correction_bias", COPY),
    ("mlp.experts.gate_proj", "mlp.experts.{e}.gate_proj.weight", EXPERTS),
    ("mlp.experts.up_proj", "mlp.experts.{e}.up_proj.weight", EXPERTS),
    ("mlp.experts.down_proj", "mlp.experts.{e}.down_proj.weight", EXPERTS),
    ("mlp.shared_experts.gate_proj.kernel", "mlp.shared_experts.gate_proj.weight", TRANSPOSE),
    ("mlp.shared_experts.up_proj.kernel", "mlp.shared_experts.up_proj.weight", TRANSPOSE),
    ("mlp.shared_experts.down_proj.kernel", "mlp.shared_experts.down_proj.weight", TRANSPOSE),
)
_TOP = (
    ("embed_tokens.embedding", "model.embed_tokens.weight", COPY),
    ("norm.scale", "model.norm.weight", COPY),
    ("lm_head.kernel", "lm_head.weight", TRANSPOSE),
)
# Inside MTP module k (`mtp.{k}.` / `model.layers.{num_hidden_layers + k}.`); its decoder block's
# parameters (`mtp.{k}.block.*`) use the layer table at the same HF prefix.
_MTP = (
    ("enorm.scale", "enorm.weight", COPY),
    ("hnorm.scale", "hnorm.weight", COPY),
    ("eh_proj.kernel", "eh_proj.weight", TRANSPOSE),
    ("shared_head_norm.scale", "shared_head.norm.weight", COPY),
)


@dataclasses.dataclass(frozen=True)
class Entry:
  """One of our parameters and the released tensor(s) it comes from."""
  ours: str                  # dotted path in the unrolled layout
  shape: tuple[int, ...]     # our shape
  dtype: str                 # our dtype name, as the abstract model gives it
  hf: tuple[str, ...]        # one name, or E names for `experts`
  transform: str             # copy | transpose | experts

  def hf_shape(self) -> tuple[int, ...]:
    """Shape of each released tensor of this entry."""
    if self.transform == COPY:
      return self.shape
    if self.transform == TRANSPOSE:
      return self.shape[::-1]
    return self.shape[1:][::-1]

  def to_ours(self, tensors: Sequence[np.ndarray]) -> np.ndarray:
    """Our array from the released tensor(s), in the order of `self.hf`."""
    if self.transform == COPY:
      return tensors[0]
    if self.transform == TRANSPOSE:
      return tensors[0].T
    return np.stack([t.T for t in tensors])

  def to_hf(self, value: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """The released (name, tensor) pairs of our array."""
    if self.transform == COPY:
      return [(self.hf[0], value)]
    if self.transform == TRANSPOSE:
      return [(self.hf[0], np.ascontiguousarray(value.T))]
    return [(name, np.ascontiguousarray(value[e].T)) for e, name in enumerate(self.hf)]


def _rule(table, suffix: str):
  for ours, hf, transform in table:
    if ours == suffix:
      return hf, transform
  return None


def _hf_for(cfg: DeepseekConfig, path: str) -> tuple[tuple[str, ...], str]:
  parts = path.split(".")
  if parts[0] == "layers":
    table, prefix, suffix = _LAYER, f"model.layers.{parts[1]}.", ".".join(parts[2:])
  elif parts[0] == "mtp":
    prefix = f"model.layers.{cfg.num_hidden_layers + int(parts[1])}."
    if parts[2] == "block":
      table, suffix = _LAYER, ".".join(parts[3:])
    else:
      table, suffix = _MTP, ".".join(parts[2:])
  else:
    table, prefix, suffix = _TOP, "", path
  rule = _rule(table, suffix)
  if rule is None:
    raise KeyError(f"no released name for parameter {path!r}")
  hf, transform = rule
  if transform == EXPERTS:
    return tuple(prefix + hf.format(e=e) for e in range(cfg.n_routed_experts)), transform
  return (prefix + hf,), transform


def entries(cfg: DeepseekConfig, *, param_dtype="float32") -> list[Entry]:
  """Every variable of the model for `cfg` (unrolled layout) with its released names; shapes and
  dtypes from the abstract model with `param_dtype`."""
  out = []
  for path, spec in variable_specs(cfg, param_dtype=param_dtype, scanned=False).items():
    hf, transform = _hf_for(cfg, path)
    out.append(Entry(path, tuple(spec.shape), np.dtype(spec.dtype).name, hf, transform))
  return out


def mtp_copies(cfg: DeepseekConfig) -> list[Entry]:
  """The released MTP layers' copies of the embedding and head (written on export)."""
  out = []
  head_path = "embed_tokens.embedding" if cfg.tie_word_embeddings else "lm_head.kernel"
  v, d = cfg.vocab_size, cfg.hidden_size
  for k in range(cfg.num_nextn_predict_layers):
    prefix = f"model.layers.{cfg.num_hidden_layers + k}."
    out.append(Entry("embed_tokens.embedding", (v, d), "float32", (prefix + "embed_tokens.weight",), COPY))
    if cfg.tie_word_embeddings:
      out.append(Entry(head_path, (v, d), "float32", (prefix + "shared_head.head.weight",), COPY))
    else:
      out.append(Entry(head_path, (d, v), "float32", (prefix + "shared_head.head.weight",), TRANSPOSE))
  return out


def is_mtp_name(cfg: DeepseekConfig, hf_name: str) -> bool:
  """Whether a released tensor belongs to an MTP layer (index >= num_hidden_layers)."""
  parts = hf_name.split(".")
  return (len(parts) > 2 and parts[0] == "model" and parts[1] == "layers"
          and parts[2].isdigit() and int(parts[2]) >= cfg.num_hidden_layers)
