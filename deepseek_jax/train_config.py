"""`TrainConfig`: everything a training run needs, one field per flag of `python -m deepseek_jax.train`.

The flags are generated from the fields (name, type, default, help, choices, bounds), so the two
cannot drift apart; `flag_specs()` is what the CLI defines.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from absl import flags

from deepseek_jax import data as data_lib
from deepseek_jax import optim
from deepseek_jax.config import LORA_TARGETS, MOE_DISPATCHES

# The flags `define_flags` defines are its caller's key flags (its --helpshort), not this module's.
flags.disclaim_key_flags()

DATA_FORMATS = ("text", "chat", "prompt_completion")
BASE_DTYPES = ("float32", "bfloat16", "int8", "fp8")


def _f(default, help: str, **meta):  # noqa: A002 - the flag's help text
  return dataclasses.field(default=default, metadata={"help": help, **meta})


@dataclasses.dataclass(frozen=True)
class ModelFields:
  """The model fields (and flags) that `TrainConfig` and `GRPOConfig` share, first in both."""

  preset: str | None = _f(None, "Model preset name (deepseek_jax.presets).")
  config_json: str | None = _f(None, "Hugging Face style config.json (file or directory).")
  init_from: str | None = _f(None, "Released safetensors directory, one of our Orbax "
                             "checkpoints, or a trainer workdir.")
  moe_dispatch: str | None = _f(None, "Override the config's MoE dispatch.",
                                choices=MOE_DISPATCHES)
  scan_layers: bool | None = _f(None, "Override the config's scan_layers.")
  remat: bool = _f(False, "Recompute layer activations in the backward pass.")
  compute_dtype: str = _f("float32", "Compute dtype (trained parameters stay float32).",
                          choices=("float32", "bfloat16"))


@dataclasses.dataclass(frozen=True)
class TrainConfig(ModelFields):
  """Everything a run needs (see the module docstring)."""

  # model: ModelFields' fields
  # fine-tuning
  lora_rank: int = _f(0, "LoRA adapters of this rank on --lora_targets; only they are trained "
                      "(0: train every weight).", lower=0)
  lora_alpha: float = _f(16.0, "LoRA scale alpha (the update is (x A) B * alpha / rank).",
                          lower=0.0)
  lora_targets: tuple[str, ...] = _f(LORA_TARGETS, "Projection name patterns that get adapters, "
                                     "e.g. self_attn.*, mlp.experts, mlp.shared_experts.*")
  base_dtype: str = _f("float32", "Storage of the frozen base with --lora_rank: float32, "
                       "bfloat16, int8 (per channel) or fp8 (128x128 blocks, as V3 is released); "
                       "without LoRA the trained weights' dtype (float32 or bfloat16).",
                       choices=BASE_DTYPES)
  # data
  data: str = _f("", "Text files or directories, comma-separated; or a JSONL file with "
                 "--data_format=chat|prompt_completion.", required=True)
  data_format: str = _f("text", "text (files of plain text), chat (JSONL rows with messages) or "
                        "prompt_completion (JSONL rows with prompt and completion).",
                        choices=DATA_FORMATS)
  eval_data: str | None = _f(None, "Held-out data in the same format: its loss is logged as "
                             "eval_loss.")
  eval_every: int = _f(100, "Steps between held-out evaluations (and at the end).",
                      lower=1)
  data_patterns: tuple[str, ...] = _f(data_lib.DEFAULT_PATTERNS,
                                      "File patterns searched in directories.")
  data_exclude: tuple[str, ...] = _f(data_lib.DEFAULT_EXCLUDE, "Directory names never entered.")
  max_data_bytes: int | None = _f(None, "Cap on the corpus size in bytes (files in sorted order).",
                                  lower=1)
  tokenizer: str = _f("auto", "'byte', a tokenizer.json, a directory with one, or 'auto' (the "
                      "--init_from directory's tokenizer when it carries one, else 'byte').")
  seq_len: int = _f(256, "Tokens per sequence.", lower=1)
  batch_size: int = _f(8, "Sequences per optimizer step (all micro-batches together).", lower=1)
  grad_accum: int = _f(1, "Micro-batches per step (batch_size must divide evenly).", lower=1)
  # optimization
  steps: int = _f(1000, "Train until this step (a rerun with more steps resumes).", lower=1)
  decay_steps: int | None = _f(None, "Cosine schedule length (default: --steps).", lower=1)
  learning_rate: float = _f(1e-3, "Peak learning rate.", lower=0.0)
  warmup_steps: int = _f(100, "Linear warmup steps.", lower=0)
  min_lr_ratio: float = _f(0.1, "Final learning rate / peak.", lower=0.0, upper=1.0)
  weight_decay: float = _f(0.1, "AdamW weight decay (matrices only).", lower=0.0)
  clip_norm: float = _f(1.0, "Global gradient-norm clip (<= 0: off).")
  mtp_weight: float = _f(0.3, "Weight λ of the MTP loss (DeepSeek-V3: 0.3, later 0.1).", lower=0.0)
  bias_update_speed: float = _f(0.001, "γ of auxiliary-loss-free balancing (0: off).", lower=0.0)
  seq_aux_alpha: float = _f(1e-4, "α of V3's complementary sequence-wise balance loss.", lower=0.0)
  expert_aux_alpha: float | None = _f(None, "α of DeepSeek-V2's expert-level balance loss "
                                      "(default: the config's, off for noaux_tc routing).",
                                      lower=0.0)
  seed: int = _f(0, "Initialisation and data-order seed.")
  # mesh
  data_parallel: int = _f(-1, "Data-parallel mesh axis (-1: what the other axes leave).")
  fsdp: int = _f(1, "FSDP mesh axis.")
  expert: int = _f(1, "Expert-parallel mesh axis.")
  tensor: int = _f(1, "Tensor-parallel mesh axis.")
  # output
  workdir: str = _f("", "Checkpoints, metrics.jsonl, TensorBoard files and the data cache.",
                    required=True)
  save_every: int = _f(500, "Checkpoint period in steps (and always at the end).", lower=1)
  keep: int = _f(3, "Checkpoints kept.", lower=1)
  log_every: int = _f(10, "Metrics period in steps.", lower=1)
  peak_flops: float | None = _f(None, "Per-device peak FLOP/s for MFU (default: the data sheet "
                                "or measured).", lower=0.0)
  progress: bool | None = _f(None, "Progress bar (default: on a terminal).")
  tensorboard: bool = _f(True, "Also write TensorBoard event files.")
  allow_resume_changes: bool = _f(False, "Resume a workdir although --seq_len, --batch_size, "
                                  "--grad_accum, --seed, --data or --tokenizer differ from its "
                                  "checkpoint's run (the data order restarts when the data or "
                                  "--seq_len changed).")

  def __post_init__(self):
    for f in dataclasses.fields(self):
      choices = f.metadata.get("choices")
      lower, upper = f.metadata.get("lower"), f.metadata.get("upper")
      value = getattr(self, f.name)
      if value is None:
        continue
      if choices and value not in choices:
        raise ValueError(f"--{f.name}={value!r}: expected one of {tuple(choices)}")
      if lower is not None and not value >= lower:  # NaN fails too
        raise ValueError(f"--{f.name}={value!r}: must be >= {lower}")
      if upper is not None and not value <= upper:
        raise ValueError(f"--{f.name}={value!r}: must be <= {upper}")

  def optim_config(self) -> optim.OptimConfig:
    return optim.OptimConfig(
        learning_rate=self.learning_rate, warmup_steps=self.warmup_steps,
        total_steps=self.decay_steps or self.steps, min_lr_ratio=self.min_lr_ratio,
        weight_decay=self.weight_decay, clip_norm=self.clip_norm)

  def to_json(self) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclasses.dataclass(frozen=True)
class FlagSpec:
  """One absl flag: its kind (string, integer, float, bool, enum, list) and what it says."""
  name: str
  kind: str
  default: Any
  help: str
  choices: tuple[str, ...] | None = None
  required: bool = False
  lower: float | None = None  # inclusive bounds (integer and float flags)
  upper: float | None = None


_KINDS = {str: "string", int: "integer", float: "float", bool: "bool"}


def flag_specs(cls=TrainConfig) -> list[FlagSpec]:
  """The flags of a config dataclass, one per field, from its types and field metadata."""
  hints = typing.get_type_hints(cls)
  out = []
  for f in dataclasses.fields(cls):
    t = hints[f.name]
    args = [a for a in typing.get_args(t) if a is not type(None)]
    base = args[0] if args and typing.get_origin(t) is not tuple else t
    if typing.get_origin(base) is tuple:
      kind, default = "list", list(f.default)
    elif "choices" in f.metadata:
      kind, default = "enum", f.default
    elif base in _KINDS:
      kind, default = _KINDS[base], f.default
    else:
      raise TypeError(f"TrainConfig.{f.name}: no flag kind for type {t}")
    out.append(FlagSpec(f.name, kind, None if f.metadata.get("required") else default,
                        f.metadata["help"], tuple(f.metadata.get("choices", ())) or None,
                        bool(f.metadata.get("required")), f.metadata.get("lower"),
                        f.metadata.get("upper")))
  return out


def define_flags(cls=TrainConfig, *, required: bool = True) -> None:
  """An absl flag for each of `flag_specs(cls)`; `required=False` leaves every flag optional
  whatever its field says."""
  for spec in flag_specs(cls):
    req = spec.required and required
    if spec.kind == "enum":
      flags.DEFINE_enum(spec.name, spec.default, list(spec.choices), spec.help, required=req)
    elif spec.kind in ("integer", "float"):
      getattr(flags, f"DEFINE_{spec.kind}")(spec.name, spec.default, spec.help,
                                            lower_bound=spec.lower, upper_bound=spec.upper,
                                            required=req)
    else:
      getattr(flags, f"DEFINE_{spec.kind}")(spec.name, spec.default, spec.help, required=req)


def from_flag_values(values: dict[str, Any], cls=TrainConfig):
  """The config from parsed flag values (lists back to tuples)."""
  kw = {}
  for f in dataclasses.fields(cls):
    v = values[f.name]
    kw[f.name] = tuple(v) if isinstance(v, list) else v
  return cls(**kw)
