"""Optimizer: schedule shape, which parameters decay, clipping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from deepseek_jax import get_preset, optim
from deepseek_jax.model import DeepseekForCausalLM


def test_schedule_warmup_then_cosine_to_floor():
  cfg = optim.OptimConfig(learning_rate=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
  lr = optim.schedule(cfg)
  np.testing.assert_allclose([lr(0), lr(5), lr(10)], [0.0, 0.5, 1.0], rtol=1e-6)
  np.testing.assert_allclose(lr(60), 0.1 + 0.9 * 0.5, rtol=1e-5)  # half-way through the cosine
  np.testing.assert_allclose([lr(110), lr(500)], [0.1, 0.1], rtol=1e-5)
  with pytest.raises(ValueError, match="warmup_steps"):
    optim.schedule(optim.OptimConfig(warmup_steps=-1))


@pytest.mark.parametrize("scan", [False, True])
def test_decay_mask_excludes_norms_biases_router_bias(scan):
  cfg = get_preset("tiny_v3", scan_layers=scan, attention_bias=True)
  model = nnx.eval_shape(lambda: DeepseekForCausalLM(cfg, rngs=nnx.Rngs(0)))
  state = nnx.state(model)  # every variable, the router bias included
  mask = optim.decay_mask(state)
  decided = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
  for path, decays in decided.items():
    no_decay = any(f"['{n}']" in path for n in ("scale", "bias", "e_score_correction_bias"))
    assert decays == (not no_decay), path
  assert any("e_score_correction_bias" in p for p in decided)
  assert any("q_a_proj']['bias" in p for p in decided)


def test_zero_gradient_step_decays_matrices_only():
  cfg = optim.OptimConfig(learning_rate=0.5, warmup_steps=0, total_steps=10, weight_decay=0.1)
  tx = optim.make_optimizer(cfg)
  params = {"proj": {"kernel": jnp.ones((2, 3))}, "norm": {"scale": jnp.ones((3,))},
            "vec": jnp.ones((4,))}
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, state, params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new["proj"]["kernel"], 1 - 0.5 * 0.1, rtol=1e-6)
  np.testing.assert_array_equal(new["norm"]["scale"], 1.0)
  np.testing.assert_array_equal(new["vec"], 1.0)


def test_global_norm_clipping_comes_before_adam():
  # eps=1 makes Adam's step depend on the gradient's size: m / (sqrt(v) + 1) after bias correction.
  kw = dict(learning_rate=1.0, warmup_steps=0, weight_decay=0.0, eps=1.0)
  params = {"w": jnp.zeros((2, 2))}
  grads = {"w": jnp.full((2, 2), 10.0)}                  # global norm 20
  for clip, g in ((1.0, 0.5), (0.0, 10.0)):               # clipped: each entry 1/20 of 10
    tx = optim.make_optimizer(optim.OptimConfig(clip_norm=clip, **kw))
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -g / (g + 1.0), rtol=1e-5)


@pytest.mark.parametrize("scale", [0.0, 0.01, 1.0, 1e3])
def test_clipping_equals_optax_and_keeps_its_state(scale):
  """Our clip (one scalar multiply, fused into Adam by XLA) gives optax.clip_by_global_norm's
  gradients, unclipped below the norm and at zero, and its (empty) state, so checkpoints of
  either restore into the other."""
  r = np.random.RandomState(0)
  grads = {"a": jnp.asarray(r.randn(3, 4) * scale, jnp.float32),
           "b": {"c": jnp.asarray(r.randn(5) * scale, jnp.float32)}}
  ours, theirs = optim.clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0)
  assert jax.tree.structure(ours.init(grads)) == jax.tree.structure(theirs.init(grads))
  got, _ = jax.jit(ours.update)(grads, ours.init(grads))
  want, _ = theirs.update(grads, theirs.init(grads))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=0)
  norm = float(optax.tree.norm(got))
  assert norm == pytest.approx(min(1.0, float(optax.tree.norm(grads))), rel=1e-6)
