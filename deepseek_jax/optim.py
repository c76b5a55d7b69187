"""The optimizer: AdamW with linear warmup and cosine decay, global-norm clipping, masked decay.

Weight decay applies to matrices only: not to norm scales, biases, the router correction bias, or
any other 1-D parameter (decided by the parameter's path and rank, see `decay_mask`). Master
weights are whatever the parameters are stored in (float32 in the trainer); the compute dtype is
the model's business.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

# Leaf names (last path component) never decayed, whatever their rank.
NO_DECAY_NAMES = ("scale", "bias", "e_score_correction_bias")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW and schedule settings (the trainer fills them from its flags)."""

  learning_rate: float = 1e-3   # peak learning rate, reached after the warmup
  warmup_steps: int = 100       # linear warmup from 0 over this many steps
  total_steps: int = 1000       # cosine decay ends here (at min_lr_ratio * peak)
  min_lr_ratio: float = 0.1     # final learning rate as a fraction of the peak
  weight_decay: float = 0.1     # decoupled weight decay on matrices
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  clip_norm: float = 1.0        # global gradient-norm clip; <= 0 disables


def schedule(cfg: OptimConfig) -> optax.Schedule:
  """lr(s) = peak·s/W for s < W, then cosine from peak down to min_lr_ratio·peak at total_steps."""
  if cfg.learning_rate < 0:
    raise ValueError(f"--learning_rate={cfg.learning_rate}: must be >= 0")
  if cfg.warmup_steps < 0:
    raise ValueError(f"--warmup_steps={cfg.warmup_steps}: must be >= 0")
  decay_steps = max(cfg.total_steps, cfg.warmup_steps + 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
      decay_steps=decay_steps, end_value=cfg.learning_rate * cfg.min_lr_ratio)


def _leaf_name(path) -> str:
  names = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        names.append(str(getattr(k, attr)))
        break
  names = [n for n in names if n != "value"]  # nnx Variables flatten through `.value`
  return names[-1] if names else ""


def decay_mask(params):
  """True where weight decay applies: parameters of rank >= 2 not named like a norm or bias."""
  def decide(path, leaf):
    return leaf.ndim >= 2 and _leaf_name(path) not in NO_DECAY_NAMES
  return jax.tree_util.tree_map_with_path(decide, params)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """optax.clip_by_global_norm's result (g * min(1, max_norm / ||g||), the same empty state), as a
  multiplication by one scalar: XLA fuses that into AdamW's moment updates, where optax's
  `g / ||g|| * max_norm` (a divide, which XLA will not duplicate into two consumers) was a pass
  of its own over every gradient into fresh memory: 0.8 s of a 6.5 s step on the mid-size config
  (bench/train.py)."""
  def update(updates, state, params=None):
    del params
    factor = jnp.minimum(1.0, max_norm / optax.tree.norm(updates))
    return jax.tree.map(lambda g: g * factor.astype(g.dtype), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  """clip_by_global_norm -> AdamW(schedule, masked decay)."""
  parts = []
  if cfg.clip_norm > 0:
    parts.append(clip_by_global_norm(cfg.clip_norm))
  parts.append(optax.adamw(schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=decay_mask))
  return optax.chain(*parts)
