"""`GRPOConfig`: everything a GRPO run needs, one field per flag of `python -m deepseek_jax.grpo`.

As with `TrainConfig`, the absl flags are generated from the fields (`train_config.flag_specs`),
so the two cannot drift apart. The model fields (preset, config_json, init_from, the runtime
overrides, LoRA, base_dtype, tokenizer, seed, the mesh axes) have TrainConfig's names and
meanings: the trainer's model builder serves both.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from deepseek_jax import optim
from deepseek_jax.config import LORA_TARGETS
from deepseek_jax.grpo_loss import LOSS_TYPES
from deepseek_jax.train_config import ModelFields, _f

PROMPT_FORMATS = ("chat", "raw")


@dataclasses.dataclass(frozen=True)
class GRPOConfig(ModelFields):
  """Everything a GRPO run needs (see the module docstring and `grpo_trainer`)."""

  # model: ModelFields (TrainConfig's names), init_from's help its own
  init_from: str | None = _f(None, "The policy's starting point: released safetensors, one of "
                             "our Orbax checkpoints, or a trainer workdir (an SFT warm-up).")
  lora_rank: int = _f(0, "LoRA adapters of this rank; only they are trained, and the reference "
                      "is the model with them switched off (0: train every weight; the "
                      "reference is a frozen copy).")
  lora_alpha: float = _f(16.0, "LoRA scale alpha (the update is (x A) B * alpha / rank).")
  lora_targets: tuple[str, ...] = _f(LORA_TARGETS, "Projection name patterns that get adapters.")
  base_dtype: str = _f("float32", "Storage of the frozen base with --lora_rank (float32, "
                       "bfloat16, int8, fp8).", choices=("float32", "bfloat16", "int8", "fp8"))
  tokenizer: str = _f("auto", "'byte', a tokenizer.json, a directory with one, or 'auto' (the "
                      "--init_from directory's tokenizer.json when it has one, else 'byte').")
  # prompts and rewards
  prompts: str = _f("", "JSONL file of prompt rows {\"prompt\": str, \"answer\": ..., ...}; "
                    "the other fields reach the rewards as columns.", required=True)
  prompt_format: str = _f("chat", "chat: each prompt is a user message under the model's chat "
                          "template with a generation prompt; raw: the text as it is.",
                          choices=PROMPT_FORMATS)
  system: str | None = _f(None, "System message before each prompt (--prompt_format=chat).")
  reward: tuple[str, ...] = _f(("math",), "Rewards, comma-separated: math, format, code "
                               "(deepseek_jax.rewards).")
  reward_weights: tuple[str, ...] = _f((), "One weight per --reward (default 1 each).")
  # sampling
  group_size: int = _f(8, "G: completions sampled per prompt (one shared prefill).")
  prompts_per_step: int = _f(4, "Prompts per GRPO step (the batch is prompts_per_step x G).")
  max_new_tokens: int = _f(256, "Longest completion (tokens); a longer one is cut there.")
  temperature: float = _f(1.0, "Sampling temperature (> 0); the learner's log-probabilities use "
                          "the same distribution.")
  top_p: float = _f(1.0, "Nucleus sampling mass (1: off).")
  top_k: int = _f(0, "Sample among the k most likely tokens (0: off).")
  # objective
  epsilon: float = _f(0.2, "PPO clip range ε (lower side, and upper unless --epsilon_high).")
  epsilon_high: float | None = _f(None, "Upper clip range (DAPO's clip-higher; default ε).")
  beta: float = _f(0.001, "β of the k3 KL penalty to the reference (R1: 0.001; 0: no reference "
                   "forward).")
  loss_type: str = _f("grpo", "grpo: mean of per-sequence token means; dapo: token-level mean; "
                      "dr_grpo: sum over tokens / (batch x max_new_tokens).", choices=LOSS_TYPES)
  scale_rewards: bool = _f(True, "Divide advantages by the group's reward std (False: Dr. GRPO).")
  updates_per_batch: int = _f(1, "μ: policy updates per batch of rollouts (each one AdamW step "
                              "against the sampler's old log-probabilities).")
  routing_replay: bool = _f(False, "MoE: the learner's forward uses the experts chosen at "
                            "sampling time (the ratio compares the same experts).")
  bias_update_speed: float = _f(0.0, "γ of the router-bias balancing rule during RL (0: the "
                                "router bias stays frozen).")
  # optimization
  steps: int = _f(100, "GRPO steps (batches of rollouts); a rerun with more steps resumes.")
  learning_rate: float = _f(1e-6, "Peak learning rate.")
  warmup_steps: int = _f(0, "Linear warmup (optimizer updates).")
  min_lr_ratio: float = _f(1.0, "Final learning rate / peak (1: constant).")
  weight_decay: float = _f(0.0, "AdamW weight decay (matrices only).")
  clip_norm: float = _f(1.0, "Global gradient-norm clip (<= 0: off).")
  seed: int = _f(0, "Prompt order, sampling noise and initialisation seed.")
  # mesh
  data_parallel: int = _f(-1, "Data-parallel mesh axis (-1: what the other axes leave).")
  fsdp: int = _f(1, "FSDP mesh axis.")
  expert: int = _f(1, "Expert-parallel mesh axis.")
  tensor: int = _f(1, "Tensor-parallel mesh axis.")
  # output
  workdir: str = _f("", "Checkpoints, metrics.jsonl and TensorBoard files.", required=True)
  save_every: int = _f(50, "Checkpoint period in steps (and always at the end).")
  keep: int = _f(3, "Checkpoints kept.")
  log_samples: int = _f(1, "Completions printed at each log (0: none).")
  log_every: int = _f(1, "Metrics period in steps.")
  progress: bool | None = _f(None, "Progress bar (default: on a terminal).")
  tensorboard: bool = _f(True, "Also write TensorBoard event files.")

  def __post_init__(self):
    for f in dataclasses.fields(self):
      choices = f.metadata.get("choices")
      value = getattr(self, f.name)
      if choices and value is not None and value not in choices:
        raise ValueError(f"--{f.name}={value!r}: expected one of {tuple(choices)}")
    for name in ("group_size", "prompts_per_step", "max_new_tokens", "updates_per_batch",
                 "steps", "save_every", "keep", "log_every"):
      if getattr(self, name) < 1:
        raise ValueError(f"--{name}={getattr(self, name)}: must be >= 1")
    for name in ("lora_rank", "top_k", "warmup_steps", "log_samples"):
      if getattr(self, name) < 0:
        raise ValueError(f"--{name}={getattr(self, name)}: must be >= 0")
    if self.group_size < 2:
      raise ValueError(f"--group_size={self.group_size}: GRPO compares completions within a "
                       "group, it needs >= 2")
    positive = {"temperature": self.temperature, "epsilon": self.epsilon,
                "lora_alpha": self.lora_alpha}
    for name, v in positive.items():
      if not (math.isfinite(v) and v > 0):
        raise ValueError(f"--{name}={v}: must be a positive number")
    if self.epsilon_high is not None and not self.epsilon_high > 0:
      raise ValueError(f"--epsilon_high={self.epsilon_high}: must be positive")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"--top_p={self.top_p}: must be in (0, 1]")
    for name in ("beta", "learning_rate", "weight_decay", "bias_update_speed"):
      v = getattr(self, name)
      if not (math.isfinite(v) and v >= 0):
        raise ValueError(f"--{name}={v}: must be >= 0")
    if not 0 <= self.min_lr_ratio <= 1:
      raise ValueError(f"--min_lr_ratio={self.min_lr_ratio}: must be in [0, 1]")
    self.weights()  # parses --reward_weights

  def weights(self) -> tuple[float, ...]:
    """--reward_weights as floats (ValueError naming the flag otherwise)."""
    out = []
    for w in self.reward_weights:
      try:
        out.append(float(w))
      except (TypeError, ValueError):
        raise ValueError(f"--reward_weights={','.join(map(str, self.reward_weights))}: "
                         f"{w!r} is not a number") from None
    return tuple(out)

  def optim_config(self) -> optim.OptimConfig:
    total = self.steps * self.updates_per_batch
    return optim.OptimConfig(
        learning_rate=self.learning_rate, warmup_steps=self.warmup_steps, total_steps=total,
        min_lr_ratio=self.min_lr_ratio, weight_decay=self.weight_decay, clip_norm=self.clip_norm)

  def to_json(self) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
