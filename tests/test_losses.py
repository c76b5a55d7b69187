"""Losses against direct numpy / torch formulas."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepseek_jax import losses


def _rand(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.torch
def test_cross_entropy_matches_torch_and_ignores_masked():
  import torch  # the reference formula (marked torch)
  logits = _rand((2, 5, 11))
  targets = np.random.default_rng(1).integers(0, 11, (2, 5))
  mask = np.ones((2, 5), np.float32)
  mask[1, 3:] = 0
  got, n = losses.cross_entropy(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32),
                                jnp.asarray(targets), jnp.asarray(mask))
  t_targets = torch.tensor(targets)
  t_targets[1, 3:] = -100
  want = torch.nn.functional.cross_entropy(
      torch.tensor(np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32))).reshape(-1, 11),
      t_targets.reshape(-1), ignore_index=-100)
  assert n == 8
  np.testing.assert_allclose(got, want.item(), rtol=1e-6)
  # a masked position's logits do not matter
  logits2 = logits.copy()
  logits2[1, 4] += 100
  got2, _ = losses.cross_entropy(jnp.asarray(logits2), jnp.asarray(targets), jnp.asarray(mask))
  got1, _ = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  assert got1 == got2


def test_cross_entropy_takes_bf16_logits_in_f32():
  logits = jnp.asarray(_rand((1, 3, 7)), jnp.bfloat16)
  targets = jnp.asarray([[0, 1, 2]])
  a, _ = losses.cross_entropy(logits, targets)
  b, _ = losses.cross_entropy(logits.astype(jnp.float32), targets)
  assert a.dtype == jnp.float32 and a == b


def test_mtp_depth_k_predicts_token_t_plus_k_plus_1():
  tokens = np.arange(10)[None]                      # [1, T+1], T = 9
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  for k in (1, 2, 3):
    tk, mk = losses.mtp_targets(jnp.asarray(targets), None, k)
    valid = np.asarray(mk[0]).astype(bool)
    assert valid.sum() == 9 - k and not valid[-k:].any()
    np.testing.assert_array_equal(np.asarray(tk[0])[valid], inputs[0][valid] + k + 1)


def test_mtp_loss_is_mean_over_depths_with_masks():
  targets = jnp.asarray(np.random.default_rng(0).integers(0, 7, (2, 6)))
  logits = [jnp.asarray(_rand((2, 6, 7), s)) for s in (1, 2)]
  total, per = losses.mtp_loss(logits, targets)
  for k, (lg, lk) in enumerate(zip(logits, per), start=1):
    want, _ = losses.cross_entropy(lg[:, :-k], targets[:, k:])
    np.testing.assert_allclose(lk, want, rtol=1e-6)
  np.testing.assert_allclose(total, (per[0] + per[1]) / 2, rtol=1e-6)
  assert losses.mtp_loss([], targets)[0] == 0


def _balance_reference(scores, topk, per_sequence, normalize):
  """The formula written out with loops (DeepSeek-V3 eq. 17-20; V2 eq. 12-14)."""
  b, t, e = scores.shape
  k = topk.shape[-1]
  if normalize:
    scores = scores / scores.sum(-1, keepdims=True)
  groups = [(scores[i], topk[i]) for i in range(b)] if per_sequence else [
      (scores.reshape(b * t, e), topk.reshape(b * t, k))]
  out = []
  for s, idx in groups:
    n = s.shape[0]
    f = np.array([e / (k * n) * sum(i in idx[tt] for tt in range(n)) for i in range(e)])
    p = s.mean(0)
    out.append((f * p).sum())
  return np.mean(out)


@pytest.mark.parametrize("per_sequence,normalize", [(True, True), (False, False), (True, False)])
def test_balance_loss_formula(per_sequence, normalize):
  rng = np.random.default_rng(0)
  raw = rng.standard_normal((3, 5, 8)).astype(np.float32)
  scores = 1 / (1 + np.exp(-raw)) if normalize else np.exp(raw) / np.exp(raw).sum(-1, keepdims=True)
  topk = np.argsort(-scores, -1)[..., :2].astype(np.int32)
  got = losses.balance_loss(jnp.asarray(scores), jnp.asarray(topk), per_sequence=per_sequence,
                            normalize_scores=normalize)
  np.testing.assert_allclose(got, _balance_reference(scores, topk, per_sequence, normalize),
                             rtol=1e-5)


def test_balance_loss_uniform_is_one_and_masks_padding():
  scores = jnp.full((2, 4, 8), 0.3)
  topk = jnp.asarray(np.random.default_rng(0).integers(0, 8, (2, 4, 2)), jnp.int32)
  np.testing.assert_allclose(losses.balance_loss(scores, topk), 1.0, rtol=1e-6)
  mask = jnp.asarray([[1, 1, 0, 0], [1, 1, 1, 1]], jnp.float32)
  a = losses.balance_loss(scores.at[0, 2:].set(5.0), topk, mask=mask)
  b = losses.balance_loss(scores, topk, mask=mask)
  np.testing.assert_allclose(a, b, rtol=1e-6)


def test_balance_loss_gradient_pushes_probability_off_the_busy_expert():
  raw = jnp.zeros((1, 4, 4))
  topk = jnp.zeros((1, 4, 1), jnp.int32)                  # every token picks expert 0
  g = jax.grad(lambda r: losses.balance_loss(jax.nn.sigmoid(r), topk))(raw)
  assert (g[..., 0] > 0).all() and (g[..., 1:] < 0).all()


def test_expert_counts_and_bias_update():
  topk = jnp.asarray([[[0, 1], [0, 2]], [[0, 1], [3, 0]]], jnp.int32)   # [2, 2, 2]
  counts = losses.expert_counts(topk, 5)
  np.testing.assert_array_equal(counts, [4, 2, 1, 1, 0])
  masked = losses.expert_counts(topk, 5, mask=jnp.asarray([[1, 0], [1, 1]]))
  np.testing.assert_array_equal(masked, [3, 2, 0, 1, 0])
  bias = jnp.zeros(5)
  new = losses.bias_update(bias, counts, 0.01)            # mean load 1.6
  np.testing.assert_allclose(new, [-0.01, -0.01, 0.01, 0.01, 0.01])
  np.testing.assert_allclose(losses.bias_update(bias, jnp.ones(5), 0.01), 0.0)
  stats = losses.load_stats(counts)
  np.testing.assert_allclose([stats["min"], stats["max"], stats["cv"]],
                             [0, 4 / 1.6, np.std([4, 2, 1, 1, 0]) / 1.6], rtol=1e-6)
